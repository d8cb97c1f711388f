"""ViTGradCam: Grad-CAM (Selvaraju et al. 2017) on the patch tokens of a ViT block."""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import GradientAttribution
from torch import Tensor, nn

from .._capture import ViTAdapter, _thread_forward_hook, resolve_adapter
from .._compat import log_usage
from .._utils import TargetType, _forward_args, _resolve_target, _unpack_inputs
from ._common import _check_layer_index, _format_output

__all__ = ["ViTGradCam"]


class ViTGradCam(GradientAttribution):
    r"""Grad-CAM on the patch tokens of one block's output: the CNN-style baseline.

    With ``T`` the token sequence ``(N, D)`` leaving block ``layer`` (prefix tokens
    dropped, the ``P = gh·gw`` patch tokens read as a ``D``-channel feature map on
    the patch grid) and ``y`` the raw score (logit) of the target class:

    * channel weights ``α_d = mean_p ∂y / ∂T[p, d]`` (mean over the patch tokens,
      Grad-CAM's global-average-pooled gradient);
    * ``cam[p] = Σ_d α_d · T[p, d]``, then ``ReLU`` as in Grad-CAM (``relu=True``;
      ``relu=False`` keeps the signed map).

    Which block: ``layer`` indexes the blocks (negative counts from the end) and the
    block's *output* is used. A head that reads only prefix tokens (CLS-pooled
    models, DeiT distilled) never reads the patch tokens of the last block's output:
    their gradient is exactly zero and so is the map. Therefore the default
    ``layer=-1`` means "the last block whose patch outputs reach the head": the last
    block for heads that pool patch tokens, the second-to-last block for
    prefix-pooled heads (the tokens entering the last block, pytorch-grad-cam's
    usual ViT target ``blocks[-1].norm1`` before its LayerNorm). Any other value
    selects exactly that block; asking explicitly for the last block of a
    prefix-pooled model raises ``ValueError``. The resolved index is ``self.layer``.

    Works for any grid size and prefix count, with one forward and one backward
    pass per batch (no parameter gradients), also when called under
    ``torch.no_grad()``. Values are raw (not normalised).

    Args:
        model (nn.Module): a ViT supported by :func:`captum_vit.adapt` (its adapter
            must know the blocks: detected for timm, Hugging Face and torchvision;
            ``adapt(..., blocks=)`` for custom models).
        layer (int, optional): block index, see above. Default: -1
        relu (bool, optional): apply Grad-CAM's ReLU. Default: True
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None

    Example::

        >>> cam = ViTGradCam(model)
        >>> attr = cam.attribute(images, target=285)            # (B, C, H, W)
        >>> grid = cam.attribute(images, return_patch_grid=True)  # (B, 1, gh, gw)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: int = -1,
        relu: bool = True,
        adapter: ViTAdapter | None = None,
    ) -> None:
        self.adapter = resolve_adapter(model, adapter)
        super().__init__(self.adapter.forward)
        self.model = model
        blocks = self.adapter.blocks
        if blocks is None:
            raise ValueError(
                f"the adapter of {type(model).__name__} does not know its transformer blocks; "
                "pass adapt(model, ..., blocks=[one module per layer whose output is the "
                "token sequence (B, N, D)])"
            )
        self.blocks = blocks
        num = len(blocks)
        prefix_only = self.adapter.pooling in ("cls", "cls_dist")
        if layer == -1 and not isinstance(layer, bool):
            if prefix_only and num < 2:
                raise ValueError(
                    "the model's head reads only prefix tokens and it has a single block: "
                    "no block output's patch tokens reach the head"
                )
            self.layer = num - 2 if prefix_only else num - 1
        else:
            self.layer = _check_layer_index(layer, num, "layer")
            if prefix_only and self.layer == num - 1:
                raise ValueError(
                    f"layer={layer} is the last block, but the model's head reads only prefix "
                    f"tokens ({self.adapter.pooling!r} pooling): the patch tokens of the last "
                    "block's output never reach it and their Grad-CAM is identically zero. "
                    "Use layer=-1 (the block before) or an earlier block."
                )
        self.relu = bool(relu)

    @log_usage
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        return_patch_grid: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Grad-CAM of each patch for the target class.

        Args:
            inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)``.
            target (int, list or Tensor, optional): class per sample (Captum
                style); ``None`` = each sample's predicted class. Default: None
            additional_forward_args (Any, optional): extra forward arguments.
                Default: None
            return_patch_grid (bool, optional): return ``(B, 1, gh, gw)``.
                Default: False

        Returns:
            Tensor or tuple[Tensor]: ``inputs``-shaped map (nearest-neighbour
            upsampled, same in every channel) or ``(B, 1, gh, gw)``.
        """
        x, as_tuple = _unpack_inputs(inputs)
        adapter = self.adapter
        adapter.check_inputs(x)
        captured: list[Tensor] = []

        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            tokens = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(tokens, Tensor) or tokens.ndim != 3:
                raise ValueError(
                    f"block {self.layer} produced {type(tokens).__name__} "
                    f"{tuple(getattr(tokens, 'shape', ()))}; expected the token sequence (B, N, D)"
                )
            captured.append(tokens)

        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            with _thread_forward_hook(self.blocks[self.layer], hook, channel="grad_cam"):
                scores = adapter.forward(xg, *_forward_args(additional_forward_args))
            t = _resolve_target(target, scores)
            if not captured:
                raise RuntimeError(f"block {self.layer} did not run in the forward pass")
            tokens = captured[-1]
            score = scores.gather(1, t[:, None]).sum()
            (grad,) = torch.autograd.grad(score, tokens)
        layout = adapter.layout(x, int(tokens.shape[1]))
        p = layout.num_prefix_tokens
        feats = tokens.detach()[:, p:].float()
        weights = grad.detach()[:, p:].float().mean(dim=1, keepdim=True)  # (B, 1, D)
        cam = (weights * feats).sum(dim=-1)
        if self.relu:
            cam = cam.clamp(min=0)
        maps = cam.reshape(cam.shape[0], *layout.grid)
        return _format_output(maps, x, return_patch_grid=return_patch_grid, as_tuple=as_tuple)
