"""SIFT-guided MAE masks and their curriculum (Wu et al.), re-exported from
:mod:`captum_vit.masking`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sift_curriculum", "sift_guided_mask"]


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
    from .masking import mask_count

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
