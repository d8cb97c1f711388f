"""Masking-sweep curves (Toseef 2025): how predictions survive masking a growing
fraction of patch tokens, one line per masking strategy."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..robustness import MaskingSweepResult
from .overlay import _figure_of

__all__ = ["plot_masking_sweep"]


def plot_masking_sweep(
    result: MaskingSweepResult,
    metric: str = "agreement",
    *,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Plot agreement (or accuracy) against the masked fraction, per strategy.

    Each strategy is drawn at the fraction of patches it actually masked
    (``result.actual_ratio``: the centre square can only approximate a ratio).

    Args:
        result (MaskingSweepResult): from :func:`captum_vit.masking_sweep`.
        metric (str, optional): ``"agreement"`` (top-1 equals the unmasked top-1) or
            ``"accuracy"`` (needs labels in the sweep). Default: "agreement"
        title (str, optional): axes title. Default: None (metric, images,
            replacement)
        ax (matplotlib.axes.Axes, optional): draw here. Default: None (new figure)

    Returns:
        matplotlib.figure.Figure: the figure; y in ``[0, 1]``, x the masked fraction.
        With ``"accuracy"`` the unmasked accuracy is a dashed line.

    Example::

        >>> sweep = masking_sweep(model, images, labels, ratios=[0.1, 0.3, 0.5])
        >>> fig = plot_masking_sweep(sweep, "accuracy")
    """
    if not isinstance(result, MaskingSweepResult):
        raise TypeError(f"result must be a MaskingSweepResult, got {type(result).__name__}")
    if metric not in ("agreement", "accuracy"):
        raise ValueError(f"metric must be 'agreement' or 'accuracy', got {metric!r}")
    values = result.agreement if metric == "agreement" else result.accuracy
    if values is None:
        raise ValueError("this sweep has no accuracy: run masking_sweep with labels")
    if ax is None:
        fig = Figure(figsize=(5.5, 3.8), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = _figure_of(ax)
    for i, strategy in enumerate(result.strategies):
        ax.plot(
            result.actual_ratio[i].tolist(), values[i].tolist(), marker="o", ms=4, label=strategy
        )
    if metric == "accuracy" and result.clean_accuracy is not None:
        ax.axhline(result.clean_accuracy, color="gray", ls="--", lw=1, label="unmasked")
    ax.set_xlabel("fraction of patch tokens masked")
    ax.set_ylabel(metric)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        title or f"{metric} under masking ({result.num_images} images, {result.replacement})",
        fontsize=10,
    )
    return fig
