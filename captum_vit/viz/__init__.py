"""Plots for captum_vit results. Every function returns a matplotlib ``Figure`` (or
draws on a given ``Axes``) and never calls ``plt.show()``."""

__all__: list[str] = []
