"""AttentionFlow (Abnar & Zuidema 2020): maximum flow through the layered attention graph."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from captum.attr import Attribution
from scipy.sparse import csr_array
from scipy.sparse.csgraph import maximum_flow
from torch import Tensor, nn

from .._capture import TokenLayout, ViTAdapter, resolve_adapter
from .._compat import log_usage
from .._progress import progress
from .._utils import TargetType, _forward_args, _unpack_inputs
from ._common import (
    _check_fusion,
    _check_layer_index,
    _format_output,
    _lazy_product,
    _run_captured,
)
from ._rollout import check_rollout_args

__all__ = ["AttentionFlow"]

#: Largest capacity scale: every capacity (at most 1) times the scale fits in int32.
_MAX_SCALE = 2**30


class AttentionFlow(Attribution):
    r"""Attention flow: the maximum flow from each input patch to the pooled output.

    Abnar & Zuidema (2020) read the attention of a ViT as a layered flow network.
    Its nodes are every token at every layer boundary (``K + 1`` layers of ``N``
    nodes for the ``K`` layers from ``start_layer`` to the last). The edge from input
    token ``j`` of layer ``l`` to output token ``i`` of layer ``l`` has capacity
    ``Ã_l[i, j]``, the same matrix :class:`AttentionRollout` multiplies:

    1. ``F_l`` = heads fused (``head_fusion``: mean, max or min);
    2. optionally the ``discard_ratio`` smallest entries set to 0 (never the query
       rows' diagonal);
    3. ``Ã_l = (1 - w)·F_l + w·I`` with ``w = residual_weight``, rows divided by
       their sums.

    The value of a patch ``j`` is the maximum flow from node ``(0, j)`` (the patch
    token entering layer ``start_layer``) to the *query* of the last layer, the
    tokens the model's head pools (:meth:`ViTAdapter.query_weights`):

    * one query token (CLS-pooled models): the sink is that token's node;
    * several query tokens (DeiT distilled: CLS and distillation token, weight 1/2
      each; average-pooled models: every patch token, weight ``1/P``): a super-sink
      joined by each query token ``i`` with an edge of capacity ``q_i``, its pooling
      weight. Because the ``q_i`` sum to 1, flows stay in ``[0, 1]``, and with a
      single query token the super-sink edge (capacity 1, at least the token's
      total in-capacity) changes nothing.

    **Speed.** The published implementation builds a networkx graph and runs one
    Python max-flow per token (minutes per image). Here each sample's network is
    assembled once, directly in compressed sparse row form (the layered structure
    gives fixed row pointers: node ``(l, j)`` has an out-edge to every token of
    layer ``l + 1``, whose capacities are column ``j`` of ``Ã_{l+1}``), keeping only
    the nodes that can carry flow (the last layer keeps only the query tokens), and
    the same network is reused for every source patch by scipy's compiled Dinic
    solver (:func:`scipy.sparse.csgraph.maximum_flow`). Other patches of layer 0
    have no incoming edges, so they cannot carry flow for a different source.

    **Precision.** scipy needs integer capacities: each capacity ``c`` is stored
    as ``round(c · capacity_scale)`` (int32; default scale ``2**30``, so one unit
    is ``9.3e-10``) and flows are divided by the scale. The flow of the rounded
    network is exact; it differs from the flow of the real-valued network by at
    most ``|C| / (2 · capacity_scale)`` where ``|C|`` is the number of edges in a
    minimum cut (at most ``N`` edges for a cut across one layer boundary:
    ``≤ 1.0e-7`` for DeiT-Tiny's 197 tokens), below the float32 resolution of the
    attention itself. The solver's run time does not depend on the scale.

    **Flow versus rollout.** Both read the same graph. Rollout sums, over all paths
    from ``j`` to the query, the product of the capacities; flow is the largest
    amount that can be routed within the capacities. They agree exactly with one
    layer (``start_layer=-1``) and one query token: both are ``Ã[q, j]``. The
    rollout's path products form a feasible flow, so ``rollout ≤ flow`` for every
    patch (equality is rare). With two layers flow is
    ``Σ_i min(Ã_1[i, j], Ã_2[q, i])`` against rollout's ``Σ_i Ã_2[q, i]·Ã_1[i, j]``.
    Flow is not additive: each patch is routed alone with the whole network free,
    so the flows of all patches sum to far more than 1 (rollout's patch columns sum
    to at most 1), and when the residual weight keeps every token well connected
    many patches saturate near the query's capacity, giving flatter maps with less
    contrast than rollout. Abnar & Zuidema report flow correlating better with
    input-gradient and ablation importance.

    **Where the cut lies.** A patch's flow can never exceed the capacity leaving its
    source node, ``c_j = Σ_i Ã_start[i, j]`` (the attention the patch *receives* in
    the first layer of the network, plus the residual), nor the query's capacity 1:
    ``flow_j ≤ min(c_j, 1)``. The layers in between are densely connected and rarely
    bind, so in practice the bound is the flow: on the bundled DeiT-Tiny it holds
    with equality (to 1e-5) for 99.6 % of the patches of 20 ImageNet images, about
    29 % of them saturated at 1 (``benchmarks/flow_diagnosis.py``). The map then
    ranks patches by the attention they receive in the first layer. On that model
    this carries no foreground information (foreground fraction 0.265 on the VOC
    masks, a random map 0.266) and runs against the class evidence (Spearman −0.22
    with Chefer's relevance): the perturbation test scores it below a random map,
    whichever way ties are broken. Prefer :class:`GradientRollout` or
    :class:`AttentionRollout` where faithfulness matters.

    Not class-specific: ``target`` is ignored. Values are raw flows in ``[0, 1]``;
    the published code divides each image's flows by their sum (``map / map.sum()``
    reproduces that).

    Args:
        model (nn.Module): a ViT supported by :func:`captum_vit.adapt`.
        head_fusion (str, optional): ``"mean"``, ``"max"`` or ``"min"``.
            Default: "mean"
        residual_weight (float, optional): weight ``w`` of the identity (residual
            connection), in ``[0, 1]``. Default: 0.5
        discard_ratio (float, optional): fraction in ``[0, 1)`` of smallest fused
            entries dropped per layer, as in rollout. Default: 0.0
        start_layer (int, optional): first layer of the network (negative counts
            from the end). Default: 0
        capacity_scale (int, optional): integer scale of the capacities, in
            ``[1, 2**30]``. Default: 2**30
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None

    Example::

        >>> flow = AttentionFlow(model)
        >>> attr = flow.attribute(images, show_progress=True)   # (B, C, H, W)
        >>> grid = flow.attribute(images, return_patch_grid=True)  # (B, 1, gh, gw)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        head_fusion: str = "mean",
        residual_weight: float = 0.5,
        discard_ratio: float = 0.0,
        start_layer: int = 0,
        capacity_scale: int = _MAX_SCALE,
        adapter: ViTAdapter | None = None,
    ) -> None:
        self.adapter = resolve_adapter(model, adapter)
        super().__init__(self.adapter.forward)
        self.model = model
        self.head_fusion = _check_fusion(head_fusion)
        check_rollout_args(discard_ratio, residual_weight)
        self.residual_weight = float(residual_weight)
        self.discard_ratio = float(discard_ratio)
        self.start_layer = _check_layer_index(start_layer, self.adapter.num_layers, "start_layer")
        if not isinstance(capacity_scale, int) or isinstance(capacity_scale, bool):
            raise TypeError(f"capacity_scale must be an int, got {type(capacity_scale).__name__}")
        if not 1 <= capacity_scale <= _MAX_SCALE:
            raise ValueError(f"capacity_scale must be in [1, 2**30], got {capacity_scale}")
        self.capacity_scale = capacity_scale

    def _capacities(self, x: Tensor, additional_forward_args: Any) -> tuple[Tensor, TokenLayout]:
        adapter = self.adapter
        state: dict[str, Any] = {"mats": []}

        def on_attention(layer: int, attn: Tensor) -> None:
            if layer < self.start_layer:
                return
            product = _lazy_product(
                state, adapter, x, attn, self.head_fusion, self.discard_ratio, self.residual_weight
            )
            state["mats"].append(product.layer_matrix(attn.detach()))

        with torch.no_grad():
            _, _, layout = _run_captured(
                adapter, x, _forward_args(additional_forward_args), keep=False,
                on_attention=on_attention,
            )
        return torch.stack(state["mats"], dim=1), layout

    def capacities(self, inputs: Tensor, additional_forward_args: Any = None) -> Tensor:
        r"""The edge capacities of the flow network, layer by layer.

        Args:
            inputs (Tensor): images ``(B, C, H, W)``.
            additional_forward_args (Any, optional): extra forward arguments.
                Default: None

        Returns:
            Tensor: ``Ã`` of shape ``(B, K, N, N)`` float32 for the ``K`` layers from
            ``start_layer``; ``[b, k, i, j]`` is the capacity of the edge from token
            ``j`` entering layer ``k`` to token ``i`` leaving it.
        """
        x, _ = _unpack_inputs(inputs)
        return self._capacities(x, additional_forward_args)[0]

    @log_usage
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        return_patch_grid: bool = False,
        show_progress: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Maximum attention flow from each patch to the pooled query tokens.

        Args:
            inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)``.
            target (int, list or Tensor, optional): ignored (attention flow is not
                class-specific). Default: None
            additional_forward_args (Any, optional): extra forward arguments.
                Default: None
            return_patch_grid (bool, optional): return ``(B, 1, gh, gw)``.
                Default: False
            show_progress (bool, optional): show a progress bar over the
                ``B · gh · gw`` max-flow problems (useful for large models).
                Default: False

        Returns:
            Tensor or tuple[Tensor]: ``inputs``-shaped map (nearest-neighbour
            upsampled, same in every channel) or ``(B, 1, gh, gw)``; flows in
            ``[0, 1]``.
        """
        x, as_tuple = _unpack_inputs(inputs)
        caps, layout = self._capacities(x, additional_forward_args)
        weights = self.adapter.query_weights(layout).numpy().astype(np.float64)
        sources = np.arange(layout.num_prefix_tokens, layout.num_tokens)
        batch = caps.shape[0]
        bar = (
            progress(total=batch * sources.size, desc="AttentionFlow")
            if show_progress
            else None
        )
        try:
            flows = [
                _max_flows(
                    caps[b].cpu().numpy(), weights, sources, self.capacity_scale, bar
                )
                for b in range(batch)
            ]
        finally:
            if bar is not None:
                bar.close()
        maps = torch.from_numpy(np.stack(flows)).to(device=x.device, dtype=torch.float32)
        maps = maps.reshape(batch, *layout.grid)
        return _format_output(maps, x, return_patch_grid=return_patch_grid, as_tuple=as_tuple)


def _max_flows(
    capacities: np.ndarray,
    query_weights: np.ndarray,
    sources: np.ndarray,
    scale: int,
    bar: Any = None,
) -> np.ndarray:
    """Max flow from each source token of layer 0 to the weighted query of layer K.

    Args:
        capacities (np.ndarray): ``(K, N, N)``; ``[k, i, j]`` is the capacity of the
            edge from node ``(k, j)`` to node ``(k + 1, i)``.
        query_weights (np.ndarray): ``(N,)`` non-negative pooling weights; tokens
            with weight > 0 join the super-sink with that capacity.
        sources (np.ndarray): token indices of the sources.
        scale (int): integer capacity scale.
        bar (Any, optional): a progress bar to ``update()`` per source.

    Returns:
        np.ndarray: ``(len(sources),)`` float64 flows (in units of the capacities).
    """
    k_layers, n, _ = capacities.shape
    query = np.flatnonzero(query_weights > 0)
    caps = capacities.astype(np.float64)
    # Out-edges in CSR order: node (k, j) -> (k + 1, i) for all i (k < K - 1), node
    # (K - 1, j) -> (K, q) for the query tokens q, node (K, q) -> super-sink.
    data = np.concatenate(
        [caps[k].T.ravel() for k in range(k_layers - 1)]
        + [caps[k_layers - 1][query, :].T.ravel(), query_weights[query]]
    )
    data = np.clip(np.rint(data * scale), 0, np.iinfo(np.int32).max).astype(np.int32)
    sink = (k_layers + 1) * n
    indices, indptr = _layered_structure(k_layers, n, query)
    graph = csr_array((data, indices, indptr), shape=(sink + 1, sink + 1))
    out = np.zeros(sources.size, dtype=np.float64)
    for s, src in enumerate(sources):
        out[s] = maximum_flow(graph, int(src), sink, method="dinic").flow_value / scale
        if bar is not None:
            bar.update()
    return out


def _layered_structure(k_layers: int, n: int, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and row pointers of the layered flow network (see _max_flows)."""
    nq = query.size
    sink = (k_layers + 1) * n
    cols = [np.tile(np.arange((k + 1) * n, (k + 2) * n), n) for k in range(k_layers - 1)]
    cols.append(np.tile(k_layers * n + query, n))
    cols.append(np.full(nq, sink))
    counts = np.zeros(sink + 1, dtype=np.int64)
    counts[: (k_layers - 1) * n] = n
    counts[(k_layers - 1) * n : k_layers * n] = nq
    counts[k_layers * n + query] = 1
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return np.concatenate(cols).astype(np.int32), indptr
