"""GradientRollout: class-specific, gradient-weighted attention (Chefer 2021; jacobgil)."""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import GradientAttribution
from torch import Tensor, nn

from .._capture import LayerGrad, TokenLayout, ViTAdapter, resolve_adapter
from .._compat import log_usage
from .._utils import TargetType, _forward_args, _resolve_target, _unpack_inputs
from ._common import (
    _check_finite,
    _check_fusion,
    _check_layer_index,
    _format_output,
    _query_indices,
)
from ._rollout import BackwardProduct, RolloutProduct, check_rollout_args, fuse_grad_weighted

__all__ = ["GradientRollout"]

_VARIANTS = ("chefer", "rollout")


class GradientRollout(GradientAttribution):
    r"""Class-specific relevance from attention weighted by its gradient.

    With ``A_l`` the attention probabilities of layer ``l`` and
    ``G_l = ∂ y_target / ∂ A_l`` (gradients of layer ``l`` paired with layer ``l``'s
    attention):

    * ``variant="chefer"`` (Chefer et al., ICCV 2021, generic attention
      explainability): ``R = I``; for each layer from ``start_layer``,
      ``Ā_l = mean_heads((G_l ⊙ A_l)⁺)`` and ``R = R + Ā_l · R``.
      ``head_fusion``, ``discard_ratio`` and ``residual_weight`` do not enter this
      formula; passing non-default values with it raises ``ValueError``.
    * ``variant="rollout"`` (jacobgil / Das & Huddar):
      ``F_l = fuse_heads((G_l ⊙ A_l)⁺)``, then discard, residual and product as in
      :class:`AttentionRollout`.

    The map is the query rows of ``R`` at the patch columns. One forward and one
    backward pass per batch; gradients flow only down to the first attention map
    used (no parameter gradients are computed). The model keeps its fused attention
    (``F.scaled_dot_product_attention``) in the forward pass; during the backward
    pass each layer's probabilities are recomputed from its queries and keys, a few
    heads at a time, together with ``G_l = dO_l · V_lᵀ`` from the gradient of the
    attention output, used for the product and dropped: the product is multiplied
    from the last layer down (the query row times ``I + Ā_l``, or times ``Ã_l``), so
    the memory it adds to a plain backward pass does not grow with depth (see
    :meth:`ViTAdapter.stream_attention_grads`). :meth:`relevance` keeps the full
    ``(N, N)`` product instead of the query row. Works when called under
    ``torch.no_grad()``. ``y_target`` is the raw score (logit) of the target class.

    Args:
        model (nn.Module): a ViT supported by :func:`captum_vit.adapt`.
        variant (str, optional): ``"chefer"`` or ``"rollout"``. Default: "chefer"
        head_fusion (str, optional): ``"mean"``, ``"max"`` or ``"min"`` (rollout
            variant). Default: "mean"
        discard_ratio (float, optional): rollout variant only. Default: 0.0
        residual_weight (float, optional): rollout variant only. Default: 0.5
        start_layer (int, optional): first layer used. Default: 0
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None

    Example::

        >>> explainer = GradientRollout(model, variant="chefer")
        >>> cat = explainer.attribute(images, target=281)
        >>> dog = explainer.attribute(images, target=243)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        variant: str = "chefer",
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        residual_weight: float = 0.5,
        start_layer: int = 0,
        adapter: ViTAdapter | None = None,
    ) -> None:
        self.adapter = resolve_adapter(model, adapter)
        super().__init__(self.adapter.forward)
        self.model = model
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.head_fusion = _check_fusion(head_fusion)
        check_rollout_args(discard_ratio, residual_weight)
        if variant == "chefer" and (
            head_fusion != "mean" or discard_ratio != 0.0 or residual_weight != 0.5
        ):
            raise ValueError(
                "variant='chefer' averages heads and uses no discard or residual weight; "
                "use variant='rollout' for head_fusion / discard_ratio / residual_weight"
            )
        self.discard_ratio = float(discard_ratio)
        self.residual_weight = float(residual_weight)
        self.start_layer = _check_layer_index(start_layer, self.adapter.num_layers, "start_layer")

    def relevance(
        self,
        inputs: Tensor,
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        r"""The full relevance matrix ``R``.

        Args:
            inputs (Tensor): images ``(B, C, H, W)``.
            target (int, list or Tensor, optional): class per sample; ``None`` = the
                predicted class. Default: None
            additional_forward_args (Any, optional): extra forward arguments.
                Default: None

        Returns:
            Tensor: ``(B, N, N)`` float32.
        """
        x, _ = _unpack_inputs(inputs)
        return self._relevance(x, target, additional_forward_args, full=True)[0]

    def _relevance(
        self, x: Tensor, target: TargetType, additional_forward_args: Any, *, full: bool
    ) -> tuple[Tensor, TokenLayout]:
        """``R`` (``full``: ``(B, N, N)``) or its query-weighted row ``(B, 1, N)``.

        Streamed: each layer's ``(G ⊙ A)⁺`` is fused and multiplied onto ``R`` from
        the last layer down as the backward pass reaches it, so at most one layer's
        maps (a few heads at a time) are alive; see
        :meth:`ViTAdapter.stream_attention_grads`.
        """
        adapter = self.adapter
        adapter.check_inputs(x)
        chefer = self.variant == "chefer"
        last = adapter.num_layers - 1
        state: dict[str, Any] = {}

        def combine(r: Tensor, m: Tensor) -> Tensor:
            # Chefer: R ← (I + Ā_l) R, read from the left: row·(I + Ā_l); rollout: row·Ã_l
            return r + torch.matmul(r, m) if chefer else torch.matmul(r, m)

        product = BackwardProduct(self.start_layer, last, combine)

        def on_layer(grad: LayerGrad) -> None:
            fused = fuse_grad_weighted(grad, "mean" if chefer else self.head_fusion)
            product.push(grad.layer, fused if chefer else state["rollout"].fused_matrix(fused))

        args = _forward_args(additional_forward_args)
        for materialize in (False, True):
            with torch.enable_grad(), adapter.stream_attention_grads(
                on_layer, first_layer=self.start_layer, materialize=materialize
            ) as stream:
                # Inputs that require grad keep every attention map on the autograd
                # path even when the model's parameters are frozen.
                xg = x.detach().requires_grad_(True)
                scores = adapter.forward(xg, *args)
                missing = [i for i in range(adapter.num_layers) if i not in stream.seen]
                if missing and not materialize:
                    continue  # attention that neither calls SDPA nor exposes it: run unfused
                if stream.num_tokens is None or missing:
                    raise RuntimeError(
                        f"no attention was captured for layer(s) {missing}: the forward pass "
                        "did not run those attention modules (are they part of the model's "
                        "forward?)"
                    )
                layout = adapter.layout(x, stream.num_tokens)
                t = _resolve_target(target, scores)
                n, batch = layout.num_tokens, int(x.shape[0])
                if not chefer:
                    state["rollout"] = RolloutProduct(
                        self.head_fusion, self.discard_ratio, self.residual_weight,
                        _query_indices(adapter, layout, x.device),
                    )
                if full:
                    product.start(torch.eye(n, device=x.device).expand(batch, n, n))
                else:
                    w = adapter.query_weights(layout, device=x.device)
                    product.start(w.expand(batch, 1, n))
                score = scores.gather(1, t[:, None]).sum()
                stream.backward(score)
            break

        def no_gradient(_layer: int) -> Tensor | None:
            if chefer:
                return None  # Ā_l = 0: R unchanged
            return state["rollout"].fused_matrix(torch.zeros(batch, n, n, device=x.device))

        return product.finish(no_gradient), layout

    @log_usage
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        return_patch_grid: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Class-specific relevance of each patch.

        Args:
            inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)``.
            target (int, list or Tensor, optional): class per sample (Captum
                style); ``None`` = each sample's predicted class. Default: None
            additional_forward_args (Any, optional): extra forward arguments.
                Default: None
            return_patch_grid (bool, optional): return ``(B, 1, gh, gw)``.
                Default: False

        Returns:
            Tensor or tuple[Tensor]: ``inputs``-shaped map or ``(B, 1, gh, gw)``.
        """
        x, as_tuple = _unpack_inputs(inputs)
        r, layout = self._relevance(x, target, additional_forward_args, full=False)
        maps = r[:, 0, layout.num_prefix_tokens :].reshape(-1, *layout.grid)
        _check_finite(maps, "GradientRollout")
        return _format_output(maps, x, return_patch_grid=return_patch_grid, as_tuple=as_tuple)
