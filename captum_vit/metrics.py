r"""Faithfulness and localisation metrics for attribution maps.

Every function is batched (one value per sample, as a tensor on the attributions'
device) and works on any device. Attributions may be input-shaped ``(B, C, H, W)``
(channels are averaged: captum_vit maps repeat one map in every channel), a map
``(B, 1, H, W)`` / ``(B, H, W)``, or a patch grid ``(B, 1, gh, gw)``
(``return_patch_grid=True``).

Masks are ground-truth segmentations ``(B, H', W')`` or ``(B, 1, H', W')`` at any
resolution: bool / {0, 1} masks, or label masks (``0`` background, ``> 0``
foreground, ``ignore_index`` (default 255, PASCAL VOC's boundary band) ignored).
They are resized to the attributions' resolution with nearest-neighbour
(:func:`segmentation_scores`, :func:`pointing_game`) or to the patch grid by area
(:func:`foreground_fraction`). A mask of the original image must first get the same
resize / centre crop as the image the model saw: :func:`align_mask` does that.

* :func:`foreground_fraction` — Das & Huddar's foreground / background attention
  fraction (FAF / BAF) on the patch grid (patch grids, or pixel-level maps with
  ``patch_size=``; a pixel-level map without it raises instead of being taken for
  a grid).
* :func:`perturbation_curve` — Chefer et al.'s positive / negative perturbation test
  (tokens removed most- or least-relevant first) and its area under the curve.
* :func:`segmentation_scores` — pixel accuracy, mIoU and mAP as in Chefer et al.'s
  ImageNet-segmentation evaluation.
* :func:`pointing_game` — whether the map's maximum falls on the object.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._capture import ViTAdapter, resolve_adapter
from ._token_masking import check_replacement, masked_forward
from ._utils import TargetType, _forward_args, _resolve_target, _single_tensor, _unpack_inputs
from .masking import mask_count

__all__ = [
    "DEFAULT_FRACTIONS",
    "align_mask",
    "foreground_fraction",
    "perturbation_curve",
    "pointing_game",
    "removal_masks",
    "segmentation_scores",
    "trapezoid_auc",
]

#: Fractions of patch tokens removed in the perturbation test (Chefer et al.: 0 to 90%
#: in steps of 10%).
DEFAULT_FRACTIONS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))

_ORDERS = ("positive", "negative")
_METRICS = ("accuracy", "probability")


# ---------------------------------------------------------------------- input checks
def _as_maps(attributions: Tensor | tuple[Tensor, ...], name: str = "attributions") -> Tensor:
    """Attributions -> float ``(B, h, w)`` (channels averaged)."""
    a = _single_tensor(attributions, name).detach()
    if a.ndim == 4:
        a = a.float().mean(dim=1)
    elif a.ndim == 3:
        a = a.float()
    else:
        raise ValueError(
            f"{name} must be (B, C, H, W), (B, 1, gh, gw) or (B, H, W); got shape {tuple(a.shape)}"
        )
    if a.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} contain NaN or Inf")
    return a


def _as_masks(masks: Tensor, batch: int, ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """Masks -> (foreground, valid), both bool ``(B, H', W')``."""
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be a tensor, got {type(masks).__name__}")
    m = masks.detach()
    if m.ndim == 4:
        if m.shape[1] != 1:
            raise ValueError(f"masks must be (B, H, W) or (B, 1, H, W); got shape {tuple(m.shape)}")
        m = m[:, 0]
    if m.ndim != 3:
        raise ValueError(f"masks must be (B, H, W) or (B, 1, H, W); got shape {tuple(m.shape)}")
    if m.shape[0] != batch:
        raise ValueError(f"got {m.shape[0]} masks for {batch} attribution maps")
    if m.dtype == torch.bool:
        return m, torch.ones_like(m)
    if m.is_floating_point() and not torch.isfinite(m).all():
        raise ValueError("masks contain NaN or Inf")
    valid = torch.ones_like(m, dtype=torch.bool) if ignore_index is None else m != ignore_index
    return (m > 0) & valid, valid


def _resize_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a bool ``(B, H, W)`` tensor."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x[:, None].float(), size=size, mode="nearest-exact")[:, 0] > 0.5


def _minmax(a: Tensor) -> Tensor:
    """Per-sample min-max normalisation of ``(B, H, W)``; constant maps become 0."""
    flat = a.reshape(a.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(flat))
    return out.reshape(a.shape)


# ---------------------------------------------------------------------- mask alignment
def align_mask(
    masks: Tensor,
    input_size: int | Sequence[int] | Mapping[str, Any],
    *,
    crop_pct: float = 0.875,
    crop_mode: str = "center",
) -> Tensor:
    r"""Give masks the same resize and centre crop as the model's preprocessing.

    Mirrors timm's evaluation transform (``timm.data.create_transform`` with
    ``is_training=False``): the shorter side is resized to
    ``floor(size / crop_pct)`` (``crop_mode="center"``; ``"squash"`` resizes both
    sides to ``size / crop_pct``, ``"border"`` is not supported), then the centre
    ``size`` is cropped. Masks use nearest-neighbour interpolation with pixel-centre
    sampling (``NEAREST_EXACT``, the same pixels as PIL's ``NEAREST``) so that label
    values (and VOC's 255 boundary band) survive and line up with the image.

    Args:
        masks (Tensor): ``(H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)`` masks of the
            original images (any dtype).
        input_size (int, (int, int) or Mapping): the model's input size, or a timm
            data config (``timm.data.resolve_data_config``) whose ``input_size``,
            ``crop_pct`` and ``crop_mode`` are used.
        crop_pct (float, optional): fraction of the resized image kept by the crop.
            Default: 0.875
        crop_mode (str, optional): ``"center"`` or ``"squash"``. Default: "center"

    Returns:
        Tensor: masks of the same dtype and leading dimensions, ``(..., h, w)`` with
        ``(h, w)`` the model's input size.

    Example::

        >>> cfg = timm.data.resolve_data_config({}, model=model)
        >>> mask224 = align_mask(voc_mask, cfg)        # (224, 224), labels kept
    """
    if isinstance(input_size, Mapping):
        cfg = input_size
        size_value = cfg["input_size"]
        crop_pct = float(cfg.get("crop_pct", crop_pct) or crop_pct)
        crop_mode = str(cfg.get("crop_mode", crop_mode) or crop_mode)
        size = (int(size_value[-2]), int(size_value[-1]))
    elif isinstance(input_size, int):
        size = (input_size, input_size)
    else:
        items = [int(v) for v in input_size]
        if len(items) != 2:
            raise ValueError(f"input_size must be an int or (h, w), got {input_size!r}")
        size = (items[0], items[1])
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if crop_mode not in ("center", "squash"):
        raise ValueError(f"crop_mode must be 'center' or 'squash', got {crop_mode!r}")
    if not isinstance(masks, Tensor) or masks.ndim not in (2, 3, 4):
        raise ValueError("masks must be a tensor (H, W), (B, H, W) or (B, 1, H, W)")
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if crop_mode == "squash":
        scale: int | list[int] = [math.floor(size[0] / crop_pct), math.floor(size[1] / crop_pct)]
    elif size[0] == size[1]:
        scale = math.floor(size[0] / crop_pct)
    else:
        scale = [math.floor(size[0] / crop_pct), math.floor(size[1] / crop_pct)]
    x = masks[None] if masks.ndim == 2 else masks
    resized = TF.resize(x, scale, interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)
    out = TF.center_crop(resized, list(size))
    return out[0] if masks.ndim == 2 else out


# ---------------------------------------------------------------------- FAF / BAF
def foreground_fraction(
    attributions: Tensor | tuple[Tensor, ...],
    masks: Tensor,
    threshold: float = 0.5,
    *,
    patch_size: int | Sequence[int] | None = None,
    ignore_index: int | None = 255,
) -> tuple[Tensor, Tensor]:
    r"""Foreground / background attention fraction (Das & Huddar) on the patch grid.

    With ``a_p = max(a, 0)`` the (non-negative part of the) attribution of patch
    ``p`` and ``fg`` the patches at least ``threshold`` of whose valid pixels are
    foreground:

    ``FAF = Σ_{p∈fg} a_p / Σ_p a_p``,  ``BAF = Σ_{p∉fg} a_p / Σ_p a_p = 1 − FAF``.

    A patch with no valid pixel (all ``ignore_index``) counts as background. The
    fraction is NaN for a sample whose map has no positive value.

    The fraction is defined on the patch grid, so a pixel-level map must not be taken
    for a grid. Without ``patch_size``:

    * an input-shaped map with several channels (``attribute()``'s default output,
      ``(B, 3, H, W)``) raises ``ValueError``;
    * a one-channel map ``(B, 1, h, w)`` / ``(B, h, w)`` is the patch grid, except
      when ``(h, w)`` equals the masks' resolution ``(H', W')``: masks aligned with
      the input have the input's size, so such a map is taken as pixel-level and
      raises ``ValueError`` too (a grid with masks already reduced to the grid's
      resolution passes ``patch_size=1``).

    Shape alone cannot tell a one-channel pixel map from a grid when the masks have
    another resolution than the map (e.g. masks at twice the input size): pass grids
    (``return_patch_grid=True``) or ``patch_size`` then.

    Args:
        attributions (Tensor): a patch grid ``(B, 1, gh, gw)`` / ``(B, gh, gw)``
            (``return_patch_grid=True``), or, with ``patch_size``, an input-shaped
            map ``(B, C, H, W)`` (channels averaged) that is averaged over each
            ``patch_size`` patch (``H, W`` divisible by it).
        masks (Tensor): ``(B, H', W')`` or ``(B, 1, H', W')`` at any resolution
            aligned with the model's input (see :func:`align_mask`); the fraction of
            foreground pixels of each patch is computed by area averaging.
        threshold (float, optional): minimum foreground fraction of a foreground
            patch, in ``(0, 1]``. Default: 0.5
        patch_size (int or (int, int), optional): pixels per patch when
            ``attributions`` are at pixel resolution (the model's patch size, e.g.
            16); ``1`` takes every value of the map as one patch. Default: None
            (``attributions`` are the patch grid, see above)
        ignore_index (int, optional): mask value that is ignored. Default: 255

    Returns:
        tuple[Tensor, Tensor]: ``(faf, baf)``, each ``(B,)`` float32.

    Example::

        >>> grid = AttentionRollout(model).attribute(x, return_patch_grid=True)
        >>> faf, baf = foreground_fraction(grid, align_mask(masks, cfg))
    """
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    raw = _single_tensor(attributions, "attributions")
    hint = (
        "foreground_fraction works on the patch grid: pass attribute(..., "
        "return_patch_grid=True) maps (B, 1, gh, gw), or patch_size= (the model's patch "
        "size) to average a pixel-level map over each patch"
    )
    if patch_size is None and raw.ndim == 4 and raw.shape[1] != 1:
        raise ValueError(
            f"attributions of shape {tuple(raw.shape)} have {raw.shape[1]} channels, an "
            f"input-shaped map; {hint}"
        )
    a = _as_maps(raw)
    if patch_size is not None:
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if a.shape[-2] % ph or a.shape[-1] % pw:
            raise ValueError(
                f"attributions of {a.shape[-2]}x{a.shape[-1]} are not divisible into "
                f"{ph}x{pw} patches"
            )
        a = F.avg_pool2d(a[:, None], kernel_size=(ph, pw))[:, 0]
    fg, valid = _as_masks(masks, a.shape[0], ignore_index)
    grid = (int(a.shape[-2]), int(a.shape[-1]))
    if patch_size is None and grid == tuple(fg.shape[-2:]):
        raise ValueError(
            f"attributions of {grid[0]}x{grid[1]} have the masks' resolution, so they are a "
            f"pixel-level map, not a patch grid; {hint} (patch_size=1 if this is a grid and "
            "the masks are at grid resolution)"
        )
    if fg.shape[-2] < grid[0] or fg.shape[-1] < grid[1]:
        raise ValueError(f"masks of {tuple(fg.shape[-2:])} are smaller than the {grid} patch grid")
    fg_area = F.adaptive_avg_pool2d(fg[:, None].float(), grid)[:, 0]
    valid_area = F.adaptive_avg_pool2d(valid[:, None].float(), grid)[:, 0]
    frac = fg_area / valid_area.clamp(min=1e-12)
    fg_patch = (frac >= threshold - 1e-9) & (valid_area > 0)
    pos = a.to(fg_area.device).clamp(min=0)
    total = pos.flatten(1).sum(1)
    fore = (pos * fg_patch).flatten(1).sum(1)
    nan = torch.full_like(total, float("nan"))
    faf = torch.where(total > 0, fore / torch.where(total > 0, total, torch.ones_like(total)), nan)
    return faf, torch.where(total > 0, 1.0 - faf, nan)


# ---------------------------------------------------------------------- segmentation
def _average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """AP of 1-D ``scores`` for bool ``labels``: ``Σ_k (R_k − R_{k−1}) P_k`` over distinct
    thresholds (ties form one threshold, as scikit-learn's ``average_precision_score``).
    NaN when there is no positive."""
    n_pos = labels.sum()
    if n_pos == 0:
        return torch.tensor(float("nan"), device=scores.device)
    order = torch.argsort(scores, descending=True)
    s = scores[order]
    y = labels[order].double()
    tp = torch.cumsum(y, 0)
    fp = torch.cumsum(1 - y, 0)
    # last index of every group of equal scores
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos.double()
    prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return ((recall - prev) * precision).sum().float()


def segmentation_scores(
    attributions: Tensor | tuple[Tensor, ...],
    masks: Tensor,
    *,
    ignore_index: int | None = 255,
) -> dict[str, Tensor]:
    r"""Pixel accuracy, mIoU and mAP of a map used as a foreground segmentation.

    As in Chefer et al.'s ImageNet-segmentation evaluation: the map ``a`` is min-max
    normalised per sample, ``â = (a − min a) / (max a − min a)`` (a constant map gives
    ``â = 0``), and thresholded at its mean: pixel ``x`` is predicted foreground when
    ``â(x) > mean(â)``. Over the valid pixels (mask ≠ ``ignore_index``):

    * ``pixel_accuracy`` = correctly labelled pixels / valid pixels;
    * ``miou`` = ``(IoU_fg + IoU_bg) / 2`` with ``IoU_c = |pred_c ∩ gt_c| / |pred_c ∪ gt_c|``
      (a class absent from both prediction and ground truth has IoU 1);
    * ``map`` = average precision of ``â`` as scores for the foreground pixels,
      ``Σ_k (R_k − R_{k−1}) P_k`` over the distinct values of ``â`` (NaN when the mask
      has no foreground pixel). A constant map scores the foreground rate (chance).

    Scores are computed at the attributions' resolution: pass input-shaped maps (as
    ``attribute()`` returns them) for pixel-level scores; masks are resized to it
    with nearest-neighbour.

    Args:
        attributions (Tensor): ``(B, C, H, W)``, ``(B, 1, H, W)`` or ``(B, H, W)``.
        masks (Tensor): ``(B, H', W')`` or ``(B, 1, H', W')``, aligned with the
            model's input (:func:`align_mask`).
        ignore_index (int, optional): mask value excluded from every score.
            Default: 255

    Returns:
        dict[str, Tensor]: ``"pixel_accuracy"``, ``"miou"``, ``"map"``, each ``(B,)``
        float32 in ``[0, 1]``.

    Example::

        >>> attr = GradientRollout(model).attribute(x)
        >>> scores = segmentation_scores(attr, align_mask(masks, cfg))
        >>> scores["miou"].mean()
    """
    a = _as_maps(attributions)
    fg, valid = _as_masks(masks, a.shape[0], ignore_index)
    size = (int(a.shape[-2]), int(a.shape[-1]))
    fg = _resize_nearest(fg, size).to(a.device)
    valid = _resize_nearest(valid, size).to(a.device)
    norm = _minmax(a)
    acc, miou, ap = [], [], []
    for i in range(a.shape[0]):
        v = valid[i]
        if not v.any():
            raise ValueError(f"mask {i} has no valid pixel (all ignore_index)")
        scores = norm[i][v]
        gt = fg[i][v]
        pred = scores > scores.mean()
        acc.append((pred == gt).float().mean())
        ious = []
        for p_c, g_c in ((pred, gt), (~pred, ~gt)):
            union = (p_c | g_c).sum()
            inter = (p_c & g_c).sum()
            ious.append(inter.float() / union.float() if union > 0 else torch.tensor(1.0, device=a.device))
        miou.append(torch.stack(ious).mean())
        ap.append(_average_precision(scores, gt))
    return {
        "pixel_accuracy": torch.stack(acc),
        "miou": torch.stack(miou),
        "map": torch.stack(ap),
    }


def pointing_game(
    attributions: Tensor | tuple[Tensor, ...],
    masks: Tensor,
    *,
    tolerance: int = 0,
    ignore_index: int | None = 255,
) -> Tensor:
    r"""Pointing game (Zhang et al. 2016): does the map's maximum fall on the object?

    With ``M = {x : a(x) = max a}`` the maximal pixels (masks resized to the
    attributions' resolution with nearest-neighbour, foreground dilated by
    ``tolerance`` pixels), the score of a sample is ``|M ∩ fg| / |M|``: 1 for a hit,
    0 for a miss, and for ties the hit probability of a uniformly random tie-break (a
    constant map scores the foreground fraction, i.e. chance). Ignored pixels count
    as foreground (a maximum on the object's boundary band is a hit).

    Args:
        attributions (Tensor): ``(B, C, H, W)``, ``(B, 1, h, w)`` or ``(B, h, w)``.
        masks (Tensor): ``(B, H', W')`` or ``(B, 1, H', W')``.
        tolerance (int, optional): dilation of the foreground in pixels of the
            attributions' resolution. Default: 0
        ignore_index (int, optional): boundary value counted as a hit. Default: 255

    Returns:
        Tensor: ``(B,)`` float32 hit scores in ``[0, 1]``.

    Example::

        >>> hits = pointing_game(attr, masks)
        >>> hits.mean()
    """
    if not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative int, got {tolerance!r}")
    a = _as_maps(attributions)
    fg, valid = _as_masks(masks, a.shape[0], ignore_index)
    hit_area = fg | ~valid
    size = (int(a.shape[-2]), int(a.shape[-1]))
    hit_area = _resize_nearest(hit_area, size).to(a.device)
    if tolerance > 0:
        k = 2 * tolerance + 1
        hit_area = F.max_pool2d(hit_area[:, None].float(), k, stride=1, padding=tolerance)[:, 0] > 0
    flat = a.reshape(a.shape[0], -1)
    is_max = flat == flat.max(dim=1, keepdim=True).values
    hits = (is_max & hit_area.reshape(a.shape[0], -1)).sum(1).float()
    return hits / is_max.sum(1).float()


# ---------------------------------------------------------------------- perturbation
def _patch_scores(attributions: Tensor | tuple[Tensor, ...], grid: tuple[int, int]) -> Tensor:
    """Attributions -> (B, gh*gw) patch scores (input-shaped maps area-averaged)."""
    a = _as_maps(attributions)
    if tuple(a.shape[-2:]) != grid:
        if a.shape[-2] < grid[0] or a.shape[-1] < grid[1]:
            raise ValueError(
                f"attributions of {tuple(a.shape[-2:])} cannot be pooled to the model's "
                f"{grid} patch grid"
            )
        a = F.adaptive_avg_pool2d(a[:, None], grid)[:, 0]
    return a.reshape(a.shape[0], -1)


def removal_masks(scores: Tensor, fractions: Sequence[float], order: str) -> Tensor:
    r"""Token-removal masks of the perturbation test.

    For fraction ``f`` the :func:`captum_vit.masking.mask_count` ``(P, f)`` =
    ``floor(f · P + 0.5)`` patches (the package's one rounding rule for a fraction of
    the patches: round half up) with the highest scores
    (``order="positive"``) or the lowest (``"negative"``) are masked; ties keep patch
    order (stable sort).

    Args:
        scores (Tensor): ``(B, P)`` patch scores.
        fractions (Sequence[float]): fractions in ``[0, 1]``.
        order (str): ``"positive"`` or ``"negative"``.

    Returns:
        Tensor: bool ``(len(fractions), B, P)``, True = removed.
    """
    if order not in _ORDERS:
        raise ValueError(f"order must be 'positive' or 'negative', got {order!r}")
    b, p = scores.shape
    ranks_idx = torch.argsort(scores, dim=1, descending=order == "positive", stable=True)
    rank = torch.empty_like(ranks_idx)
    rank.scatter_(1, ranks_idx, torch.arange(p, device=scores.device).expand(b, p))
    out = [rank < mask_count(p, f) for f in fractions]
    return torch.stack(out)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) < 2:
        raise ValueError("fractions needs at least two values to define an area")
    if any(not 0.0 <= f < 1.0 for f in fr) or any(b <= a for a, b in itertools.pairwise(fr)):
        raise ValueError(f"fractions must increase strictly within [0, 1), got {fr}")
    return fr


def trapezoid_auc(curve: Tensor, fractions: Sequence[float]) -> Tensor:
    r"""Area under ``curve`` ``(..., F)`` over ``fractions`` by the trapezoid rule:
    ``Σ_k (f_{k+1} − f_k)(c_k + c_{k+1}) / 2``. Returns ``(...)``."""
    x = torch.tensor(list(fractions), dtype=torch.float64, device=curve.device)
    return torch.trapezoid(curve.double(), x, dim=-1).float()


def perturbation_curve(
    model: nn.Module,
    inputs: Tensor | np.ndarray | tuple[Tensor | np.ndarray, ...],
    attributions: Tensor | tuple[Tensor, ...],
    target: TargetType = None,
    *,
    order: str = "positive",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    replacement: str = "zero",
    metric: str = "accuracy",
    labels: Tensor | np.ndarray | Sequence[int] | None = None,
    additional_forward_args: Any = None,
    adapter: ViTAdapter | None = None,
    max_batch: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Chefer et al.'s positive / negative perturbation test.

    The patch tokens are ranked by the attribution (input-shaped maps are averaged
    over each patch); for each fraction ``f`` the ``floor(f · P + 0.5)`` most relevant
    (``order="positive"``) or least relevant (``"negative"``) tokens are removed at
    token level (:mod:`captum_vit._token_masking`, the same masking as
    :class:`~captum_vit.PatchOcclusion`) and the model is run again. The curve records,
    per sample and fraction:

    * ``metric="accuracy"`` (default, as in the paper): 1 when the top-1 class of the
      perturbed input equals the reference class, else 0. The reference class is
      ``labels`` when given (ground truth, the paper's setting) and otherwise
      ``target``.
    * ``metric="probability"``: the softmax probability of ``target``.

    ``target`` (Captum style; ``None`` = each sample's predicted class on the
    unperturbed input) is the class the attributions explain. The area under the
    curve is the trapezoid rule over ``fractions``:
    ``AUC = Σ_k (f_{k+1} − f_k)(c_k + c_{k+1}) / 2`` (with the default fractions
    0, 0.1, …, 0.9 the maximum is 0.9; the paper reports it ×100). A faithful map has
    a low positive AUC and a high negative AUC.

    Args:
        model (nn.Module): a ViT supported by :func:`captum_vit.adapt`.
        inputs (Tensor, ndarray or tuple): images ``(B, C, H, W)`` (numpy arrays
            as every ``attribute()`` takes them).
        attributions (Tensor or tuple[Tensor]): input-shaped maps or patch grids
            ``(B, 1, gh, gw)`` of ``inputs``.
        target (int, list, Tensor or ndarray, optional): explained class.
            Default: None
        order (str, optional): ``"positive"`` (most relevant removed first) or
            ``"negative"``. Default: "positive"
        fractions (Sequence[float], optional): strictly increasing fractions in
            ``[0, 1)``. Default: :data:`DEFAULT_FRACTIONS` (0, 0.1, …, 0.9)
        replacement (str, optional): how a token is removed: ``"zero"`` (patch
            embedding set to 0, position kept), ``"mean"`` or ``"drop"`` (see
            :class:`~captum_vit.PatchOcclusion`). Default: "zero"
        metric (str, optional): ``"accuracy"`` or ``"probability"``.
            Default: "accuracy"
        labels (Tensor, ndarray or Sequence[int], optional): ground-truth classes
            for ``metric="accuracy"``. Default: None
        additional_forward_args (Any, optional): extra forward arguments.
            Default: None
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None
        max_batch (int, optional): at most this many perturbed images per forward
            pass (several fractions are batched together). Default: None (all
            fractions of the batch in one pass)

    Returns:
        tuple[Tensor, Tensor]: ``curve`` ``(B, len(fractions))`` and ``auc`` ``(B,)``,
        float32 (average over the batch for the dataset value).

    Example::

        >>> attr = GradientRollout(model).attribute(x, return_patch_grid=True)
        >>> _, neg = perturbation_curve(model, x, attr, order="negative")
        >>> _, pos = perturbation_curve(model, x, attr, order="positive")
        >>> (neg - pos).mean()    # higher is better
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be 'accuracy' or 'probability', got {metric!r}")
    if order not in _ORDERS:
        raise ValueError(f"order must be 'positive' or 'negative', got {order!r}")
    fr = _check_fractions(fractions)
    ad = resolve_adapter(model, adapter)
    x, _ = _unpack_inputs(inputs)
    ad.check_inputs(x)
    args = _forward_args(additional_forward_args)
    grid = ad.grid_size(x)
    scores = _patch_scores(attributions, grid)
    if scores.shape[0] != x.shape[0]:
        raise ValueError(f"got {scores.shape[0]} attribution maps for {x.shape[0]} inputs")
    replacement = check_replacement(replacement)
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be a positive int, got {max_batch}")
    b = int(x.shape[0])
    with torch.no_grad():
        clean = ad.forward(x, *args)
        t = _resolve_target(target, clean)
        if labels is not None:
            ref = _resolve_target(labels if isinstance(labels, (Tensor, np.ndarray)) else list(labels), clean)
        else:
            ref = t
        masks = removal_masks(scores.to(x.device), fr, order)  # (F, B, P)
        todo = [k for k, f in enumerate(fr) if masks[k].any()]
        outs: list[Tensor | None] = [clean if k not in todo else None for k in range(len(fr))]
        # Several fractions per forward pass: (fractions x samples) rows at a time.
        per_call = max(1, (max_batch or b * len(todo) or 1) // b)
        for start in range(0, len(todo), per_call):
            chunk = todo[start : start + per_call]
            xs = x.repeat(len(chunk), *([1] * (x.ndim - 1)))
            ms = masks[chunk].reshape(len(chunk) * b, -1)
            big_args = tuple(
                a.repeat(len(chunk), *([1] * (a.ndim - 1)))
                if isinstance(a, Tensor) and a.ndim > 0 and a.shape[0] == b
                else a
                for a in args
            )
            out = masked_forward(ad, xs, ms, replacement, big_args)
            for j, k in enumerate(chunk):
                outs[k] = out[j * b : (j + 1) * b]
        values = []
        for scored in outs:
            assert scored is not None
            if metric == "accuracy":
                values.append((scored.argmax(dim=1) == ref).float())
            else:
                values.append(scored.float().softmax(dim=1).gather(1, t[:, None])[:, 0])
        curve = torch.stack(values, dim=1)
    return curve, trapezoid_auc(curve, fr)
