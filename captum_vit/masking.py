"""Patch-token masks: random, centre, score-guided and SIFT-guided (MAE-style), and
:func:`masked_forward`, the forward pass with masked patch tokens (defined in
:mod:`captum_vit._token_masking`, public here)."""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor

from ._token_masking import masked_forward

__all__: list[str] = [
    "center_mask",
    "mask_count",
    "masked_forward",
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


# ------------------------------------------------------------- SIFT-guided (Wu et al.)

def _ranks_within(keys: Tensor, member: Tensor) -> Tensor:
    """Rank (0, 1, ...) of each entry among the members of its row, by ascending key;
    non-members get ranks after every member."""
    keyed = torch.where(member, keys, keys + 2.0)  # keys in [0, 1): members sort first
    order = keyed.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand_as(order))
    return ranks


def sift_guided_mask(
    keypoint_counts: Tensor,
    ratio: float,
    beta: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""MAE-style random masks in which a fraction ``beta`` of the masked patches are
    keypoint patches.

    Per sample, ``m = mask_count(P, ratio)`` patches (``ratio · P`` rounded half up,
    as every mask of :mod:`captum_vit.masking`) are masked exactly, of which
    ``floor(beta · m + 0.5)`` are drawn uniformly among the patches with at least one
    keypoint and the rest uniformly among the patches without keypoints.

    Fallback when a sample has too few patches of one kind: all of that kind are
    masked and the remainder is drawn from the other kind, so the masked count is
    always exactly ``m`` (the achieved keypoint fraction is then as close to
    ``beta`` as the image allows).

    Args:
        keypoint_counts (Tensor): ``(B, P)`` SIFT keypoints per patch (e.g.
            :meth:`captum_vit.SiftInterrelation.keypoint_counts`).
        ratio (float): fraction of patches to mask, in [0, 1].
        beta (float): fraction of the masked patches that are keypoint patches, in
            [0, 1].
        generator (torch.Generator, optional): for reproducible masks. Default: None

    Returns:
        Tensor: bool ``(B, P)``, True = masked.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> mask = sift_guided_mask(counts, ratio=0.75, beta=0.3, generator=g)
        >>> mask.sum(1)        # mask_count(P, 0.75) for every sample
    """
    if not isinstance(keypoint_counts, Tensor) or keypoint_counts.ndim != 2:
        raise ValueError("keypoint_counts must be a tensor (B, P)")
    if keypoint_counts.is_floating_point() and torch.isnan(keypoint_counts).any():
        raise ValueError("keypoint_counts contain NaN")
    if (keypoint_counts < 0).any():
        raise ValueError("keypoint_counts must be non-negative")
    for name, value in (("ratio", ratio), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    b, p = keypoint_counts.shape
    device = keypoint_counts.device

    m = mask_count(p, float(ratio)) if p > 0 else 0
    want_k = math.floor(beta * m + 0.5)
    is_kp = keypoint_counts > 0
    n_kp = is_kp.sum(1)
    n_nk = p - n_kp
    take_n = n_nk.clamp(max=m - want_k)
    take_k = (m - take_n).clamp(max=n_kp)  # fallback: fill from keypoint patches
    take_n = m - take_k
    gen_device = generator.device if generator is not None else device
    keys = torch.rand(b, p, generator=generator, device=gen_device).to(device)
    rank_k = _ranks_within(keys, is_kp)
    rank_n = _ranks_within(keys, ~is_kp)
    return (is_kp & (rank_k < take_k[:, None])) | (~is_kp & (rank_n < take_n[:, None]))


def sift_curriculum(
    step: int,
    total_steps: int,
    *,
    start: float = 0.1,
    end: float = 0.5,
    num_levels: int = 5,
) -> float:
    r"""The keypoint fraction ``beta`` for a training step: a staircase from
    ``start`` to ``end``.

    Training is split into ``num_levels`` equal phases; phase ``k`` (0-based) uses
    ``beta = start + (end - start) · k / (num_levels - 1)``. With the defaults (the
    paper's 0.1 → 0.5) beta is 0.1, 0.2, 0.3, 0.4, 0.5 over five equal phases.
    Steps at or beyond ``total_steps`` get ``end``.

    Args:
        step (int): current step, ``>= 0``.
        total_steps (int): steps in the whole schedule, ``> 0``.
        start (float, optional): beta of the first phase. Default: 0.1
        end (float, optional): beta of the last phase. Default: 0.5
        num_levels (int, optional): number of phases (``1`` gives ``end``
            throughout). Default: 5

    Returns:
        float: beta for this step.

    Example::

        >>> [sift_curriculum(s, 100) for s in (0, 25, 50, 99)]
        [0.1, 0.2, 0.3, 0.5]
    """
    for name, value in (("step", step), ("total_steps", total_steps), ("num_levels", num_levels)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if step < 0 or total_steps <= 0 or num_levels <= 0:
        raise ValueError(
            f"need step >= 0, total_steps > 0 and num_levels > 0; got {step}, {total_steps}, "
            f"{num_levels}"
        )
    if not (0 <= start <= 1 and 0 <= end <= 1):
        raise ValueError(f"start and end must lie in [0, 1], got {start} and {end}")
    if num_levels == 1 or step >= total_steps:
        return float(end)
    level = min(step * num_levels // total_steps, num_levels - 1)
    return round(start + (end - start) * level / (num_levels - 1), 12)
