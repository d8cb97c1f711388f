"""Patch-token masks: random, centre, score-guided and SIFT-guided (MAE-style)."""

import math
from typing import Literal, overload

import torch
from torch import Tensor

from ._sift_masking import sift_curriculum, sift_guided_mask

__all__: list[str] = [
    "center_mask",
    "mask_count",
    "random_mask",
    "score_mask",
    "sift_curriculum",
    "sift_guided_mask",
]


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a number in [0, 1], got {type(ratio).__name__}")
    if not 0.0 <= float(ratio) <= 1.0 or math.isnan(ratio):
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return float(ratio)


def mask_count(num_patches: int, ratio: float) -> int:
    """Number of patches masked for ``ratio``: ``floor(ratio * num_patches + 0.5)``.

    Round half up (not Python's banker's rounding), so every mask function of this
    module masks the same count for the same ratio.

    Args:
        num_patches (int): patches in the grid, ``gh * gw``.
        ratio (float): fraction in ``[0, 1]``.

    Returns:
        int: the count, in ``[0, num_patches]``.

    Example::

        >>> mask_count(196, 0.3)
        59
    """
    if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 1:
        raise ValueError(f"num_patches must be a positive int, got {num_patches!r}")
    return min(num_patches, math.floor(_check_ratio(ratio) * num_patches + 0.5))


def random_mask(
    batch: int, num_patches: int, ratio: float, generator: torch.Generator | None = None
) -> Tensor:
    """Uniformly random patch masks with exactly :func:`mask_count` patches per sample.

    Args:
        batch (int): number of masks ``B`` (one per sample, drawn independently).
        num_patches (int): patches per image, ``gh * gw``.
        ratio (float): fraction of patches to mask, in ``[0, 1]``.
        generator (torch.Generator, optional): source of randomness, for repeatable
            masks (the masks are created on the generator's device). Default: None
            (torch's global generator)

    Returns:
        Tensor: bool ``(B, num_patches)``, ``True`` = masked, exactly
        ``mask_count(num_patches, ratio)`` ``True`` values in every row.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> mask = random_mask(4, 196, 0.3, generator=g)
        >>> mask.sum(1)
        tensor([59, 59, 59, 59])
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    k = mask_count(num_patches, ratio)
    device = generator.device if generator is not None else None
    order = torch.rand(batch, num_patches, generator=generator, device=device).argsort(dim=1)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool, device=order.device)
    mask.scatter_(1, order[:, :k], True)
    return mask


@overload
def center_mask(
    grid: int | tuple[int, int], ratio: float, *, return_ratio: Literal[False] = False
) -> Tensor: ...


@overload
def center_mask(
    grid: int | tuple[int, int], ratio: float, *, return_ratio: Literal[True]
) -> tuple[Tensor, float]: ...


def center_mask(
    grid: int | tuple[int, int], ratio: float, *, return_ratio: bool = False
) -> Tensor | tuple[Tensor, float]:
    """A contiguous centred square of patches, its area as close to ``ratio`` as possible.

    The side ``s`` (``0 <= s <= min(gh, gw)``) minimises ``|s*s / (gh*gw) - ratio|``
    (the smaller side on a tie); the square starts at row ``(gh - s) // 2`` and column
    ``(gw - s) // 2`` (one patch up/left of centre when the margin is odd). The ratio
    actually masked, ``s*s / (gh*gw)``, usually differs from ``ratio`` (e.g. 0.30 on
    14x14 gives an 8x8 square, 0.327): ask for it with ``return_ratio=True``.

    Args:
        grid (int or tuple[int, int]): the patch grid ``(gh, gw)`` (an int for square).
        ratio (float): wanted fraction of masked patches, in ``[0, 1]``.
        return_ratio (bool, optional): also return the actual ratio. Default: False

    Returns:
        Tensor or (Tensor, float): bool ``(gh*gw,)`` mask (row-major, ``True`` =
        masked; the same for every image, which :func:`captum_vit._token_masking.masked_forward`
        and ``PatchOcclusion.forward_masked`` accept as is), and with
        ``return_ratio=True`` the actual ratio ``s*s / (gh*gw)``.

    Example::

        >>> mask, actual = center_mask((14, 14), 0.3, return_ratio=True)
        >>> int(mask.sum()), round(actual, 3)
        (64, 0.327)
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must be positive, got {grid!r}")
    ratio = _check_ratio(ratio)
    total = gh * gw
    side = min(range(min(gh, gw) + 1), key=lambda s: (abs(s * s / total - ratio), s))
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    top, left = (gh - side) // 2, (gw - side) // 2
    mask[top : top + side, left : left + side] = True
    flat = mask.reshape(-1)
    return (flat, side * side / total) if return_ratio else flat


def score_mask(scores: Tensor, ratio: float, largest: bool = True) -> Tensor:
    """Mask the patches with the highest (or lowest) scores, e.g. of a rollout map.

    Args:
        scores (Tensor): per-patch scores ``(B, P)``, ``(B, gh, gw)`` or a patch-grid
            attribution ``(B, 1, gh, gw)`` (``attribute(..., return_patch_grid=True)``).
        ratio (float): fraction of patches to mask, in ``[0, 1]``; the count is
            :func:`mask_count`.
        largest (bool, optional): mask the highest scores (``True``, "most attended
            first") or the lowest. Ties go to the lower patch index. Default: True

    Returns:
        Tensor: bool ``(B, P)``, ``True`` = masked, exactly ``mask_count(P, ratio)``
        per row.

    Example::

        >>> rollout = captum_vit.AttentionRollout(model)
        >>> grid = rollout.attribute(images, return_patch_grid=True)   # (B, 1, 14, 14)
        >>> mask = score_mask(grid, 0.5, largest=False)                 # least attended
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a tensor, got {type(scores).__name__}")
    if scores.ndim == 4 and scores.shape[1] == 1:
        scores = scores.flatten(1)
    elif scores.ndim == 3:
        scores = scores.flatten(1)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(
            f"scores must be (B, P), (B, gh, gw) or (B, 1, gh, gw); got shape {tuple(scores.shape)}"
        )
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    k = mask_count(int(scores.shape[1]), ratio)
    order = torch.argsort(scores, dim=1, descending=largest, stable=True)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, order[:, :k], True)
    return mask
