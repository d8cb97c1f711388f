"""RawAttention: where the pooled token(s) look in one layer, or in every layer and head."""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import Attribution
from torch import Tensor, nn

from .._capture import ViTAdapter, resolve_adapter
from .._compat import log_usage
from .._utils import TargetType, _forward_args, _unpack_inputs
from ._common import (
    _check_finite,
    _check_fusion,
    _check_layer_index,
    _format_output,
    _patch_grid,
    _query_indices,
    _query_rows,
    _run_attention_only,
)
from ._rollout import fuse_heads

__all__ = ["RawAttention"]


class RawAttention(Attribution):
    r"""Raw attention of one layer, read from the rows the model's head pools.

    For layer ``l`` with attention probabilities ``A_l`` ``(B, heads, N, N)``, the map
    is ``q · fuse_heads(A_l)`` restricted to the patch columns, where ``q`` weights the
    query rows (row 0 for CLS-pooled models, the mean of rows 0 and 1 for DeiT
    distilled, the mean of the patch rows for average-pooled models) and
    ``fuse_heads`` is the elementwise mean, max or min over heads.

    Not class-specific: ``target`` is accepted for Captum compatibility and ignored.
    The forward pass stops right after the layer that is read (for
    :meth:`attention_maps`, after the last layer), so early layers are cheap.

    Args:
        model (nn.Module): a ViT supported by :func:`captum_vit.adapt`.
        layer (int, optional): which layer (negative counts from the end).
            Default: -1
        head_fusion (str, optional): ``"mean"``, ``"max"`` or ``"min"``.
            Default: "mean"
        adapter (ViTAdapter, optional): a prebuilt adapter for ``model``.
            Default: None (auto-detect)

    Example::

        >>> explainer = RawAttention(model, layer=5)
        >>> attr = explainer.attribute(images)           # same shape as images
        >>> maps = explainer.attention_maps(images)      # (B, L, heads, gh, gw)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: int = -1,
        head_fusion: str = "mean",
        adapter: ViTAdapter | None = None,
    ) -> None:
        self.adapter = resolve_adapter(model, adapter)
        super().__init__(self.adapter.forward)
        self.model = model
        self.layer = _check_layer_index(layer, self.adapter.num_layers, "layer")
        self.head_fusion = _check_fusion(head_fusion)

    @log_usage
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        return_patch_grid: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Head-fused attention of ``self.layer`` from the query rows to each patch.

        Args:
            inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)`` as the model
                takes them (normalised).
            target (int, list or Tensor, optional): ignored (raw attention is not
                class-specific). Default: None
            additional_forward_args (Any, optional): extra positional arguments for
                the model's forward. Default: None
            return_patch_grid (bool, optional): return ``(B, 1, gh, gw)`` instead of
                an input-shaped map. Default: False

        Returns:
            Tensor or tuple[Tensor]: ``inputs``-shaped attributions (the patch map
            upsampled with nearest neighbour, same in every channel), or
            ``(B, 1, gh, gw)``; a tuple when ``inputs`` was a tuple.
        """
        x, as_tuple = _unpack_inputs(inputs)
        kept: dict[str, Tensor] = {}

        def on_attention(layer: int, attn: Tensor) -> None:
            if layer == self.layer:  # its query rows only (B, heads, rows, N)
                kept["fused"] = fuse_heads(attn.detach(), self.head_fusion)

        layout = _run_attention_only(
            self.adapter,
            x,
            _forward_args(additional_forward_args),
            on_attention=on_attention,
            first_layer=self.layer,
            last_layer=self.layer,
            query_rows=True,
        )
        device = kept["fused"].device
        rows = _query_indices(self.adapter, layout, device)
        weights = self.adapter._query_weights(layout, device)[rows]
        maps = _patch_grid(torch.einsum("k,bkn->bn", weights, kept["fused"]), layout)
        _check_finite(maps, "RawAttention")
        return _format_output(maps, x, return_patch_grid=return_patch_grid, as_tuple=as_tuple)

    def attention_maps(self, inputs: Tensor, additional_forward_args: Any = None) -> Tensor:
        r"""Every layer's and head's attention from the query rows to the patches.

        Args:
            inputs (Tensor): images ``(B, C, H, W)``.
            additional_forward_args (Any, optional): extra forward arguments.
                Default: None

        Returns:
            Tensor: ``(B, L, heads, gh, gw)`` float32.
        """
        x, _ = _unpack_inputs(inputs)
        per_layer: dict[int, Tensor] = {}

        def on_attention(layer: int, attn: Tensor) -> None:
            # Reduce each layer to its query rows at once: one layer alive at a time.
            layout = self.adapter.layout(x, int(attn.shape[-1]))
            per_layer[layer] = _query_rows(attn.detach(), self.adapter, layout)

        _run_attention_only(
            self.adapter, x, _forward_args(additional_forward_args), on_attention=on_attention
        )
        maps = torch.stack([per_layer[i] for i in range(self.adapter.num_layers)], dim=1)
        _check_finite(maps, "RawAttention")
        return maps
