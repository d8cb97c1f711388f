"""Interrelation curves (Wu et al.): per-layer KK and NK with per-head points, focus
index per layer, and the three stages shaded."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from ..interrelation import InterrelationResult, InterrelationSummary

__all__ = ["plot_interrelation"]

_STAGE_COLORS = {"retrieval": "#dbe9f6", "capture": "#fde7c9", "coach": "#e3f1dc"}


def plot_interrelation(
    result: InterrelationResult | InterrelationSummary,
    *,
    title: str | None = None,
    figsize: tuple[float, float] = (8.0, 6.5),
    show_heads: bool = True,
    shade_stages: bool = True,
) -> Figure:
    r"""Plot per-layer θ_KK and θ_NK (lines, per-head points) and the focus index.

    Top panel: mean θ_KK and θ_NK over heads per layer, each head as a dot. Bottom
    panel: focus index (row entropy, nats; lower = more focused) per layer with the
    heads as dots. Both panels shade the retrieval / capture / coach layers of
    ``result.stages`` (nothing is shaded for an empty stage).

    Args:
        result (InterrelationResult or InterrelationSummary): from
            :meth:`captum_vit.SiftInterrelation.analyze` (reduced over its batch) or
            :func:`captum_vit.interrelation.aggregate_interrelation`.
        title (str, optional): figure title. Default: None (number of images and
            whether stages are clear)
        figsize (tuple[float, float], optional): figure size in inches.
            Default: (8.0, 6.5)
        show_heads (bool, optional): draw per-head points. Default: True
        shade_stages (bool, optional): shade the stages. Default: True

    Returns:
        matplotlib.figure.Figure: the figure (not shown; save it or display it).

    Example::

        >>> summary = aggregate_interrelation(SiftInterrelation(model), loader)
        >>> plot_interrelation(summary).savefig("interrelation.png", dpi=120)
    """
    if isinstance(result, InterrelationResult):
        summary = result.summary()
    elif isinstance(result, InterrelationSummary):
        summary = result
    else:
        raise TypeError(
            "result must be an InterrelationResult or InterrelationSummary, got "
            f"{type(result).__name__}"
        )
    kk = summary.kk.detach().cpu().float()
    nk = summary.nk.detach().cpu().float()
    fo = summary.focus_index.detach().cpu().float()
    layers, heads = kk.shape
    xs = list(range(layers))
    fig = Figure(figsize=figsize, layout="constrained")
    ax_t, ax_f = fig.subplots(2, 1, sharex=True)
    if shade_stages:
        for name, (lo, hi) in summary.stages.as_dict().items():
            if hi > lo:
                for ax in (ax_t, ax_f):
                    ax.axvspan(lo - 0.5, hi - 0.5, color=_STAGE_COLORS[name], zorder=0)
                ax_t.text((lo + hi - 1) / 2, 1.02, name, ha="center", va="bottom", fontsize=9,
                          transform=ax_t.get_xaxis_transform())
    style: dict[str, Any] = {"s": 12, "alpha": 0.55, "zorder": 2, "linewidths": 0}
    if show_heads:
        for h in range(heads):
            ax_t.scatter(xs, kk[:, h].tolist(), color="tab:red", **style)
            ax_t.scatter(xs, nk[:, h].tolist(), color="tab:blue", **style)
            ax_f.scatter(xs, fo[:, h].tolist(), color="tab:purple", **style)
    ax_t.plot(xs, summary.kk_layer.tolist(), "-o", color="tab:red", ms=4, label="θ_KK (keypoint → keypoint)", zorder=3)
    ax_t.plot(xs, summary.nk_layer.tolist(), "-o", color="tab:blue", ms=4, label="θ_NK (non-keypoint → keypoint)", zorder=3)
    ax_t.set_ylabel("weighted interrelation θ")
    ax_t.set_ylim(-0.02, 1.02)
    ax_t.legend(loc="lower left", fontsize=8)
    ax_t.grid(alpha=0.3)
    ax_f.plot(xs, summary.focus_layer.tolist(), "-o", color="tab:purple", ms=4, label="focus index (mean over heads)", zorder=3)
    ax_f.set_ylabel("focus index (entropy, nats)")
    ax_f.set_xlabel("layer")
    ax_f.set_xticks(xs)
    ax_f.legend(loc="lower left", fontsize=8)
    ax_f.grid(alpha=0.3)
    if title is None:
        title = (
            f"Patch interrelation over {summary.num_images} image(s); stages "
            f"{'clear' if summary.stages.clear else 'not clear'}"
        )
    fig.suptitle(title, fontsize=11)
    return fig
