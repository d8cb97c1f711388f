"""Heat-map overlays of an attribution on its image.

Every function accepts what the methods return (``(C, H, W)`` input-shaped maps,
``(1, gh, gw)`` patch grids, a batch of one) and images as PIL images, uint8 / float
arrays ``(H, W, 3)`` or float tensors ``(3, H, W)`` in ``[0, 1]``. Pass the image the
model saw (after resize and crop; ``ImageTransform.to_image`` gives it), not the
normalised input.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from ..io import DEFAULT_BACKGROUND, read_image

__all__ = [
    "DIVERGING_CMAP",
    "SEQUENTIAL_CMAP",
    "attribution_to_map",
    "choose_cmap",
    "image_to_array",
    "is_signed",
    "normalize_map",
    "overlay",
    "overlay_array",
]

_NORMALIZE = ("auto", "minmax", "percentile", "rank")
_UPSAMPLE = ("bilinear", "nearest", "bicubic")

#: ``cmap="auto"`` for maps with negative values: white at zero.
DIVERGING_CMAP = "RdBu_r"
#: ``cmap="auto"`` for non-negative maps.
SEQUENTIAL_CMAP = "inferno"


def image_to_array(image: Any) -> np.ndarray:
    """Any image -> float RGB array ``(H, W, 3)`` in ``[0, 1]``.

    Args:
        image (PIL.Image, path, numpy.ndarray or Tensor): PIL image or image file
            (read by :func:`captum_vit.io.read_image`); array ``(H, W)``,
            ``(H, W, 3)`` or ``(H, W, 4)`` (uint8 0..255 or float 0..1); tensor
            ``(3, H, W)``, ``(1, H, W)`` or ``(1, 3, H, W)`` with values in ``[0, 1]``.

    Returns:
        numpy.ndarray: ``(H, W, 3)`` float64 in ``[0, 1]``.
    """
    if isinstance(image, (Image.Image, str, PathLike)):
        # files and PIL images go through the one image reader (16-bit, alpha, EXIF ...)
        return np.asarray(read_image(image), dtype=np.float64) / 255.0
    if isinstance(image, Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(f"expected one image, got a batch of {t.shape[0]}")
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be (3, H, W) or (1, H, W); got {tuple(image.shape)}")
        if t.min() < -1e-3 or t.max() > 1 + 1e-3:
            raise ValueError(
                "an image tensor must hold values in [0, 1]; this one looks normalised: "
                "pass transform.to_image(x) (captum_vit.models.ImageTransform) instead"
            )
        arr = t.expand(3, -1, -1).permute(1, 2, 0).numpy().astype(np.float64)
        return np.clip(arr, 0.0, 1.0)
    if isinstance(image, np.ndarray) and (
        np.issubdtype(image.dtype, np.integer) or image.dtype == np.bool_
    ):
        # uint8, uint16 (scaled by its bit depth), RGBA (composited over white)
        return np.asarray(read_image(image), dtype=np.float64) / 255.0
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got {image.shape}")
        out = arr.astype(np.float64)
        if out.max() > 1.0 + 1e-6:
            out = out / 255.0
        out = np.clip(out, 0.0, 1.0)
        if out.shape[-1] == 4:  # composite over the reader's background (white)
            bg = np.asarray(DEFAULT_BACKGROUND, dtype=np.float64) / 255.0
            out = out[..., :3] * out[..., 3:] + bg * (1.0 - out[..., 3:])
        return out
    raise TypeError(f"expected a PIL image, a numpy array or a tensor, got {type(image).__name__}")


def attribution_to_map(attribution: Any) -> np.ndarray:
    """One attribution -> a 2-D float array.

    Args:
        attribution (Tensor or numpy.ndarray): ``(H, W)``, ``(C, H, W)`` (channels are
            averaged; captum_vit maps are equal in every channel), or a batch of one
            ``(1, C, H, W)``; a 1-tuple (Captum style) is unpacked.

    Returns:
        numpy.ndarray: ``(H, W)`` float64 (raw values).
    """
    if isinstance(attribution, tuple):
        if len(attribution) != 1:
            raise ValueError(f"expected one attribution, got a tuple of {len(attribution)}")
        attribution = attribution[0]
    if isinstance(attribution, Tensor):
        arr = attribution.detach().float().cpu().numpy()
    elif isinstance(attribution, np.ndarray):
        arr = attribution
    else:
        raise TypeError(f"attribution must be a tensor or an array, got {type(attribution).__name__}")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ValueError(
                f"expected the attribution of one image, got a batch of {arr.shape[0]}: "
                "index it, e.g. attr[i]"
            )
        arr = arr[0]
    if arr.ndim == 3:
        arr = arr.mean(axis=0)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"attribution must be (H, W), (C, H, W) or (1, C, H, W); got shape {arr.shape}")
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    return arr


def is_signed(values: Any, tol: float = 1e-3) -> bool:
    """Whether a map carries meaningful negative values (evidence against the class).

    Args:
        values (numpy.ndarray or Tensor): the raw map.
        tol (float, optional): negatives smaller than ``tol · max|v|`` count as
            numerical noise. Default: 1e-3

    Returns:
        bool: True when ``min(v) < -tol · max|v|``.
    """
    v = attribution_to_map(values) if not isinstance(values, np.ndarray) else np.asarray(values, dtype=np.float64)
    big = float(np.abs(v).max()) if v.size else 0.0
    return big > 0.0 and float(v.min()) < -tol * big


def _rank(v: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    flat = v.ravel()
    if flat.size < 2:
        return np.zeros_like(v)
    r = rankdata(flat, method="average")
    return ((r - 1.0) / (flat.size - 1.0)).reshape(v.shape)


def normalize_map(
    values: np.ndarray,
    method: str = "minmax",
    percentiles: tuple[float, float] = (1.0, 99.0),
    *,
    signed: bool = False,
) -> np.ndarray:
    """Scale a map to ``[0, 1]`` for display.

    Args:
        values (numpy.ndarray): the raw map.
        method (str, optional): ``"minmax"``: ``(v - min) / (max - min)``;
            ``"percentile"``: clip to the ``percentiles`` first, then min-max (robust to
            a few extreme patches); ``"rank"``: each value's percentile rank among the
            map's values (colours spread evenly, for maps whose values crowd near the
            top, such as SIFT patch scores); ``"auto"``: ``"rank"`` when min-max would put
            the map's median in the upper half of the scale, else ``"minmax"``. A
            constant map gives all zeros (no error, unlike Captum's
            ``visualize_image_attr``). Default: "minmax"
        percentiles (tuple[float, float], optional): lower and upper percentile for
            ``"percentile"``. Default: (1.0, 99.0)
        signed (bool, optional): centre the scale at zero: ``0 -> 0.5``, ``±m -> 0/1``
            with ``m = max|v|`` (``"minmax"``), the upper percentile of ``|v|``
            (``"percentile"``), or the rank of ``|v|`` with its sign (``"rank"``).
            Default: False

    Returns:
        numpy.ndarray: same shape, float64 in ``[0, 1]``.
    """
    method = _resolve_normalize(values, method, signed)
    v = np.asarray(values, dtype=np.float64)
    lo_p, hi_p = percentiles
    if method == "percentile" and not 0.0 <= lo_p < hi_p <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    if signed:
        mag = np.abs(v)
        if method == "rank":
            return 0.5 + 0.5 * np.sign(v) * _rank(mag)
        m = float(np.percentile(mag, hi_p)) if method == "percentile" else float(mag.max())
        if m <= 1e-12:
            return np.full_like(v, 0.5)
        return 0.5 + 0.5 * np.clip(v / m, -1.0, 1.0)
    if method == "rank":
        return _rank(v)
    if method == "percentile":
        lo, hi = np.percentile(v, [lo_p, hi_p])
        v = np.clip(v, lo, hi)
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(v)
    return (v - lo) / (hi - lo)


def _resolve_normalize(values: Any, method: str, signed: bool) -> str:
    if method not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {method!r}")
    if method != "auto":
        return method
    if signed:
        return "minmax"
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return "minmax"
    return "rank" if (float(np.median(v)) - lo) / (hi - lo) > 0.5 else "minmax"


def choose_cmap(values: Any, cmap: str = "auto", signed: bool | None = None) -> tuple[str, bool]:
    """The colormap for a map and whether its scale is centred at zero.

    Args:
        values (numpy.ndarray or Tensor): the raw map.
        cmap (str, optional): ``"auto"``, or a matplotlib colormap name (kept as is).
            ``"auto"`` gives :data:`DIVERGING_CMAP` (white at zero, red positive, blue
            negative) for signed maps and :data:`SEQUENTIAL_CMAP` otherwise.
            Default: "auto"
        signed (bool, optional): whether to centre the scale at zero; None detects it
            with :func:`is_signed`. Default: None

    Returns:
        tuple[str, bool]: the colormap name and ``signed``.

    Example::

        >>> choose_cmap(np.array([-1.0, 2.0]))
        ('RdBu_r', True)
    """
    sign = is_signed(values) if signed is None else bool(signed)
    if cmap == "auto":
        return (DIVERGING_CMAP if sign else SEQUENTIAL_CMAP), sign
    if cmap not in colormaps:
        raise ValueError(f"unknown colormap {cmap!r}")
    return cmap, sign


def _resize(values: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    if values.shape == size:
        return values
    t = torch.from_numpy(values).float()[None, None]
    kwargs: dict[str, Any] = {} if mode == "nearest" else {"align_corners": False}
    out = torch.nn.functional.interpolate(t, size=size, mode=mode, **kwargs)
    return out[0, 0].double().numpy()


def _display_map(
    attribution: Any,
    size: tuple[int, int],
    *,
    blur_sigma: float | None,
    upsample: str,
) -> np.ndarray:
    """The raw map as drawn: resized to the image, optionally blurred."""
    if upsample not in _UPSAMPLE:
        raise ValueError(f"upsample must be one of {_UPSAMPLE}, got {upsample!r}")
    if blur_sigma is not None and blur_sigma < 0:
        raise ValueError(f"blur_sigma must be >= 0, got {blur_sigma}")
    heat = _resize(attribution_to_map(attribution), size, upsample)
    if blur_sigma:
        from scipy.ndimage import gaussian_filter

        heat = gaussian_filter(heat, sigma=float(blur_sigma), mode="nearest")
    return heat


@dataclass(frozen=True)
class _Scale:
    cmap: str
    signed: bool
    normalize: str
    heat: np.ndarray  # the raw map as drawn (resized, blurred)
    percentiles: tuple[float, float]


def _render(
    image: Any,
    attribution: Any,
    alpha: float,
    blur_sigma: float | None,
    cmap: str,
    normalize: str,
    upsample: str,
    signed: bool | None,
    percentiles: tuple[float, float],
) -> tuple[np.ndarray, _Scale]:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    base = image_to_array(image)
    heat = _display_map(attribution, base.shape[:2], blur_sigma=blur_sigma, upsample=upsample)
    name, sign = choose_cmap(heat, cmap, signed)
    method = _resolve_normalize(heat, normalize, sign)
    scaled = normalize_map(heat, method, percentiles, signed=sign)
    colour = colormaps[name](scaled)[..., :3]
    mixed = (1.0 - alpha) * base + alpha * colour
    pixels = np.asarray(np.round(np.clip(mixed, 0.0, 1.0) * 255), dtype=np.uint8)
    return pixels, _Scale(name, sign, method, heat, percentiles)


def overlay_array(
    image: Any,
    attribution: Any,
    alpha: float = 0.6,
    blur_sigma: float | None = None,
    cmap: str = "auto",
    normalize: str = "auto",
    *,
    upsample: str = "bilinear",
    signed: bool | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> np.ndarray:
    """Blend a heat map into an image and return the pixels.

    The map is resized to the image (``upsample``), optionally blurred with a
    Gaussian of ``blur_sigma`` pixels (as in Toseef 2025), scaled to ``[0, 1]``
    (``normalize``; centred at zero for signed maps), coloured with ``cmap`` and
    blended: ``(1 - alpha)·image + alpha·colour``.

    Args:
        image (PIL.Image, numpy.ndarray or Tensor): the image the model saw
            (see :func:`image_to_array`).
        attribution (Tensor or numpy.ndarray): one map (see
            :func:`attribution_to_map`).
        alpha (float, optional): weight of the heat map, in ``[0, 1]``. Default: 0.6
        blur_sigma (float, optional): Gaussian blur in pixels; None or 0 = none.
            Default: None
        cmap (str, optional): a matplotlib colormap name, or ``"auto"``: diverging
            :data:`DIVERGING_CMAP` centred at zero for signed maps (occlusion,
            Grad-CAM without ReLU), sequential :data:`SEQUENTIAL_CMAP` for
            non-negative ones (see :func:`choose_cmap`). Default: "auto"
        normalize (str, optional): ``"auto"``, ``"minmax"``, ``"percentile"`` or
            ``"rank"`` (see :func:`normalize_map`). Default: "auto"
        upsample (str, optional): ``"bilinear"`` (smooth, as in Chefer et al.'s
            notebooks), ``"bicubic"`` or ``"nearest"`` (keeps patch edges) when the map
            is smaller than the image. Default: "bilinear"
        signed (bool, optional): centre the colour scale at zero; None detects
            negative values (:func:`is_signed`). Default: None
        percentiles (tuple[float, float], optional): clip range of
            ``normalize="percentile"``. Default: (1.0, 99.0)

    Returns:
        numpy.ndarray: ``(H, W, 3)`` uint8 at the image's size.

    Example::

        >>> rgb = transform.to_image(x[0])
        >>> pixels = overlay_array(rgb, AttentionRollout(model).attribute(x)[0])
    """
    pixels, _ = _render(
        image, attribution, alpha, blur_sigma, cmap, normalize, upsample, signed, percentiles
    )
    return pixels


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _colorbar(fig: Figure, ax: Axes, scale: _Scale) -> Any:
    """A colour bar in the map's raw units (rank scaling: ticks at raw quantiles)."""
    heat = scale.heat
    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormaps[scale.cmap])
    bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.03)
    if scale.normalize == "rank":
        qs = (0.0, 0.25, 0.5, 0.75, 1.0)
        if scale.signed:
            mags = np.quantile(np.abs(heat), qs)
            ticks = [0.5 - 0.5 * q for q in qs[:0:-1]] + [0.5 + 0.5 * q for q in qs]
            labels = [_fmt(-m) for m in mags[:0:-1]] + [_fmt(m) for m in mags]
            ticks, labels = ticks[::2], labels[::2]
        else:
            ticks, labels = list(qs), [_fmt(v) for v in np.quantile(heat, qs)]
        text = "rank scale, raw quantiles"
    elif scale.signed:
        mag = heat.__abs__()
        m = float(np.percentile(mag, scale.percentiles[1])) if scale.normalize == "percentile" else float(mag.max())
        ticks, labels = [0.0, 0.25, 0.5, 0.75, 1.0], [_fmt(-m), _fmt(-m / 2), "0", _fmt(m / 2), _fmt(m)]
        text = "signed, 0 centred" + (f", clip p{scale.percentiles[1]:g}" if scale.normalize == "percentile" else "")
    else:
        if scale.normalize == "percentile":
            lo, hi = (float(q) for q in np.percentile(heat, scale.percentiles))
            text = f"raw, clip p{scale.percentiles[0]:g}-p{scale.percentiles[1]:g}"
        else:
            lo, hi = float(heat.min()), float(heat.max())
            text = "raw, min-max"
        ticks = [0.0, 0.5, 1.0]
        labels = [_fmt(lo), _fmt((lo + hi) / 2), _fmt(hi)]
    bar.set_ticks(ticks, labels=labels)
    bar.set_label(text, fontsize=7)
    bar.ax.tick_params(labelsize=7)
    return bar


