"""Patch-token masks: random, centre, score-guided and SIFT-guided (MAE-style)."""

from ._sift_masking import sift_curriculum, sift_guided_mask

__all__: list[str] = ["sift_curriculum", "sift_guided_mask"]
