"""Plots for captum_vit results. Every function returns a matplotlib ``Figure`` (or
draws on a given ``Axes``) and never calls ``plt.show()``."""

from .heads import plot_head_bars, plot_head_importance, plot_region_probe
from .interrelation import plot_interrelation
from .layers import (
    layer_grid,
    layer_head_grid,
    most_focused_layers,
    plot_most_focused,
    rollout_statistics,
)
from .masking import plot_masking_sweep
from .overlay import (
    DIVERGING_CMAP,
    SEQUENTIAL_CMAP,
    attribution_to_map,
    choose_cmap,
    image_to_array,
    is_signed,
    normalize_map,
    overlay,
    overlay_array,
)

__all__: list[str] = [
    "DIVERGING_CMAP",
    "SEQUENTIAL_CMAP",
    "attribution_to_map",
    "choose_cmap",
    "image_to_array",
    "is_signed",
    "layer_grid",
    "layer_head_grid",
    "most_focused_layers",
    "normalize_map",
    "overlay",
    "overlay_array",
    "plot_head_bars",
    "plot_head_importance",
    "plot_interrelation",
    "plot_masking_sweep",
    "plot_most_focused",
    "plot_region_probe",
    "rollout_statistics",
]
