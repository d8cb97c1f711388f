"""Weighted patch interrelation (Wu et al.): the math, stage detection, and dataset-level
aggregation.

:class:`captum_vit.SiftInterrelation` computes an :class:`InterrelationResult` for a
batch; :func:`aggregate_interrelation` streams a ``DataLoader`` through it and keeps
only running sums (per layer and head), giving an :class:`InterrelationSummary` whose
per-layer means, per-head spread and stages are what
:func:`captum_vit.viz.plot_interrelation` draws. :func:`mask_as_prompt` is the
Mask-as-Prompt sweep: accuracy when the patches with the highest / lowest patch score
(or random ones) are masked at the token level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._capture import resolve_adapter
from ._interrelation import (
    InterrelationResult,
    InterrelationSummary,
    Stages,
    detect_stages,
    interrelation_stats,
)
from ._progress import progress
from ._sift import keypoint_counts, unnormalize_inputs
from ._token_masking import check_replacement
from ._utils import _split_batch
from .attr.sift_interrelation import SiftInterrelation
from .masking import masked_forward, random_mask, score_mask

__all__ = [
    "MASK_AS_PROMPT_STRATEGIES",
    "InterrelationResult",
    "InterrelationSummary",
    "Stages",
    "aggregate_interrelation",
    "detect_stages",
    "interrelation_stats",
    "keypoint_counts",
    "mask_as_prompt",
    "unnormalize_inputs",
]

# ---------------------------------------------------------------------------- streaming
def aggregate_interrelation(
    explainer: SiftInterrelation,
    loader: Iterable[Any],
    *,
    max_batches: int | None = None,
    show_progress: bool = True,
    on_batch: Callable[[Tensor, Tensor | None, InterrelationResult], None] | None = None,
) -> InterrelationSummary:
    r"""Stream a dataset through :meth:`SiftInterrelation.analyze`, keeping only sums.

    For each layer and head the NaN-skipping mean of θ_KK, θ_NK and the focus index
    over all images is accumulated in float64 running sums of size ``(L, heads)``:
    memory does not grow with the dataset.

    Args:
        explainer (SiftInterrelation): the configured method.
        loader (Iterable): yields image tensors ``(B, C, H, W)`` (normalised as the
            model takes them), ``(images, labels, ...)`` tuples, or dicts with
            ``"pixel_values"``; keypoints are counted on
            ``explainer.unnormalize``-inverted images.
        max_batches (int, optional): stop after this many batches. Default: None
        show_progress (bool, optional): show a progress bar. Default: True
        on_batch (Callable, optional): called as ``on_batch(inputs, labels, result)``
            after each batch (``labels`` is None when the loader yields none), e.g.
            to run :func:`mask_as_prompt` on ``result.patch_scores`` without a second
            analysis. Default: None

    Returns:
        InterrelationSummary: per-head means ``(L, heads)``, per-layer curves,
        per-head spread and stages.

    Example::

        >>> summary = aggregate_interrelation(SiftInterrelation(model), loader)
        >>> print(summary.to_markdown()); print(summary.stages)
    """
    sums: Tensor | None = None
    counts: Tensor | None = None
    images = 0
    total = None
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    bar = progress(desc="SiftInterrelation", total=total, disable=not show_progress)
    try:
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            x, labels, _, _ = _split_batch(batch)
            res = explainer.analyze(x)
            if on_batch is not None:
                on_batch(x, labels, res)
            stack = torch.stack([res.kk, res.nk, res.focus_index]).double()  # (3, B, L, H)
            valid = ~torch.isnan(stack)
            s = torch.nan_to_num(stack, nan=0.0).sum(1)
            c = valid.sum(1).double()
            sums = s if sums is None else sums + s
            counts = c if counts is None else counts + c
            images += int(x.shape[0])
            bar.update(1)
    finally:
        bar.close()
    if sums is None or counts is None:
        raise ValueError("the loader yielded no batches")
    means = (sums / counts).float()  # 0/0 -> NaN where a head never had a group
    return InterrelationSummary(kk=means[0], nk=means[1], focus_index=means[2], num_images=images)


# ---------------------------------------------------------------------------- Mask-as-Prompt
MASK_AS_PROMPT_STRATEGIES: tuple[str, ...] = ("top", "bottom", "random")


def mask_as_prompt(
    model: torch.nn.Module,
    inputs: Tensor,
    patch_scores: Tensor,
    *,
    ratios: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.4),
    strategies: Sequence[str] = MASK_AS_PROMPT_STRATEGIES,
    replacement: str = "zero",
    adapter: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""Mask-as-Prompt sweep: the model's predictions when patch tokens are masked by
    patch score.

    For each ratio ``r``, ``k = mask_count(P, r)`` patch tokens per image are masked
    at the token level (:func:`captum_vit._token_masking.masked_forward`):
    ``"top"`` masks the k patches with the highest score, ``"bottom"`` the k with
    the lowest (:func:`captum_vit.masking.score_mask`), ``"random"`` k uniformly
    random patches (:func:`captum_vit.masking.random_mask`). NaN scores are never
    picked before finite ones.

    Args:
        model (nn.Module): the ViT.
        inputs (Tensor): images ``(B, C, H, W)`` as the model takes them.
        patch_scores (Tensor): ``(B, P)`` (e.g. ``InterrelationResult.patch_scores``).
        ratios (Sequence[float], optional): fractions of patches to mask, each in
            (0, 1). Default: (0.05, 0.1, 0.2, 0.3, 0.4)
        strategies (Sequence[str], optional): any of ``"top"``, ``"bottom"``,
            ``"random"``. Default: all three
        replacement (str, optional): token replacement ``"zero"``, ``"mean"`` or
            ``"drop"``. Default: "zero"
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None
        generator (torch.Generator, optional): for the random masks. Default: None

    Returns:
        dict[str, Tensor]: ``"unmasked"`` -> predicted classes ``(B,)``, and each
        strategy -> predicted classes ``(len(ratios), B)``.

    Example::

        >>> res = SiftInterrelation(model).analyze(x)
        >>> preds = mask_as_prompt(model, x, res.patch_scores)
        >>> (preds["top"] == labels).float().mean(1)    # accuracy per ratio
    """

    ad = resolve_adapter(model, adapter)
    check_replacement(replacement)
    grid = ad.grid_size(inputs)
    b, p = int(inputs.shape[0]), grid[0] * grid[1]
    if patch_scores.shape != (b, p):
        raise ValueError(f"patch_scores has shape {tuple(patch_scores.shape)}; expected {(b, p)}")
    bad = [s for s in strategies if s not in MASK_AS_PROMPT_STRATEGIES]
    if bad or not strategies:
        raise ValueError(f"strategies must be a non-empty subset of {MASK_AS_PROMPT_STRATEGIES}, got {strategies!r}")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise ValueError(f"each ratio must be in (0, 1), got {r!r}")
    scores = patch_scores.to(inputs.device)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        out["unmasked"] = ad.forward(inputs).argmax(-1)
        for strategy in strategies:
            preds = []
            for r in ratios:
                if strategy == "random":
                    mask = random_mask(b, p, r, generator=generator).to(inputs.device)
                else:
                    top = strategy == "top"
                    keyed = torch.nan_to_num(scores.float(), nan=-math.inf if top else math.inf)
                    mask = score_mask(keyed, r, largest=top)
                preds.append(masked_forward(ad, inputs, mask, replacement).argmax(-1))
            out[strategy] = torch.stack(preds)
    return out
