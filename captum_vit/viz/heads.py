"""Plots of per-head scores: a heads x layers heat map, per-head bars, a region probe.

``scores`` is what :func:`captum_vit.head_importance` returns for one image:
``(layers, heads)`` (a batch of one ``(1, layers, heads)`` is accepted). Layer and head
indices are 0-based.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .overlay import image_to_array

if TYPE_CHECKING:
    from ..heads import RegionProbe

__all__ = ["plot_head_bars", "plot_head_importance", "plot_region_probe"]


def _scores(scores: Any) -> np.ndarray:
    t = torch.as_tensor(scores).detach().float().cpu()
    if t.ndim == 3:
        if t.shape[0] != 1:
            raise ValueError(f"expected the scores of one image, got a batch of {t.shape[0]}: index it")
        t = t[0]
    if t.ndim != 2:
        raise ValueError(f"scores must be (layers, heads), got shape {tuple(t.shape)}")
    return t.numpy()


def _figure_axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        fig = ax.get_figure()
        assert isinstance(fig, Figure)
        return fig, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def plot_head_importance(
    scores: Any,
    *,
    ax: Axes | None = None,
    title: str | None = "head importance",
    cmap: str | None = None,
    annotate: bool = True,
    colorbar_label: str = "importance",
) -> Figure:
    r"""Heads x layers heat map of per-head scores.

    Args:
        scores (Tensor or array): ``(layers, heads)`` (or ``(1, layers, heads)``).
        ax (Axes, optional): draw here instead of a new figure. Default: None
        title (str, optional): axes title. Default: "head importance"
        cmap (str, optional): colormap; default ``"RdBu_r"`` centred on 0 when the
            scores have both signs, else ``"viridis"``. Default: None
        annotate (bool, optional): write each value in its cell (when the grid has
            at most 300 cells). Default: True
        colorbar_label (str, optional): colour-bar label. Default: "importance"

    Returns:
        Figure: the figure (rows = heads, columns = layers).

    Example::

        >>> fig = plot_head_importance(head_importance(model, image)[0])
        >>> fig.savefig("heads.png")
    """
    s = _scores(scores)
    layers, heads = s.shape
    fig, axes = _figure_axes(ax, (max(4.0, 0.55 * layers + 2.0), max(2.5, 0.5 * heads + 1.5)))
    signed = bool((s < 0).any() and (s > 0).any())
    vmax = float(np.abs(s).max()) or 1.0
    kwargs: dict[str, Any] = (
        {"cmap": cmap or "RdBu_r", "vmin": -vmax, "vmax": vmax} if signed else {"cmap": cmap or "viridis"}
    )
    im = axes.imshow(s.T, aspect="auto", origin="upper", **kwargs)
    axes.set_xlabel("layer")
    axes.set_ylabel("head")
    axes.set_xticks(range(layers))
    axes.set_yticks(range(heads))
    if title:
        axes.set_title(title)
    if annotate and layers * heads <= 300:
        digits = 1 if vmax >= 10 else 2 if vmax >= 0.1 else 3
        for li in range(layers):
            for h in range(heads):
                axes.text(li, h, f"{s[li, h]:.{digits}f}", ha="center", va="center", fontsize=7,
                          color="black" if signed else "white")
    fig.colorbar(im, ax=axes, label=colorbar_label)
    return fig


def plot_head_bars(
    scores: Any,
    *,
    layer: int | None = None,
    top_k: int | None = 15,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    r"""Bar chart of per-head scores.

    Args:
        scores (Tensor or array): ``(layers, heads)`` (or ``(1, layers, heads)``).
        layer (int, optional): plot the heads of this layer (negative counts from
            the end) in head order; ``None`` ranks all (layer, head) pairs by value.
            Default: None
        top_k (int, optional): with ``layer=None``, how many pairs to show
            (``None`` = all). Default: 15
        ax (Axes, optional): draw here instead of a new figure. Default: None
        title (str, optional): axes title. Default: None (a descriptive one)

    Returns:
        Figure: the figure.

    Example::

        >>> fig = plot_head_bars(scores, layer=-1)
    """
    s = _scores(scores)
    layers, heads = s.shape
    if layer is not None:
        if not -layers <= layer < layers:
            raise ValueError(f"layer={layer} is out of range for {layers} layers")
        layer %= layers
        values = s[layer]
        labels = [f"h{h}" for h in range(heads)]
        default_title = f"layer {layer}: per-head score"
    else:
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        flat = s.flatten()
        order = np.argsort(-flat)[: top_k or flat.size]
        values = flat[order]
        labels = [f"L{i // heads}h{i % heads}" for i in order]
        default_title = f"top {len(order)} heads"
    fig, axes = _figure_axes(ax, (max(4.0, 0.35 * len(values) + 1.5), 3.0))
    colors = ["tab:red" if v < 0 else "tab:blue" for v in values]
    axes.bar(range(len(values)), values, color=colors)
    axes.set_xticks(range(len(values)))
    axes.set_xticklabels(labels, rotation=60 if len(values) > 8 else 0, fontsize=8)
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.set_ylabel("score")
    axes.set_title(title if title is not None else default_title)
    return fig


def plot_region_probe(
    probe: RegionProbe,
    image: Any = None,
    *,
    sample: int = 0,
    class_names: list[str] | None = None,
) -> Figure:
    r"""One figure summarising a :class:`captum_vit.RegionProbe` for one sample.

    Panels: the image (or the patch grid) with the region outlined; heads x layers
    maps of the attention mass on the region minus the mean head, and of the
    attention shift when the region is pruned; the title reports the target's
    probability and the top-1 class with and without the region.

    Args:
        probe (RegionProbe): from :func:`captum_vit.region_probe`.
        image (array, Tensor or PIL image, optional): the image the model saw
            (HWC uint8, CHW float in [0, 1], ...). Default: None (grid only)
        sample (int, optional): which sample of the probe's batch. Default: 0
        class_names (list[str], optional): names for the class indices.
            Default: None

    Returns:
        Figure: the figure.

    Example::

        >>> fig = plot_region_probe(region_probe(model, x, box), image=pil_image)
    """
    region = probe.region[sample].cpu()
    patches = int(region.numel())
    mass = probe.mass_deviation[sample]
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3, width_ratios=[1.0, 1.4, 1.4])
    side = round(patches**0.5)
    grid = (side, patches // side) if side * (patches // side) == patches else (1, patches)
    reg = region.reshape(grid).numpy()
    if image is not None:
        img = image_to_array(image)
        axes[0].imshow(img)
        ph, pw = img.shape[0] / grid[0], img.shape[1] / grid[1]
    else:
        axes[0].imshow(reg, cmap="gray")
        ph = pw = 1.0
    rows, cols = np.nonzero(reg)
    for r, c in zip(rows, cols, strict=True):
        off = 0.0 if image is not None else -0.5
        axes[0].add_patch(Rectangle((c * pw + off, r * ph + off), pw, ph, fill=True,
                                    facecolor="yellow", alpha=0.25, edgecolor="none"))
    axes[0].set_axis_off()

    def name(c: int) -> str:
        return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)

    t = int(probe.target[sample])
    axes[0].set_title(
        f"region ({int(region.sum())} patches)\n"
        f"p({name(t)}): {float(probe.probability[sample]):.3f} -> "
        f"{float(probe.pruned_probability[sample]):.3f} pruned\n"
        f"top-1: {name(int(probe.prediction[sample]))} -> {name(int(probe.pruned_prediction[sample]))}",
        fontsize=9,
    )
    plot_head_importance(mass, ax=axes[1], title="attention mass on region - mean head",
                         colorbar_label="mass deviation", annotate=True)
    plot_head_importance(probe.attention_shift[sample], ax=axes[2],
                         title="attention shift when region pruned (TV distance)",
                         colorbar_label="TV distance", annotate=True)
    return fig
