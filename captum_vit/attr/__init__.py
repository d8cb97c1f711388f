"""Attribution methods, one per file, each a Captum ``Attribution`` subclass."""

from .attention_flow import AttentionFlow
from .attention_rollout import AttentionRollout
from .attn_lrp import AttnLRP
from .grad_cam import ViTGradCam
from .gradient_rollout import GradientRollout
from .patch_occlusion import PatchOcclusion
from .raw_attention import RawAttention
from .sift_interrelation import SiftInterrelation

__all__ = ["AttentionFlow", "AttentionRollout", "AttnLRP", "GradientRollout", "PatchOcclusion", "RawAttention", "SiftInterrelation", "ViTGradCam"]
