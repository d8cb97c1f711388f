"""The capture layer: it must not change the model, and it must work on a user's own ViT."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import MODEL_FACTORIES, make_model
from torch import Tensor, nn

import captum_vit
from captum_vit import AttentionRollout, GradientRollout, RawAttention, adapt


def _state(model: nn.Module) -> dict[str, Any]:
    """Hooks, timm flags, HF attention implementations and MHA instance forwards."""
    return {
        "forward_hooks": sum(len(m._forward_hooks) for m in model.modules()),
        "forward_pre_hooks": sum(len(m._forward_pre_hooks) for m in model.modules()),
        "backward_hooks": sum(len(m._backward_hooks) for m in model.modules()),
        # truth value as seen by this thread, and the type (a plain bool outside captures)
        "fused": [bool(m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")],
        "fused_type": [type(m.fused_attn).__name__ for m in model.modules() if hasattr(m, "fused_attn")],
        "hf_impl": [
            m.config._attn_implementation
            for m in model.modules()
            if hasattr(getattr(m, "config", None), "_attn_implementation")
        ],
        "mha_forward": [
            "forward" in m.__dict__ for m in model.modules() if isinstance(m, nn.MultiheadAttention)
        ],
    }


def _scores(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.pooler_output


def test_capture_restores_model_and_keeps_logits(family_model: tuple[str, nn.Module, int]) -> None:
    name, model, size = family_model
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    before = _state(model)
    if name.startswith("timm"):
        assert any(before["fused"]), "timm models fuse attention by default"
    if name.startswith("hf"):
        assert "eager" not in before["hf_impl"], "HF models default to sdpa"
    with torch.no_grad():
        plain = _scores(model(x))
    adapter = adapt(model)
    with torch.no_grad(), adapter.capture() as rec:
        captured = adapter.forward(x)
        inside = _state(model)
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-4)
    assert all(a is not None and a.shape[0] == 2 for a in rec.attentions)
    if name.startswith("timm"):
        assert not any(inside["fused"])
    if name.startswith("hf"):
        # eager for this thread only, through captum_vit's dispatching attention function
        assert "captum_vit_thread_dispatch" in inside["hf_impl"]
    if name.startswith("torchvision"):
        assert all(inside["mha_forward"])
    assert _state(model) == before

    # every method, including ones that stop the forward early, and failing calls
    for method in (
        RawAttention(model),
        RawAttention(model, layer=0),
        AttentionRollout(model, discard_ratio=0.5),
        GradientRollout(model),
        GradientRollout(model, variant="rollout"),
    ):
        method.attribute(x, target=0)
        assert _state(model) == before
    with pytest.raises(ValueError, match="out of range"):
        GradientRollout(model).attribute(x, target=10_000)
    assert _state(model) == before
    with pytest.raises(ValueError, match="NaN"):
        AttentionRollout(model).attribute(torch.full_like(x, float("nan")))
    assert _state(model) == before

    # an exception raised inside the forward pass (here by a capture callback)
    def boom(layer: int, attn: Tensor) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), adapter.capture(on_attention=boom):
        adapter.forward(x)
    assert _state(model) == before
    with torch.no_grad():
        torch.testing.assert_close(_scores(model(x)), plain)


def test_hf_own_output_attentions_still_work_after_early_stop() -> None:
    model, size = make_model("hf_vit")
    x = torch.randn(1, 3, size, size)
    RawAttention(model, layer=0).attribute(x)  # stops the forward after layer 0
    model.set_attn_implementation("eager")
    try:
        out = model(pixel_values=x, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    assert len(out.attentions) == 2
    counts = sum(len(m._forward_hooks) for m in model.modules())
    RawAttention(model, layer=0).attribute(x)
    AttentionRollout(model).attribute(x)
    assert sum(len(m._forward_hooks) for m in model.modules()) == counts


def test_adapter_detects_prefix_and_pooling() -> None:
    expected = {
        "timm_vit": (1, "cls"),
        "timm_deit_distilled": (2, "cls_dist"),
        "timm_registers": (5, "cls"),
        "timm_avgpool": (1, "mean_patch"),
        "hf_deit_teacher": (2, "cls_dist"),
        "hf_dinov2": (1, "cls_mean_patch"),
        "hf_dinov2_registers": (4, "cls_mean_patch"),
        "hf_clip_classifier": (1, "mean_patch"),
        "torchvision_vit": (1, "cls"),
    }
    for name, (prefix, pooling) in expected.items():
        model, size = make_model(name)
        adapter = adapt(model)
        with torch.no_grad(), adapter.capture() as rec:
            adapter.forward(torch.randn(1, 3, size, size))
        assert rec.num_tokens is not None
        layout = adapter.layout(torch.randn(1, 3, size, size), rec.num_tokens)
        assert (layout.num_prefix_tokens, adapter.pooling) == (prefix, pooling), name
    assert set(expected) <= set(MODEL_FACTORIES)


@pytest.mark.parametrize(
    ("factory", "hw", "grid"),
    [
        ("timm_dynamic", (48, 80), (3, 5)),
        ("timm_dynamic", (64, 64), (4, 4)),
        ("hf_dinov2", (32, 48), (4, 6)),
        ("hf_dinov2", (56, 40), (7, 5)),
    ],
)
def test_non_square_and_other_sizes(factory: str, hw: tuple[int, int], grid: tuple[int, int]) -> None:
    if factory == "timm_dynamic":
        import timm

        torch.manual_seed(0)
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=5, dynamic_img_size=True
        ).eval()
    else:
        model, _ = make_model(factory)
    x = torch.randn(2, 3, *hw)
    assert adapt(model).grid_size(x) == grid
    for method in (RawAttention(model), AttentionRollout(model), GradientRollout(model)):
        g = method.attribute(x, target=1, return_patch_grid=True)
        assert isinstance(g, Tensor) and g.shape == (2, 1, *grid)
        full = method.attribute(x, target=1)
        assert isinstance(full, Tensor) and full.shape == x.shape
        # nearest-neighbour upsampling: pixel (r, c) carries patch (r // ph, c // pw)
        ph, pw = hw[0] // grid[0], hw[1] // grid[1]
        torch.testing.assert_close(full[:, 0, ::ph, ::pw], g[:, 0])
    maps = RawAttention(model).attention_maps(x)
    assert maps.shape[-2:] == grid


# ---------------------------------------------------------------------------- custom ViT
class TinyAttention(nn.Module):
    """Plain multi-head self-attention exposing its probabilities through ``probe``."""

    def __init__(self, dim: int, heads: int, return_probs: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.probe = nn.Identity()
        self.return_probs = return_probs
        self.last: Tensor | None = None

    def forward(self, x: Tensor) -> Any:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        probs = self.probe((q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5).softmax(-1))
        self.last = probs
        out = self.proj((probs @ v).transpose(1, 2).reshape(b, n, d))
        return (out, probs) if self.return_probs else out


class TinyViT(nn.Module):
    """A from-scratch ViT: 4x4 patches, one CLS token, ``depth`` pre-norm blocks."""

    def __init__(self, depth: int = 3, dim: int = 16, heads: int = 2, return_probs: bool = False) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attns = nn.ModuleList(TinyAttention(dim, heads, return_probs) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(depth))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos
        for norm, attn, mlp in zip(self.norms, self.attns, self.mlps, strict=True):
            a = attn(norm(t))
            t = t + (a[0] if isinstance(a, tuple) else a)
            t = t + mlp(t)
        return self.head(t[:, 0])


@pytest.mark.parametrize("return_probs", [False, True])
def test_custom_vit_end_to_end(return_probs: bool) -> None:
    torch.manual_seed(0)
    model = TinyViT(return_probs=return_probs).eval()
    attns = list(model.attns)
    modules = [a for a in attns] if return_probs else [a.probe for a in attns]  # type: ignore[union-attr]
    adapter = adapt(model, attention_modules=modules, num_prefix_tokens=1, patch_size=4)
    assert adapter.family == "custom"
    x = torch.randn(2, 3, 16, 16)

    # reference: the model's own record of its probabilities, autograd for the gradient
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    probs = [a.last for a in attns]  # type: ignore[union-attr]
    y = logits[0, 2] + logits[1, 3]
    grads = torch.autograd.grad(y, probs)
    for i in range(2):
        r = torch.eye(17)
        for a, g in zip(probs, grads, strict=True):
            assert a is not None
            r = r + ((g[i] * a[i]).clamp(min=0).mean(0)) @ r
        got = GradientRollout(model, adapter=adapter).attribute(x, target=[2, 3], return_patch_grid=True)
        assert isinstance(got, Tensor)
        torch.testing.assert_close(got[i, 0], r.detach()[0, 1:].reshape(4, 4), atol=1e-5, rtol=1e-4)

    raw = RawAttention(model, layer=1, adapter=adapter).attribute(x, return_patch_grid=True)
    assert isinstance(raw, Tensor)
    p1 = probs[1]
    assert p1 is not None
    torch.testing.assert_close(raw[:, 0], p1.detach().mean(1)[:, 0, 1:].reshape(2, 4, 4))
    ro = AttentionRollout(model, adapter=adapter).attribute(x)
    assert isinstance(ro, Tensor) and ro.shape == x.shape


def test_custom_vit_needs_patch_size() -> None:
    model = TinyViT()
    with pytest.raises(captum_vit.UnsupportedModelError, match="patch_size"):
        adapt(model, attention_modules=[a.probe for a in model.attns])  # type: ignore[union-attr]


def test_custom_vit_without_attention_modules_is_unsupported() -> None:
    with pytest.raises(captum_vit.UnsupportedModelError, match="attention_modules"):
        adapt(TinyViT())


def test_recorder_keeps_tensors_on_the_graph() -> None:
    model, size = make_model("timm_vit")
    adapter = adapt(model)
    x = torch.randn(1, 3, size, size, requires_grad=True)
    with adapter.capture() as rec:
        out = adapter.forward(x)
    grads = torch.autograd.grad(out[0, 0], rec.kept())
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
