"""captum_vit: explain Vision Transformers as first-class Captum attributions."""

from ._capture import TokenLayout, UnsupportedModelError, ViTAdapter, adapt
from .attr import (
    AttentionFlow,
    AttentionRollout,
    GradientRollout,
    PatchOcclusion,
    RawAttention,
    SiftInterrelation,
    ViTGradCam,
)
from .heads import RegionProbe, ablate_heads, head_importance, region_probe
from .interrelation import InterrelationResult

__version__ = "0.1.0"

__all__ = [
    "AttentionFlow",
    "AttentionRollout",
    "GradientRollout",
    "InterrelationResult",
    "PatchOcclusion",
    "RawAttention",
    "RegionProbe",
    "SiftInterrelation",
    "TokenLayout",
    "UnsupportedModelError",
    "ViTAdapter",
    "ViTGradCam",
    "__version__",
    "ablate_heads",
    "adapt",
    "head_importance",
    "region_probe",
]
