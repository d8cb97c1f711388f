"""ViTGradCam: hand-computed case, independent implementation, layer choice, conventions."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_model
from torch import Tensor, nn

from captum_vit import ViTGradCam, adapt


class _Uniform(nn.Module):
    """Returns uniform attention probabilities (B, 1, N, N)."""

    def forward(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return torch.full((b, 1, n, n), 1.0 / n)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Uniform()

    def forward(self, t: Tensor) -> Tensor:
        return t + self.attn(t)[:, 0] @ t


class _TinyViT(nn.Module):
    """1 CLS + 2x3 patches of 4x4 pixels, D = 3; y = W · mean of patch tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()
        self.head = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]]))

    def tokens(self, x: Tensor) -> Tensor:
        patches = x.unfold(2, 4, 4).unfold(3, 4, 4).mean((-1, -2))  # (B, 3, 2, 3)
        t = patches.flatten(2).transpose(1, 2)
        return torch.cat([torch.zeros_like(t[:, :1]), t], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(self.tokens(x))
        return self.head(out[:, 1:].mean(1))


def test_known_answer_custom_model() -> None:
    model = _TinyViT()
    adapter = adapt(
        model, attention_modules=[model.block.attn], num_prefix_tokens=1, patch_size=4,
        pooling="mean_patch", blocks=[model.block],
    )
    x = torch.randn(2, 3, 8, 12)
    cam = ViTGradCam(model, adapter=adapter, relu=False)
    assert cam.layer == 0
    got = cam.attribute(x, target=[0, 1], return_patch_grid=True)
    with torch.no_grad():
        t = model.block(model.tokens(x))[:, 1:]  # (B, 6, 3)
    w = model.head.weight[[0, 1]] / 6  # dy/dT[p] = W_c / P for every patch
    expected = torch.einsum("bpd,bd->bp", t, w).reshape(2, 2, 3)
    torch.testing.assert_close(got[:, 0], expected, atol=1e-6, rtol=1e-5)
    relu = ViTGradCam(model, adapter=adapter).attribute(x, target=[0, 1], return_patch_grid=True)
    torch.testing.assert_close(relu, got.clamp(min=0))


def _reference_cam(model: nn.Module, x: Tensor, block: int, target: int, prefix: int) -> Tensor:
    store: dict[str, Tensor] = {}

    def hook(_m: nn.Module, _a: Any, out: Tensor) -> None:
        out.retain_grad()
        store["t"] = out

    h = model.blocks[block].register_forward_hook(hook)  # type: ignore[index]
    try:
        model.zero_grad()
        model(x)[:, target].sum().backward()
    finally:
        h.remove()
    t, g = store["t"][:, prefix:], store["t"].grad[:, prefix:]  # type: ignore[index]
    cam = (g.mean(1, keepdim=True) * t).sum(-1).clamp(min=0)
    side = int(cam.shape[1] ** 0.5)
    return cam.detach().reshape(-1, side, side)


@pytest.mark.parametrize(("name", "layer", "resolved"), [("timm_vit", -1, 4), ("timm_deit_distilled", 0, 0), ("timm_avgpool", -1, 1)])
def test_matches_independent_implementation(name: str, layer: int, resolved: int) -> None:
    model, size = make_model(name)
    x = torch.randn(2, 3, size, size)
    cam = ViTGradCam(model, layer=layer)
    assert cam.layer == resolved
    with torch.no_grad():
        got = cam.attribute(x, target=3, return_patch_grid=True)
    prefix = int(model.num_prefix_tokens)  # type: ignore[arg-type]
    ref = _reference_cam(model, x, resolved, 3, prefix)
    torch.testing.assert_close(got[:, 0], ref, atol=1e-6, rtol=1e-4)
    assert got.abs().sum() > 0


def test_layer_choice_and_errors() -> None:
    model, _ = make_model("timm_vit")  # CLS-pooled, 6 blocks
    assert ViTGradCam(model).layer == 4
    assert ViTGradCam(model, layer=-2).layer == 4
    assert ViTGradCam(model, layer=2).layer == 2
    with pytest.raises(ValueError, match="last block"):
        ViTGradCam(model, layer=5)
    with pytest.raises(ValueError, match="out of range"):
        ViTGradCam(model, layer=6)
    with pytest.raises(TypeError):
        ViTGradCam(model, layer=1.0)  # type: ignore[arg-type]
    avg, _ = make_model("timm_avgpool")
    assert ViTGradCam(avg, layer=-1).layer == 1
    custom = _TinyViT()
    no_blocks = adapt(custom, attention_modules=[custom.block.attn], patch_size=4)
    with pytest.raises(ValueError, match="blocks"):
        ViTGradCam(custom, adapter=no_blocks)


def test_every_family(family_model: tuple[str, nn.Module, int]) -> None:
    _, model, size = family_model
    x = torch.randn(2, 3, size, size)
    out = ViTGradCam(model).attribute(x, target=0)
    assert isinstance(out, Tensor)
    assert out.shape == x.shape and out.is_contiguous() and torch.isfinite(out).all()
    assert (out >= 0).all()


def test_batch_equals_single_tuple_and_target() -> None:
    model, size = make_model("timm_registers")
    x = torch.randn(3, 3, size, size)
    cam = ViTGradCam(model, relu=False)
    batch = cam.attribute((x,), target=[1, 2, 3])
    assert isinstance(batch, tuple) and batch[0].shape == x.shape
    for i in range(3):
        single = cam.attribute(x[i : i + 1], target=i + 1)
        torch.testing.assert_close(batch[0][i : i + 1], single, atol=1e-6, rtol=1e-4)
    a = cam.attribute(x[:1], target=1, return_patch_grid=True)
    b = cam.attribute(x[:1], target=2, return_patch_grid=True)
    assert not torch.allclose(a, b)  # class-specific
    with pytest.raises(ValueError, match="out of range"):
        cam.attribute(x, target=99)
    assert hasattr(ViTGradCam.attribute, "__wrapped__")


def test_non_square_grid() -> None:
    model, _ = make_model("hf_dinov2")  # accepts any multiple of the patch size
    x = torch.randn(2, 3, 32, 48)
    grid = ViTGradCam(model).attribute(x, target=1, return_patch_grid=True)
    assert isinstance(grid, Tensor) and grid.shape == (2, 1, 4, 6)
    assert ViTGradCam(model).attribute(x, target=1).shape == x.shape
