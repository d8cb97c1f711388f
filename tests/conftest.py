"""Shared fixtures: one tiny random model per supported family, and the real DeiT-Tiny."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", category=UserWarning)

ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = ROOT.parent / "shared" / "assets"
SHARED_DEIT_WEIGHTS = SHARED_ASSETS / "models" / "deit_tiny_patch16_224.fp16.safetensors"
#: sha256 of the real DeiT-Tiny float16 weights (the shared copy and the bundled one).
DEIT_WEIGHTS_SHA256 = "0af164d9dc507fd8d9e16b38fe09661fe68beabbbcfed644ff007bfc7bb032c6"


def _real_deit_weights() -> Path:
    """The real DeiT-Tiny weights: ../shared/assets when present, else the copy bundled
    in the package (the same file), so the real-model tests run on any clone."""
    if SHARED_DEIT_WEIGHTS.is_file():
        return SHARED_DEIT_WEIGHTS
    from captum_vit.models import default_weights_path

    return default_weights_path()


DEIT_WEIGHTS = _real_deit_weights()
#: class_index,synset of the 500 ImageNet sample images (a copy of the shared labels.csv).
IMAGENET_SAMPLE_SYNSETS = ROOT / "tests" / "data" / "imagenet_sample_synsets.csv"

_HF = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)


def _timm_vit() -> tuple[nn.Module, int]:
    import timm

    return timm.create_model("test_vit", pretrained=False), 160


def _timm_deit_distilled() -> tuple[nn.Module, int]:
    import timm

    m = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, depth=2, img_size=64, num_classes=7
    )
    return m, 64


def _timm_registers() -> tuple[nn.Module, int]:
    import timm

    m = timm.create_model(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        depth=2,
        img_size=56,
        embed_dim=48,
        num_heads=2,
        num_classes=7,
    )
    return m, 56


def _timm_avgpool() -> tuple[nn.Module, int]:
    import timm

    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64, global_pool="avg", num_classes=7
    )
    return m, 64


def _timm_eva() -> tuple[nn.Module, int]:
    import timm

    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=2, img_size=56, num_classes=7), 56


def _hf_vit() -> tuple[nn.Module, int]:
    import transformers as tf

    return tf.ViTForImageClassification(tf.ViTConfig(num_labels=5, **_HF)), 32


def _hf_deit_teacher() -> tuple[nn.Module, int]:
    import transformers as tf

    return tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(num_labels=5, **_HF)), 32


def _hf_dinov2() -> tuple[nn.Module, int]:
    import transformers as tf

    return tf.Dinov2ForImageClassification(tf.Dinov2Config(num_labels=5, **_HF)), 32


def _hf_dinov2_registers() -> tuple[nn.Module, int]:
    import transformers as tf

    cfg = tf.Dinov2WithRegistersConfig(num_labels=5, num_register_tokens=3, **_HF)
    return tf.Dinov2WithRegistersForImageClassification(cfg), 32


def _hf_clip_vision() -> tuple[nn.Module, int]:
    import transformers as tf

    return tf.CLIPVisionModel(tf.CLIPVisionConfig(**_HF)), 32


def _hf_clip_classifier() -> tuple[nn.Module, int]:
    import transformers as tf

    cfg = tf.CLIPConfig(
        vision_config=dict(_HF),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        num_labels=5,
    )
    return tf.CLIPForImageClassification(cfg), 32


def _torchvision_vit() -> tuple[nn.Module, int]:
    import torchvision

    m = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    return m, 32


#: name -> factory returning (model, input size). Every supported family, tiny and random.
MODEL_FACTORIES: dict[str, Callable[[], tuple[nn.Module, int]]] = {
    "timm_vit": _timm_vit,
    "timm_deit_distilled": _timm_deit_distilled,
    "timm_registers": _timm_registers,
    "timm_avgpool": _timm_avgpool,
    "timm_eva": _timm_eva,
    "hf_vit": _hf_vit,
    "hf_deit_teacher": _hf_deit_teacher,
    "hf_dinov2": _hf_dinov2,
    "hf_dinov2_registers": _hf_dinov2_registers,
    "hf_clip_vision": _hf_clip_vision,
    "hf_clip_classifier": _hf_clip_classifier,
    "torchvision_vit": _torchvision_vit,
}


def make_model(name: str, seed: int = 0) -> tuple[nn.Module, int]:
    """A tiny random model of the family ``name`` in eval mode, and its input size."""
    torch.manual_seed(seed)
    model, size = MODEL_FACTORIES[name]()
    return model.eval(), size


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def family_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module, int]:
    """Parametrised over every supported family: (name, model, input size)."""
    model, size = make_model(request.param)
    return request.param, model, size


def load_real_deit() -> nn.Module:
    import safetensors.torch
    import timm

    m = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    state = safetensors.torch.load_file(str(DEIT_WEIGHTS))
    m.load_state_dict({k: v.float() for k, v in state.items()})
    return m.eval()


@pytest.fixture(scope="session")
def real_deit() -> nn.Module:
    """The real ImageNet DeiT-Tiny (../shared/assets, else the bundled copy)."""
    return load_real_deit()


@pytest.fixture(scope="session")
def chelsea_batch(real_deit: nn.Module) -> torch.Tensor:
    """skimage's chelsea preprocessed for the real DeiT-Tiny: (1, 3, 224, 224)."""
    import timm.data
    from PIL import Image
    from skimage import data

    cfg = timm.data.resolve_data_config({}, model=real_deit)
    transform = timm.data.create_transform(**cfg)
    return transform(Image.fromarray(data.chelsea())).unsqueeze(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (tiny models run fastest so on a shared, loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_method_registry() -> Iterator[None]:
    """Methods a test registers (``register_method``) are gone after it, so that they
    never reach a later test's ``available_methods()`` (e.g. the demo, whose subprocess
    does not have them)."""
    from captum_vit import registry

    before = dict(registry.METHODS)
    yield
    registry.METHODS.clear()
    registry.METHODS.update(before)


def register_counting_method(name: str, grid: int) -> list[int]:
    """Register ``name``: a method whose map is all ones on a ``grid x grid`` patch grid
    and that appends each batch's size to the returned list (which batches ran)."""
    from captum_vit.evaluation import register_method

    calls: list[int] = []

    def counting(m: nn.Module, a: object, o: object) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            calls.append(int(x.shape[0]))
            return torch.ones(x.shape[0], 1, grid, grid)

        return run

    register_method(name, counting, overwrite=True)
    return calls
