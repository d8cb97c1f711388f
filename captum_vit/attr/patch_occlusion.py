"""PatchOcclusion: token-level occlusion of patch windows (Toseef 2025)."""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import PerturbationAttribution
from torch import Tensor, nn

from .._capture import ViTAdapter, resolve_adapter
from .._compat import log_usage
from .._progress import progress
from .._token_masking import _masked_forward, check_replacement, masked_forward
from .._utils import TargetType, _forward_args, _repeat_args, _resolve_target, _unpack_inputs
from ._common import _format_output

__all__ = ["PatchOcclusion"]


def _window_pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        items: tuple[Any, ...] = (value, value)
    elif isinstance(value, (tuple, list)):
        items = tuple(value)
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if items[0] < 1 or items[1] < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return (int(items[0]), int(items[1]))


def _starts(size: int, window: int, stride: int) -> list[int]:
    """Window start positions along one axis; the last window is aligned to the edge."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _window_masks(
    grid: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]
) -> Tensor:
    """All window masks over the grid: bool ``(num_windows, gh*gw)``, row-major order."""
    gh, gw = grid
    wh, ww = window
    if wh > gh or ww > gw:
        raise ValueError(f"window {wh}x{ww} is larger than the {gh}x{gw} patch grid")
    masks = []
    for top in _starts(gh, wh, stride[0]):
        for left in _starts(gw, ww, stride[1]):
            m = torch.zeros(gh, gw, dtype=torch.bool)
            m[top : top + wh, left : left + ww] = True
            masks.append(m.reshape(-1))
    return torch.stack(masks)


class PatchOcclusion(PerturbationAttribution):
    r"""Token-level occlusion: how much the target score drops when patch tokens are hidden.

    Instead of painting pixels (Captum's ``Occlusion``), the selected patch tokens are
    changed after the patch embedding (see :mod:`captum_vit._token_masking`):

    * ``replacement="zero"``: the patch embedding is set to 0 before position
      embeddings are added (the token keeps its position; Toseef 2025);
    * ``"mean"``: replaced by the image's mean patch embedding;
    * ``"drop"``: the token is removed from the sequence (fewer tokens: faster). Not
      possible for models with rotary position embeddings (timm EVA).

    :meth:`attribute` slides a ``window x window`` block of patches over the patch
    grid with ``stride`` and, for each position, computes
    ``score_target(unmasked) - score_target(window masked)``; each patch gets the mean
    over the windows that cover it. Values are raw (positive: hiding the patch lowers
    the target score). Cost: one forward pass per window position (``window=1``:
    ``gh*gw`` passes) plus the unmasked pass, in chunks of ``perturbations_per_eval``
    windows; that is the same number of passes as Captum's ``Occlusion`` over the same
    windows, so the time is that of the model's forward passes (``"drop"`` passes are
    shorter by the masked tokens). No exact method can do much better: the first
    block's attention mixes the changed token into every token, so only the patch
    embedding, the first block's projections of the unchanged tokens and the last
    block's rows that the head does not read could be skipped, under 10 % of a
    ViT-B/16 forward pass (a 1.11x bound, ``benchmarks/bench_occlusion.py``).

    Works on any model :func:`captum_vit.adapt` can describe with a patch embedding /
    token module, including windowed-attention models described by hand, since no
    attention is read.

    Args:
        model (nn.Module): a ViT supported by :func:`captum_vit.adapt`.
        replacement (str, optional): ``"zero"``, ``"mean"`` or ``"drop"``.
            Default: "zero"
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None

    Example::

        >>> occlusion = PatchOcclusion(model, replacement="zero")
        >>> attr = occlusion.attribute(images, target=285, perturbations_per_eval=16)
        >>> logits = occlusion.forward_masked(images, captum_vit.masking.center_mask(14, 0.3))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        replacement: str = "zero",
        adapter: ViTAdapter | None = None,
    ) -> None:
        self.adapter = resolve_adapter(model, adapter)
        super().__init__(self.adapter.forward)
        self.model = model
        self.replacement = check_replacement(replacement)

    def forward_masked(
        self, inputs: Tensor, mask: Tensor, additional_forward_args: Any = None
    ) -> Tensor:
        r"""The model's scores with the masked patch tokens replaced (or dropped).

        Args:
            inputs (Tensor): images ``(B, C, H, W)``.
            mask (Tensor): bool ``(B, gh*gw)``, ``True`` = masked (also ``(B, gh, gw)``,
                or ``(gh*gw,)`` applied to every sample, e.g. from
                :func:`captum_vit.masking.center_mask`).
            additional_forward_args (Any, optional): extra forward arguments.
                Default: None

        Returns:
            Tensor: scores ``(B, classes)`` (logits; Hugging Face outputs unwrapped).
            Runs under ``torch.no_grad()``.
        """
        x, _ = _unpack_inputs(inputs)
        with torch.no_grad():
            return masked_forward(
                self.adapter, x, mask, self.replacement, _forward_args(additional_forward_args)
            )

    @log_usage
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        window: int | tuple[int, int] = 1,
        stride: int | tuple[int, int] | None = None,
        perturbations_per_eval: int = 1,
        show_progress: bool = False,
        return_patch_grid: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Occlusion map over the patch grid.

        Args:
            inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)``.
            target (int, list or Tensor, optional): class per sample (Captum style);
                ``None`` = each sample's predicted class (unmasked). Default: None
            additional_forward_args (Any, optional): extra forward arguments; tensors
                whose first dimension is ``B`` are repeated with the perturbed batch.
                Default: None
            window (int or (int, int), optional): window size in patches.
                Default: 1
            stride (int or (int, int), optional): step between windows in patches;
                ``None`` = 1 (as Captum's ``Occlusion``), so every patch is covered by
                up to ``window**2`` windows. A last window aligned to the grid's edge is
                added when the stride does not reach it, so every patch is covered.
                Default: None
            perturbations_per_eval (int, optional): windows evaluated per forward pass
                (the pass holds ``B * perturbations_per_eval`` images). Changes speed and
                memory, not values. Default: 1
            show_progress (bool, optional): progress bar over forward passes.
                Default: False
            return_patch_grid (bool, optional): return ``(B, 1, gh, gw)``.
                Default: False

        Returns:
            Tensor or tuple[Tensor]: ``inputs``-shaped map (each patch's value on its
            pixels, every channel) or ``(B, 1, gh, gw)``; a tuple when ``inputs`` was one.
        """
        x, as_tuple = _unpack_inputs(inputs)
        if (
            isinstance(perturbations_per_eval, bool)
            or not isinstance(perturbations_per_eval, int)
            or perturbations_per_eval < 1
        ):
            raise ValueError(
                f"perturbations_per_eval must be a positive int, got {perturbations_per_eval!r}"
            )
        win = _window_pair(window, "window")
        step = _window_pair(1 if stride is None else stride, "stride")
        args = _forward_args(additional_forward_args)
        adapter = self.adapter
        grid = adapter.grid_size(x)
        windows = _window_masks(grid, win, step).to(x.device)  # (W, P)
        batch, patches = int(x.shape[0]), grid[0] * grid[1]
        with torch.no_grad():
            base = masked_forward(adapter, x, None, self.replacement, args)
            tgt = _resolve_target(target, base)
            base_score = base.gather(1, tgt[:, None])[:, 0].float()  # (B,)
            total = torch.zeros(batch, patches, dtype=torch.float32, device=x.device)
            chunks = range(0, windows.shape[0], perturbations_per_eval)
            bar = (
                progress(desc=f"{type(self).__name__} attribution", total=len(chunks))
                if show_progress
                else None
            )
            try:
                for start in chunks:
                    win_masks = windows[start : start + perturbations_per_eval]  # (k, P)
                    k = int(win_masks.shape[0])
                    # perturbation-major layout, as Captum: [window 0 x all samples, ...]
                    mask = win_masks.repeat_interleave(batch, dim=0)
                    xs = x.repeat(k, 1, 1, 1) if k > 1 else x
                    scores = _masked_forward(  # x was checked by the unmasked pass
                        adapter, xs, mask, self.replacement, _repeat_args(args, batch, k)
                    )
                    picked = scores.gather(1, tgt.repeat(k)[:, None])[:, 0].float()
                    drop = base_score.repeat(k) - picked  # (k*B,)
                    total += (drop.view(k, batch, 1) * win_masks.view(k, 1, patches)).sum(0)
                    if bar is not None:
                        bar.update()
            finally:
                if bar is not None:
                    bar.close()
            counts = windows.sum(0).float()  # (P,), every patch >= 1
            maps = (total / counts).view(batch, *grid)
        return _format_output(maps, x, return_patch_grid=return_patch_grid, as_tuple=as_tuple)

