"""captum_vit: explain Vision Transformers as first-class Captum attributions."""

from . import metrics as metrics  # captum_vit.metrics after `import captum_vit`
from ._capture import PoolingPath, TokenLayout, UnsupportedModelError, ViTAdapter, adapt
from .attr import (
    AttentionFlow,
    AttentionRollout,
    AttnLRP,
    GradientRollout,
    PatchOcclusion,
    RawAttention,
    SiftInterrelation,
    ViTGradCam,
)
from .heads import RegionProbe, ablate_heads, head_importance, region_probe
from .interrelation import InterrelationResult
from .masking import masked_forward
from .robustness import MaskingSweepResult, compare_pooling, masking_sweep

__version__ = "0.1.0"

__all__ = [
    "AttentionFlow",
    "AttentionRollout",
    "AttnLRP",
    "GradientRollout",
    "InterrelationResult",
    "MaskingSweepResult",
    "PatchOcclusion",
    "PoolingPath",
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
    "compare_pooling",
    "head_importance",
    "masked_forward",
    "masking_sweep",
    "region_probe",
]
