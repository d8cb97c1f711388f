"""Per-layer views of attention: layer grids, every layer x head, the most focused
layers (Urbaitis 2025) and summary statistics of a map.

``maps`` below is what :meth:`captum_vit.RawAttention.attention_maps` returns for one
image: ``(L, heads, gh, gw)`` (a batch of one ``(1, L, heads, gh, gw)`` is accepted,
and so is ``(L, gh, gw)`` with heads already fused). Layer indices are 0-based, as in
``RawAttention(layer=...)``: the paper's "layers 1, 6 and 12" of a 12-layer model
are ``layers=(0, 5, 11)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from .._utils import _single_tensor
from .overlay import image_to_array, overlay_array

__all__ = [
    "layer_grid",
    "layer_head_grid",
    "most_focused_layers",
    "plot_most_focused",
    "rollout_statistics",
]


def _layer_maps(maps: Any, *, fuse: bool) -> Tensor:
    """(L, heads, gh, gw) float tensor (or (L, gh, gw) when fuse=True)."""
    t = torch.as_tensor(maps).detach().float().cpu()
    if t.ndim == 5:
        if t.shape[0] != 1:
            raise ValueError(f"expected the maps of one image, got a batch of {t.shape[0]}: index it")
        t = t[0]
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[0] == 0:
        raise ValueError(
            "maps must be (L, heads, gh, gw), (1, L, heads, gh, gw) or (L, gh, gw) "
            f"(RawAttention.attention_maps output); got shape {tuple(t.shape)}"
        )
    return t.mean(dim=1) if fuse else t


def _check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    out = []
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer indices must be ints, got {layer!r}")
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"layer {layer} is out of range for {num_layers} layers")
        out.append(layer % num_layers)
    if not out:
        raise ValueError("no layers given")
    return out


def layer_grid(
    image: Any,
    maps: Any,
    layers: Sequence[int] | None = None,
    *,
    alpha: float = 0.6,
    blur_sigma: float | None = None,
    cmap: str = "auto",
    normalize: str = "auto",
    panel_size: float = 2.6,
) -> Figure:
    """Head-averaged attention of a few layers side by side, over the image.

    Args:
        image (PIL.Image, numpy.ndarray or Tensor): the image the model saw.
        maps (Tensor): ``(L, heads, gh, gw)`` from ``RawAttention.attention_maps``.
        layers (Sequence[int], optional): 0-based layers to show. Default: None
            (first, middle and last layer: 0, L // 2 - 1 or 0, L - 1; for 12 layers
            the paper's layers 1, 6, 12)
        alpha (float, optional): heat-map weight. Default: 0.6
        blur_sigma (float, optional): Gaussian blur in pixels. Default: None
        cmap (str, optional): matplotlib colormap or ``"auto"`` (see
            :func:`~captum_vit.viz.choose_cmap`). Default: "auto"
        normalize (str, optional): ``"auto"``, ``"minmax"``, ``"percentile"`` or
            ``"rank"``, per panel (see :func:`~captum_vit.viz.normalize_map`).
            Default: "auto"
        panel_size (float, optional): inches per panel. Default: 2.6

    Returns:
        matplotlib.figure.Figure: one row of panels titled ``layer i``.

    Example::

        >>> maps = RawAttention(model).attention_maps(x)[0]     # (12, 3, 14, 14)
        >>> fig = layer_grid(transform.to_image(x[0]), maps, layers=(0, 5, 11))
    """
    fused = _layer_maps(maps, fuse=True)
    n = fused.shape[0]
    chosen = _check_layers(
        layers if layers is not None else sorted({0, max(n // 2 - 1, 0), n - 1}), n
    )
    fig = Figure(figsize=(panel_size * len(chosen), panel_size + 0.3), layout="constrained")
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, layer in zip(axes, chosen, strict=True):
        ax.imshow(overlay_array(image, fused[layer], alpha, blur_sigma, cmap, normalize))
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_axis_off()
    return fig


def layer_head_grid(
    image: Any,
    maps: Any,
    *,
    alpha: float = 0.6,
    blur_sigma: float | None = None,
    cmap: str = "auto",
    normalize: str = "auto",
    panel_size: float = 1.4,
) -> Figure:
    """Every layer (rows) x every head (columns) over the image.

    Args:
        image (PIL.Image, numpy.ndarray or Tensor): the image the model saw.
        maps (Tensor): ``(L, heads, gh, gw)`` from ``RawAttention.attention_maps``.
        alpha (float, optional): heat-map weight. Default: 0.6
        blur_sigma (float, optional): Gaussian blur in pixels. Default: None
        cmap (str, optional): matplotlib colormap or ``"auto"`` (see
            :func:`~captum_vit.viz.choose_cmap`). Default: "auto"
        normalize (str, optional): ``"auto"``, ``"minmax"``, ``"percentile"`` or
            ``"rank"``, per panel (see :func:`~captum_vit.viz.normalize_map`).
            Default: "auto"
        panel_size (float, optional): inches per panel. Default: 1.4

    Returns:
        matplotlib.figure.Figure: ``L x heads`` panels; rows labelled ``layer l``,
        columns ``head h``.

    Example::

        >>> fig = layer_head_grid(transform.to_image(x[0]), maps)
    """
    t = _layer_maps(maps, fuse=False)
    num_layers, heads = t.shape[:2]
    base = image_to_array(image)
    fig = Figure(figsize=(panel_size * heads + 0.4, panel_size * num_layers), layout="constrained")
    axes = fig.subplots(num_layers, heads, squeeze=False)
    for layer in range(num_layers):
        for head in range(heads):
            ax = axes[layer, head]
            ax.imshow(overlay_array(base, t[layer, head], alpha, blur_sigma, cmap, normalize))
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    return fig


def _mask_grid(mask: Any, grid: tuple[int, int], threshold: float) -> Tensor:
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask)
    m = m.detach().float().cpu()
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W) or (gh, gw); got shape {tuple(m.shape)}")
    if tuple(m.shape) == grid:
        return ((m >= threshold) if m.max() <= 1 else (m > 0)).float()
    frac = F.adaptive_avg_pool2d((m > 0).float()[None, None], grid)[0, 0]
    return (frac >= threshold).float()


def most_focused_layers(
    maps: Any, mask: Any = None, k: int = 3, *, threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Rank layers by how focused their (head-averaged) attention is.

    Each layer's map is turned into a distribution ``p`` over patches (divided by its
    sum). With a ``mask``, a layer's score is the attention mass on the object:
    ``Σ_{patches in mask} p`` (a patch is in the mask when at least ``threshold`` of
    its pixels are). Without a mask the score is the concentration
    ``1 - H(p) / log(P)`` (1 = all mass on one patch, 0 = uniform).

    Args:
        maps (Tensor): ``(L, heads, gh, gw)`` from ``RawAttention.attention_maps``
            (or ``(L, gh, gw)``).
        mask (Tensor or numpy.ndarray, optional): object mask at image size
            ``(H, W)`` (nonzero = object) or on the patch grid ``(gh, gw)``.
            Default: None
        k (int, optional): how many layers to return. Default: 3
        threshold (float, optional): pixel fraction that puts a patch in the mask.
            Default: 0.5

    Returns:
        tuple[Tensor, Tensor]: the ``k`` best layer indices (best first, 0-based) and
        every layer's score ``(L,)``.

    Example::

        >>> top, scores = most_focused_layers(maps, mask=cat_mask, k=3)
    """
    fused = _layer_maps(maps, fuse=True)
    num_layers = fused.shape[0]
    if not isinstance(k, int) or not 1 <= k <= num_layers:
        raise ValueError(f"k must be an int in [1, {num_layers}], got {k!r}")
    flat = fused.clamp(min=0).flatten(1)
    p = flat / flat.sum(dim=1, keepdim=True).clamp(min=1e-12)
    if mask is None:
        logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
        entropy = -(p * logp).sum(dim=1)
        scores = 1.0 - entropy / math.log(max(p.shape[1], 2))
    else:
        grid = (int(fused.shape[1]), int(fused.shape[2]))
        scores = (p * _mask_grid(mask, grid, threshold).flatten()[None]).sum(dim=1)
    return torch.argsort(scores, descending=True, stable=True)[:k], scores


def plot_most_focused(
    image: Any,
    maps: Any,
    mask: Any = None,
    k: int = 3,
    *,
    alpha: float = 0.6,
    blur_sigma: float | None = None,
    cmap: str = "jet",
    panel_size: float = 2.6,
) -> Figure:
    """Overlays of the ``k`` most focused layers, with their scores.

    Args:
        image (PIL.Image, numpy.ndarray or Tensor): the image the model saw.
        maps (Tensor): ``(L, heads, gh, gw)`` from ``RawAttention.attention_maps``.
        mask (Tensor or numpy.ndarray, optional): object mask (see
            :func:`most_focused_layers`). Default: None
        k (int, optional): number of layers. Default: 3
        alpha (float, optional): heat-map weight. Default: 0.6
        blur_sigma (float, optional): Gaussian blur in pixels. Default: None
        cmap (str, optional): matplotlib colormap. Default: "jet"
        panel_size (float, optional): inches per panel. Default: 2.6

    Returns:
        matplotlib.figure.Figure: ``k`` panels titled ``layer i`` with the mass on the
        mask (or the concentration) of that layer.
    """
    top, scores = most_focused_layers(maps, mask, k)
    fused = _layer_maps(maps, fuse=True)
    label = "mass on mask" if mask is not None else "concentration"
    fig = Figure(figsize=(panel_size * k, panel_size + 0.4), layout="constrained")
    axes = fig.subplots(1, k, squeeze=False)[0]
    for ax, layer in zip(axes, top.tolist(), strict=True):
        ax.imshow(overlay_array(image, fused[layer], alpha, blur_sigma, cmap))
        ax.set_title(f"layer {layer}\n{label} {scores[layer].item():.3f}", fontsize=9)
        ax.set_axis_off()
    return fig


def rollout_statistics(attributions: Any) -> dict[str, Tensor]:
    """Per-sample max, min and mean of maps (the rollout statistics of Das & Huddar).

    Args:
        attributions (Tensor or tuple[Tensor]): ``(B, C, H, W)`` or ``(B, 1, gh, gw)``
            as returned by ``attribute``; a 1-tuple is unpacked.

    Returns:
        dict[str, Tensor]: ``"max"``, ``"min"``, ``"mean"``, each ``(B,)`` float32.

    Example::

        >>> stats = rollout_statistics(AttentionRollout(model).attribute(x))
        >>> stats["max"], stats["mean"]
    """
    attributions = _single_tensor(attributions)
    if attributions.ndim < 2:
        raise ValueError(f"attributions must be batched (B, ...), got shape {tuple(attributions.shape)}")
    flat = attributions.detach().float().flatten(1)
    return {"max": flat.amax(dim=1), "min": flat.amin(dim=1), "mean": flat.mean(dim=1)}
