"""GradientRollout: class-specific, gradient-weighted attention (Chefer 2021; jacobgil)."""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import GradientAttribution
from torch import Tensor, nn

from .._capture import TokenLayout, ViTAdapter, resolve_adapter
from .._compat import log_usage
from .._utils import TargetType, _forward_args, _resolve_target, _unpack_inputs
from ._common import (
    _check_fusion,
    _check_layer_index,
    _format_output,
    _query_indices,
    _query_rows,
    _run_captured,
)
from ._rollout import RolloutProduct, check_rollout_args, chefer_update

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
    (no parameter gradients are computed). Works when called under
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
        return self._relevance(x, target, additional_forward_args)[0]

    def _relevance(
        self, x: Tensor, target: TargetType, additional_forward_args: Any
    ) -> tuple[Tensor, TokenLayout]:
        with torch.enable_grad():
            # Inputs that require grad keep every attention map on the autograd path
            # even when the model's parameters are frozen.
            xg = x.detach().requires_grad_(True)
            scores, attns, layout = _run_captured(
                self.adapter, xg, _forward_args(additional_forward_args), keep=True
            )
            t = _resolve_target(target, scores)
            used = [a for a in attns[self.start_layer :] if a is not None]
            score = scores.gather(1, t[:, None]).sum()
            # Attention that does not depend on the input or on any parameter (e.g. a
            # constant map) has zero gradient; autograd refuses to differentiate it.
            live = [i for i, a in enumerate(used) if a.requires_grad]
            grads: list[Tensor | None] = [None] * len(used)
            if live and score.requires_grad:
                found = torch.autograd.grad(score, [used[i] for i in live], allow_unused=True)
                for i, g in zip(live, found, strict=True):
                    grads[i] = g
        relevance: Tensor | None = None
        if self.variant == "chefer":
            for a, maybe_g in zip(used, grads, strict=True):
                g = torch.zeros_like(a) if maybe_g is None else maybe_g
                relevance = chefer_update(relevance, a.detach(), g.detach())
        else:
            product = RolloutProduct(
                self.head_fusion,
                self.discard_ratio,
                self.residual_weight,
                _query_indices(self.adapter, layout, x.device),
            )
            for a, maybe_g in zip(used, grads, strict=True):
                g = torch.zeros_like(a) if maybe_g is None else maybe_g
                product.update((a.detach().float() * g.detach().float()).clamp(min=0))
            relevance = product.result
        assert relevance is not None
        return relevance, layout

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
        r, layout = self._relevance(x, target, additional_forward_args)
        maps = _query_rows(r, self.adapter, layout)
        return _format_output(maps, x, return_patch_grid=return_patch_grid, as_tuple=as_tuple)
