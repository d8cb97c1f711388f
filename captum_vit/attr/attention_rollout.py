"""AttentionRollout (Abnar & Zuidema 2020) with head fusion, discard ratio and residual weight."""

from __future__ import annotations

from typing import Any

from captum.attr import Attribution
from torch import Tensor, nn

from .._capture import TokenLayout, ViTAdapter, resolve_adapter
from .._compat import log_usage
from .._utils import TargetType, _forward_args, _unpack_inputs
from ._common import (
    _check_finite,
    _check_fusion,
    _check_layer_index,
    _format_output,
    _lazy_product,
    _patch_grid,
    _run_attention_only,
)
from ._rollout import check_rollout_args

__all__ = ["AttentionRollout"]


class AttentionRollout(Attribution):
    r"""Attention rollout: how attention flows from the input patches to the output.

    For each layer ``l`` from ``start_layer`` to the last:

    1. ``F_l`` = the heads of ``A_l`` fused by elementwise mean, max or min;
    2. the ``discard_ratio`` fraction of the smallest entries of ``F_l`` (per sample,
       over all ``N·N`` entries) is set to 0, never the query rows' own diagonal
       entries;
    3. ``Ã_l = (1 - w)·F_l + w·I`` with ``w = residual_weight``, each row divided by
       its sum (a row that is entirely zero stays zero);
    4. ``R = Ã_L · … · Ã_start``.

    ``R[i, j]`` is how much input token ``j`` flows into output token ``i``.
    :meth:`attribute` returns the query rows of ``R`` (the tokens the head pools) at
    the patch columns. The product is accumulated as the forward pass goes, so only
    one layer's attention is alive at a time, and computed in float32; the forward
    pass stops right after the last attention layer (the rest of the last block and
    the head cannot change the attention), which leaves ``R`` identical. Without
    discarding, :meth:`attribute` needs only the query rows of the last layer: it
    multiplies just those rows onto the product (timm models compute only those rows
    of the last layer's scores), while :meth:`rollout` forms the whole ``R``. Values are raw
    (not normalised). Not class-specific: ``target`` is ignored.

    Args:
        model (nn.Module): a ViT supported by :func:`captum_vit.adapt`.
        head_fusion (str, optional): ``"mean"``, ``"max"`` or ``"min"``.
            Default: "mean"
        discard_ratio (float, optional): fraction in ``[0, 1)`` of smallest entries
            dropped per layer. Default: 0.0
        residual_weight (float, optional): weight ``w`` of the identity (residual
            connection), in ``[0, 1]``. Default: 0.5
        start_layer (int, optional): first layer in the product (negative counts
            from the end). Default: 0
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None

    Example::

        >>> rollout = AttentionRollout(model, head_fusion="max", discard_ratio=0.9)
        >>> attr = rollout.attribute(images)            # (B, C, H, W)
        >>> R = rollout.rollout(images)                 # (B, N, N)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        residual_weight: float = 0.5,
        start_layer: int = 0,
        adapter: ViTAdapter | None = None,
    ) -> None:
        self.adapter = resolve_adapter(model, adapter)
        super().__init__(self.adapter.forward)
        self.model = model
        self.head_fusion = _check_fusion(head_fusion)
        check_rollout_args(discard_ratio, residual_weight)
        self.discard_ratio = float(discard_ratio)
        self.residual_weight = float(residual_weight)
        self.start_layer = _check_layer_index(start_layer, self.adapter.num_layers, "start_layer")

    def _rollout(
        self, x: Tensor, additional_forward_args: Any, *, rows: bool
    ) -> tuple[Tensor, TokenLayout]:
        """``R`` ``(B, N, N)``, or with ``rows`` only its query-weighted row ``(B, N)``
        (the last layer then multiplies its query rows only), and the layout."""
        adapter = self.adapter
        last = adapter.num_layers - 1
        # without discarding, the last layer's query rows are all the product needs
        sliced = rows and self.discard_ratio <= 0
        state: dict[str, Any] = {}

        def on_attention(layer: int, attn: Tensor) -> None:
            if layer < self.start_layer:
                return
            product = _lazy_product(
                state, adapter, x, attn, self.head_fusion, self.discard_ratio, self.residual_weight
            )
            if rows and layer == last:
                weights = adapter._query_weights(state["layout"], attn.device)
                state["rows"] = product.final_rows(
                    attn.detach(), weights, product.protected, sliced=sliced
                )
            else:
                product.update(attn.detach())

        layout = _run_attention_only(
            adapter,
            x,
            _forward_args(additional_forward_args),
            on_attention=on_attention,
            first_layer=self.start_layer,
            query_rows=sliced,
        )
        result = state["rows"] if rows else state["product"].result
        assert result is not None
        _check_finite(result, "AttentionRollout")
        return result, layout

    def rollout(self, inputs: Tensor, additional_forward_args: Any = None) -> Tensor:
        r"""The full rollout matrix.

        Args:
            inputs (Tensor): images ``(B, C, H, W)``.
            additional_forward_args (Any, optional): extra forward arguments.
                Default: None

        Returns:
            Tensor: ``R`` of shape ``(B, N, N)``, float32, all tokens (prefix first).
        """
        x, _ = _unpack_inputs(inputs)
        return self._rollout(x, additional_forward_args, rows=False)[0]

    @log_usage
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        return_patch_grid: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Rollout from the query rows to each patch.

        Args:
            inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)``.
            target (int, list or Tensor, optional): ignored (rollout is not
                class-specific). Default: None
            additional_forward_args (Any, optional): extra forward arguments.
                Default: None
            return_patch_grid (bool, optional): return ``(B, 1, gh, gw)``.
                Default: False

        Returns:
            Tensor or tuple[Tensor]: ``inputs``-shaped map (nearest-neighbour
            upsampled, same in every channel) or ``(B, 1, gh, gw)``.
        """
        x, as_tuple = _unpack_inputs(inputs)
        r, layout = self._rollout(x, additional_forward_args, rows=True)
        maps = _patch_grid(r, layout)
        return _format_output(maps, x, return_patch_grid=return_patch_grid, as_tuple=as_tuple)
