"""captum_vit.models: the bundled offline DeiT-Tiny, safe weight loading, timm / HF loaders."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEIT_WEIGHTS_SHA256, IMAGENET_SAMPLE_SYNSETS, SHARED_DEIT_WEIGHTS
from PIL import Image

from captum_vit.models import (
    ImageTransform,
    default_weights_path,
    imagenet_class_names,
    load_default,
    load_image,
    load_model,
    load_state_dict,
)


@pytest.fixture(scope="module")
def default_model() -> tuple[torch.nn.Module, ImageTransform, list[str]]:
    model, transform, names = load_default()
    assert isinstance(transform, ImageTransform)
    return model, transform, names


def test_bundled_weights_are_the_shared_deit_tiny() -> None:
    path = default_weights_path()
    assert path.is_file() and path.parent.name == "_assets"
    assert path.stat().st_size > 10_000_000
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == DEIT_WEIGHTS_SHA256
    if SHARED_DEIT_WEIGHTS.is_file():  # and the shared copy is that same file
        assert hashlib.sha256(SHARED_DEIT_WEIGHTS.read_bytes()).hexdigest() == DEIT_WEIGHTS_SHA256


def test_class_names_follow_timm_index_order() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[285] == "Egyptian cat"
    assert names[967] == "espresso"
    assert names[0].startswith("tench")
    # synset order of timm == the order the weights were trained with (the 500 sample
    # images' labels, copied from ../shared/assets/imagenet-sample/labels.csv)
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    with IMAGENET_SAMPLE_SYNSETS.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 500
    assert all(info.index_to_label_name(int(r["class_index"])) == r["synset"] for r in rows)


@pytest.mark.real_model
def test_load_default_predicts_skimage_classes(default_model) -> None:
    from skimage import data

    model, transform, names = default_model
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = transform.batch([data.chelsea(), data.coffee()])
    assert x.shape == (2, 3, 224, 224)
    with torch.no_grad():
        probs = model(x).softmax(-1)
    assert probs.argmax(-1).tolist() == [285, 967]
    assert names[int(probs[1].argmax())] == "espresso"
    assert abs(float(probs[0, 285]) - 0.44) < 0.02  # measured value in the assets README


@pytest.mark.real_model
def test_load_default_matches_the_reference_recipe(default_model, real_deit) -> None:
    model, transform, _ = default_model
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), real_deit(x))
    import timm.data

    ref = timm.data.create_transform(**timm.data.resolve_data_config({}, model=real_deit))
    from skimage import data

    img = Image.fromarray(data.astronaut())
    torch.testing.assert_close(transform(img), ref(img))


def test_transform_to_image_inverts_normalisation(default_model) -> None:
    _, transform, _ = default_model
    rgb = (np.arange(224 * 224 * 3) % 251).astype(np.uint8).reshape(224, 224, 3)
    # a 224x224 image is resized to 248 and centre-cropped: compare with the crop itself
    x = transform(rgb)
    back = transform.to_image(x)
    assert back.shape == (224, 224, 3) and back.dtype == np.uint8
    expected = np.clip(
        x.permute(1, 2, 0).numpy() * np.array(transform.std) + np.array(transform.mean), 0, 1
    )
    assert np.abs(back.astype(float) - np.round(expected * 255)).max() <= 1
    with pytest.raises(ValueError, match="one image"):
        transform.to_image(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="no images"):
        transform.batch([])


def test_load_image_variants(tmp_path: Path) -> None:
    gray = np.full((6, 5), 7, dtype=np.uint8)
    assert np.asarray(load_image(gray)).shape == (6, 5, 3)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    assert load_image(rgba).mode == "RGB"
    floats = np.full((3, 3, 3), 0.5)
    assert np.asarray(load_image(floats))[0, 0, 0] == 128  # rounded (0.5 * 255 = 127.5), not truncated
    Image.fromarray(gray).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png").mode == "RGB"
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((2, 3, 5, 5)))
    with pytest.raises(TypeError):
        load_image(42)  # type: ignore[arg-type]


def _tiny_timm() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()


def test_load_state_dict_safetensors_and_torch(tmp_path: Path) -> None:
    import safetensors.torch

    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16)}
    safetensors.torch.save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    torch.save(state, tmp_path / "plain.pth")
    for name in ("w.safetensors", "w.pt", "plain.pth"):
        got = load_state_dict(tmp_path / name)
        assert set(got) == {"a", "b"}
        torch.testing.assert_close(got["a"], state["a"])
        assert got["b"].dtype == torch.float16

    import argparse

    torch.save({"x": argparse.Namespace(code="arbitrary object")}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict(tmp_path / "pickled.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state dict"):
        load_state_dict(tmp_path / "list.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="safetensors"):
        load_state_dict(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "none.safetensors")


def test_load_model_timm_from_local_weights(tmp_path: Path) -> None:
    import safetensors.torch

    ref = _tiny_timm()
    safetensors.torch.save_file(ref.state_dict(), str(tmp_path / "tiny.safetensors"))
    torch.save(ref.state_dict(), tmp_path / "tiny.pt")
    x = torch.randn(2, 3, 160, 160)
    for weights in ("tiny.safetensors", "tiny.pt"):
        model, transform, names = load_model("timm:test_vit", weights=tmp_path / weights)
        assert not model.training
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x))
        assert transform.input_size == (160, 160)
        assert transform(np.zeros((50, 70, 3), dtype=np.uint8)).shape == (3, 160, 160)
        assert len(names) == 1000 and names[285] == "Egyptian cat"
    # weights of another architecture do not fit
    with pytest.raises(ValueError, match="do not fit"):
        load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "tiny.safetensors")
    # head size changed through model kwargs: names fall back to "class i"
    import timm

    small = timm.create_model("test_vit", pretrained=False, num_classes=3)
    safetensors.torch.save_file(small.state_dict(), str(tmp_path / "three.safetensors"))
    _, _, names3 = load_model("timm:test_vit", weights=tmp_path / "three.safetensors", num_classes=3)
    assert names3 == ["class 0", "class 1", "class 2"]


def test_load_model_hf_from_directory(tmp_path: Path) -> None:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=3, id2label={0: "cat", 1: "dog", 2: "cup"},
        label2id={"cat": 0, "dog": 1, "cup": 2},
    )
    ref = tf.ViTForImageClassification(cfg).eval()
    ref.save_pretrained(tmp_path / "vit")
    model, transform, names = load_model(f"hf:{tmp_path / 'vit'}")
    assert names == ["cat", "dog", "cup"]
    assert transform.input_size == (32, 32)
    x = transform(np.full((40, 50, 3), 200, dtype=np.uint8))[None]
    # no preprocessor_config.json: transformers' ViT defaults (mean = std = 0.5)
    torch.testing.assert_close(x[0, :, 0, 0], torch.full((3,), 200 / 255 * 2 - 1))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits)
    # explicit weights with the architecture from the directory's config
    import safetensors.torch

    safetensors.torch.save_file(ref.state_dict(), str(tmp_path / "vit.safetensors"))
    model2, _, _ = load_model(f"hf:{tmp_path / 'vit'}", weights=tmp_path / "vit.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model2(x).logits, ref(x).logits)
    # a processor saved with the model is used
    tf.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.0] * 3, image_std=[1.0] * 3).save_pretrained(
        tmp_path / "vit"
    )
    _, transform3, _ = load_model(f"hf:{tmp_path / 'vit'}")
    assert transform3.mean == (0.0, 0.0, 0.0)
    assert transform3(np.full((40, 50, 3), 255, dtype=np.uint8)).shape == (3, 32, 32)


# ------------------------------------------------------------- mask geometry (_mask_config)
def _stripes(h: int = 90, w: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """A non-square label map of vertical stripes (labels 0..5) and its grey image (label * 50)."""
    labels = np.repeat((np.arange(w) // 15 % 6)[None, :], h, 0)
    return labels, np.repeat((labels * 50).astype(np.uint8)[..., None], 3, 2)


def _agreement(spec: str, model: torch.nn.Module, transform: ImageTransform) -> tuple[dict[str, object], float]:
    """The loader's mask geometry and the fraction of model-input pixels whose label (read back
    from the preprocessed grey image) equals the mask aligned with that geometry."""
    from captum_vit.metrics import align_mask
    from captum_vit.models import _mask_config

    labels, image = _stripes()
    cfg = _mask_config(spec, model, transform)
    seen = np.clip(np.round(transform.to_image(transform(image))[..., 0] / 50.0), 0, 5)
    aligned = align_mask(torch.from_numpy(labels), cfg).numpy()
    assert aligned.shape == seen.shape == tuple(transform.input_size)
    return cfg, float((aligned == seen).mean())


def test_mask_config_timm_follows_timm_data_config(default_model, tmp_path: Path) -> None:
    """'default' and timm: timm's own data config (centre crop), and masks land on the image's pixels
    (the other crop mode would not: stripes of a non-square image move)."""
    import safetensors.torch

    model, transform, _ = default_model
    cfg, agree = _agreement("default", model, transform)
    assert (cfg["input_size"], cfg["crop_pct"], cfg["crop_mode"]) == ((3, 224, 224), 0.9, "center")
    assert agree > 0.97
    safetensors.torch.save_file(_tiny_timm().state_dict(), str(tmp_path / "tiny.safetensors"))
    model, transform, _ = load_model("timm:test_vit", weights=tmp_path / "tiny.safetensors")
    cfg, agree = _agreement("timm:test_vit", model, transform)
    assert (cfg["input_size"], cfg["crop_pct"], cfg["crop_mode"]) == ((3, 160, 160), 0.95, "center")
    assert agree > 0.97
    from captum_vit.metrics import align_mask

    labels, _ = _stripes()
    squashed = align_mask(torch.from_numpy(labels), {**cfg, "crop_mode": "squash"}).numpy()
    assert (squashed == align_mask(torch.from_numpy(labels), cfg).numpy()).mean() < 0.5


def test_mask_config_hf_follows_the_image_processor(tmp_path: Path) -> None:
    """hf: no processor (transformers' resize to the config size) and ViTImageProcessor squash the
    image; a CLIP-style processor (shortest edge, centre crop) crops with crop_pct = crop / edge, a
    DeiT one (resize to height x width, centre crop) squashes to crop / crop_pct, then crops."""
    import transformers as tf

    cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3)
    processors = {
        "none": None,
        "vit": tf.ViTImageProcessor(size={"height": 32, "width": 32}),
        "clip": tf.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}),
        # DeiT's processors resize both sides to (height, width), then centre-crop
        "deit": tf.DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}),
    }
    expected = {"none": (1.0, "squash"), "vit": (1.0, "squash"), "clip": (0.8, "center"), "deit": (0.8, "squash")}
    for name, proc in processors.items():
        torch.manual_seed(0)
        tf.ViTForImageClassification(cfg).save_pretrained(tmp_path / name)
        if proc is not None:
            proc.save_pretrained(tmp_path / name)
        spec = f"hf:{tmp_path / name}"
        model, transform, _ = load_model(spec)
        geometry, agree = _agreement(spec, model, transform)
        assert geometry == {"input_size": (3, 32, 32), "crop_pct": expected[name][0], "crop_mode": expected[name][1]}
        assert agree > 0.95, name


def test_load_model_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model source"):
        load_model("torchhub:deit")
    with pytest.raises(ValueError, match="should look like"):
        load_model("timm:")
    with pytest.raises(ValueError, match="no model named"):
        load_model("timm:not_a_real_model_name", weights=None)
    with pytest.raises(FileNotFoundError):
        load_model("timm:test_vit", weights=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="config"):
        load_model(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="default"):
        load_model("default", num_classes=3)
    with pytest.raises(ValueError, match="default"):
        load_model("default:x")
    with pytest.raises(TypeError):
        load_model(3)  # type: ignore[arg-type]
