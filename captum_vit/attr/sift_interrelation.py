"""SiftInterrelation: Wu et al.'s SIFT-weighted patch interrelation of ViT attention."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from captum.attr import Attribution
from torch import Tensor, nn

from .._capture import ViTAdapter, _validate_attention, resolve_adapter
from .._compat import log_usage
from .._interrelation import (
    InterrelationResult,
    _nanmean,
    _summary_stages,
    interrelation_stats,
)
from .._sift import Unnormalize, keypoint_counts, unnormalize_inputs
from .._utils import TargetType, _forward_args, _unpack_inputs
from ._common import _format_output, _run_captured

__all__ = ["SiftInterrelation"]


class SiftInterrelation(Attribution):
    r"""Weighted patch interrelation (Wu et al., "Demystify Self-Attention in Vision
    Transformers from a Semantic Perspective"): do patches rich in SIFT keypoints
    attend to each other?

    On the patch-to-patch block ``α`` of each layer's and head's attention (prefix
    rows and columns dropped), with ``t_j`` the number of SIFT keypoints in patch
    ``j`` of the image the model sees:

    * ``H_i = gamma · mean_j α_ij``, ``S_i = {j : α_ij ≥ H_i}``;
    * ``θ_i = Σ_{j∈S_i, t_j>0} t_j / (|{j∈S_i : t_j=0}| + Σ_{j∈S_i, t_j>0} t_j)``
      (NaN when ``S_i`` is empty, possible only for gamma > 1);
    * ``θ_KK`` / ``θ_NK``: mean θ_i over start patches with / without keypoints
      (NaN θ_i skipped, NaN for an empty group); ``θ_KN = 1 − θ_KK``,
      ``θ_NN = 1 − θ_NK``;
    * focus index: mean over start patches of the entropy (nats) of the min-max
      scaled, renormalised row; a constant row counts as uniform (``log P``).

    See :func:`captum_vit.interrelation.interrelation_stats` for the exact
    computation and :func:`captum_vit.interrelation.detect_stages` for the stages.

    Args:
        model (nn.Module): a ViT supported by :func:`captum_vit.adapt`.
        gamma (float, optional): detection-line factor (> 0). Default: 1.0
        adapter (ViTAdapter, optional): a prebuilt adapter for ``model``.
            Default: None (auto-detect)
        unnormalize (Callable or (mean, std), optional): inverts the model's input
            normalisation so that SIFT sees the image in [0, 1]: a function
            ``(B, C, H, W) -> (B, C, H, W)`` or per-channel ``(mean, std)``.
            Default: None (ImageNet mean and std)
        sift_options (Mapping[str, Any], optional): keyword arguments for
            ``cv2.SIFT_create`` (an addition to the DESIGN signature).
            Default: None (OpenCV defaults)

    Example::

        >>> explainer = SiftInterrelation(model)
        >>> res = explainer.analyze(images)         # InterrelationResult
        >>> res.kk.shape, res.stages                 # (B, L, heads), Stages(...)
        >>> scores = explainer.attribute(images)     # patch scores as an input-shaped map
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        gamma: float = 1.0,
        adapter: ViTAdapter | None = None,
        unnormalize: Unnormalize = None,
        sift_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.adapter = resolve_adapter(model, adapter)
        super().__init__(self.adapter.forward)
        self.model = model
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma > 0:
            raise ValueError(f"gamma must be a positive number, got {gamma!r}")
        self.gamma = float(gamma)
        if unnormalize is not None and not callable(unnormalize) and not (
            isinstance(unnormalize, tuple) and len(unnormalize) == 2
        ):
            raise TypeError("unnormalize must be None, a callable or a (mean, std) pair")
        self.unnormalize = unnormalize
        if sift_options is not None and not isinstance(sift_options, Mapping):
            raise TypeError("sift_options must be a mapping of cv2.SIFT_create keyword arguments")
        self.sift_options = dict(sift_options or {})

    # ------------------------------------------------------------------ keypoints
    def keypoint_counts(self, images: Tensor | np.ndarray) -> Tensor:
        r"""SIFT keypoints in each patch of the model's patch grid.

        Args:
            images (Tensor or ndarray): the images the model sees, before
                normalisation: uint8 ``(H, W, C)`` / ``(B, H, W, C)``, or float
                ``(C, H, W)`` / ``(B, C, H, W)`` in [0, 1].

        Returns:
            Tensor: int64 ``(B, gh * gw)``.
        """
        if isinstance(images, (Tensor, np.ndarray)) and images.ndim >= 2:
            is_float = (
                images.is_floating_point()
                if isinstance(images, Tensor)
                else np.issubdtype(images.dtype, np.floating)
            )
            if is_float:
                h, w = int(images.shape[-2]), int(images.shape[-1])
            elif images.ndim == 2:
                h, w = int(images.shape[0]), int(images.shape[1])
            else:
                h, w = int(images.shape[-3]), int(images.shape[-2])
        else:
            raise TypeError("images must be a tensor or numpy array of images")
        grid = self.adapter.grid_size(torch.zeros(1, 1, h, w))
        return keypoint_counts(
            images, self.adapter.patch_size, grid=grid, sift_options=self.sift_options
        )

    # ------------------------------------------------------------------ analysis
    def analyze(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        images: Tensor | np.ndarray | None = None,
        additional_forward_args: Any = None,
    ) -> InterrelationResult:
        r"""Interrelation statistics of every layer and head for a batch.

        One forward pass; each layer's attention is reduced to its statistics as the
        pass goes (no layer's attention is kept).

        Args:
            inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)`` as the model
                takes them (normalised).
            images (Tensor or ndarray, optional): the same images before
                normalisation (uint8 ``(B, H, W, C)`` or float ``(B, C, H, W)`` in
                [0, 1], same height and width as ``inputs``) for SIFT. Default: None
                (``unnormalize`` applied to ``inputs``)
            additional_forward_args (Any, optional): extra forward arguments.
                Default: None

        Returns:
            InterrelationResult: ``theta (B, L, heads, P)``, ``kk``, ``nk``, ``kn``,
            ``nn``, ``focus_index`` ``(B, L, heads)``, ``keypoint_counts (B, P)``,
            ``stages`` (of the batch-mean curves), ``patch_scores (B, P)``.
        """
        x, _ = _unpack_inputs(inputs)
        self.adapter.check_inputs(x)
        grid = self.adapter.grid_size(x)
        p = grid[0] * grid[1]
        if images is None:
            counts = self.keypoint_counts(unnormalize_inputs(x, self.unnormalize))
        else:
            counts = self.keypoint_counts(images)
        if counts.shape != (x.shape[0], p):
            raise ValueError(
                f"images give keypoint counts of shape {tuple(counts.shape)} but the inputs need "
                f"{(int(x.shape[0]), p)}: pass the same images, at the model's input size, before "
                "normalisation"
            )
        counts_dev = counts.to(x.device)
        per_layer: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

        def on_attention(layer: int, attn: Tensor) -> None:
            # the capture's full row-sum check would read every layer's attention twice;
            # checking the shape and the rows of the first sample's first head is enough
            # to catch modules that do not output probabilities
            _validate_attention(layer, attn, check_rows=False)
            _validate_attention(layer, attn[:1, :1], check_rows=True)
            prefix = int(attn.shape[-1]) - p
            if prefix < 0:
                raise ValueError(
                    f"attention has {attn.shape[-1]} tokens, fewer than the {p} patches of the "
                    "grid: check the adapter's patch_size"
                )
            alpha = attn.detach()[..., prefix:, prefix:]
            per_layer[layer] = interrelation_stats(alpha, counts_dev, self.gamma)

        with torch.no_grad():
            _run_captured(
                self.adapter, x, _forward_args(additional_forward_args), keep=False,
                on_attention=on_attention, validate=False,
            )
        layers = [per_layer[i] for i in range(self.adapter.num_layers)]
        theta = torch.stack([s[0] for s in layers], dim=1)
        kk = torch.stack([s[1] for s in layers], dim=1)
        nk = torch.stack([s[2] for s in layers], dim=1)
        focus = torch.stack([s[3] for s in layers], dim=1)
        return InterrelationResult(
            theta=theta,
            kk=kk,
            nk=nk,
            kn=1.0 - kk,
            nn=1.0 - nk,
            focus_index=focus,
            keypoint_counts=counts,
            stages=_summary_stages(kk, nk, focus),
            patch_scores=_nanmean(theta, (1, 2)),
            grid=grid,
        )

    @log_usage
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        images: Tensor | np.ndarray | None = None,
        return_patch_grid: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Patch scores (θ_i averaged over layers and heads) as an attribution map.

        A high score means the patch's attention goes mostly to keypoint patches.
        Values are raw θ in [0, 1]; NaN only where θ_i is undefined in every layer
        and head (gamma > 1).

        Args:
            inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)`` (normalised).
            target (int, list or Tensor, optional): ignored (not class-specific).
                Default: None
            additional_forward_args (Any, optional): extra forward arguments.
                Default: None
            images (Tensor or ndarray, optional): un-normalised images for SIFT, as
                in :meth:`analyze`. Default: None
            return_patch_grid (bool, optional): return ``(B, 1, gh, gw)``.
                Default: False

        Returns:
            Tensor or tuple[Tensor]: ``inputs``-shaped map (or ``(B, 1, gh, gw)``);
            a tuple when ``inputs`` was a tuple.
        """
        x, as_tuple = _unpack_inputs(inputs)
        res = self.analyze(x, images=images, additional_forward_args=additional_forward_args)
        maps = res.patch_scores.reshape(-1, *res.grid)
        return _format_output(maps, x, return_patch_grid=return_patch_grid, as_tuple=as_tuple)
