"""Patch-token masks: random, centre, score-guided and SIFT-guided (MAE-style)."""

__all__: list[str] = []