def overlay(
    image: Any,
    attribution: Any,
    alpha: float = 0.6,
    blur_sigma: float | None = None,
    cmap: str = "auto",
    normalize: str = "auto",
    colorbar: bool = True,
    *,
    title: str | None = None,
    upsample: str = "bilinear",
    signed: bool | None = None,
    percentiles: tuple[float, float] = (1.0, 99.0),
    ax: Axes | None = None,
) -> Figure:
    """Plot an attribution as a heat map over its image.

    Args:
        image (PIL.Image, numpy.ndarray or Tensor): the image the model saw.
        attribution (Tensor or numpy.ndarray): one map (input-shaped or patch grid).
        alpha (float, optional): heat-map weight. Default: 0.6
        blur_sigma (float, optional): Gaussian blur in pixels. Default: None
        cmap (str, optional): matplotlib colormap, or ``"auto"`` (diverging for
            signed maps, sequential otherwise; see :func:`choose_cmap`). Default: "auto"
        normalize (str, optional): ``"auto"``, ``"minmax"``, ``"percentile"`` or
            ``"rank"`` (see :func:`normalize_map`). Default: "auto"
        colorbar (bool, optional): draw a colour bar with ticks in the map's raw
            units (as drawn: after upsampling and blur). Default: True
        title (str, optional): axes title. Default: None
        upsample (str, optional): see :func:`overlay_array`. Default: "bilinear"
        signed (bool, optional): centre the scale at zero; None detects it.
            Default: None
        percentiles (tuple[float, float], optional): clip range of
            ``normalize="percentile"``. Default: (1.0, 99.0)
        ax (matplotlib.axes.Axes, optional): draw here instead of a new figure.
            Default: None

    Returns:
        matplotlib.figure.Figure: the figure (``ax.figure`` when ``ax`` is given).
        Nothing is shown; call ``fig.savefig(...)`` or display it in a notebook.

    Example::

        >>> fig = overlay(transform.to_image(x[0]), attr[0], blur_sigma=4)
        >>> fig.savefig("rollout.png")
    """
    pixels, scale = _render(
        image, attribution, alpha, blur_sigma, cmap, normalize, upsample, signed, percentiles
    )
    if ax is None:
        h, w = pixels.shape[:2]
        fig = Figure(figsize=(4.2 * w / h + (0.8 if colorbar else 0.0), 4.2), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = _figure_of(ax)
    ax.imshow(pixels)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    if colorbar:
        _colorbar(fig, ax, scale)
    return fig


def _figure_of(ax: Any) -> Figure:
    """The figure an ``Axes`` belongs to (for plots drawn into a caller's axes)."""
    root = ax.get_figure(root=True)
    if not isinstance(root, Figure):
        raise ValueError("ax is not attached to a figure")
    return root
