"""Plots for captum_vit results. Every function returns a matplotlib ``Figure`` (or
draws on a given ``Axes``) and never calls ``plt.show()``."""

from .interrelation import plot_interrelation

__all__: list[str] = ["plot_interrelation"]
