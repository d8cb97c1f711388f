"""Property-based tests (hypothesis) of the capture and the methods.

Random tiny timm ViTs (patch size 4 / 8 / 16, 0..5 prefix tokens: CLS and/or
registers, CLS or mean pooling, any input size that is a multiple of the patch),
random batch sizes 1..5 and random targets. For every draw: the batch result equals
the per-sample results, shapes are as documented, nothing is left on the model and
nothing is NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from captum_vit import (
    AttentionRollout,
    GradientRollout,
    PatchOcclusion,
    RawAttention,
    ViTGradCam,
    adapt,
)
from captum_vit._capture import _slots_in_use

NUM_CLASSES = 6
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@functools.cache
def _model(patch: int, prefix: int, cls_pool: bool) -> nn.Module:
    """A 2-layer timm ViT with ``prefix`` prefix tokens (CLS first when ``cls_pool``)."""
    import timm

    torch.manual_seed(patch * 10 + prefix)
    cls = cls_pool and prefix > 0
    return timm.models.VisionTransformer(
        img_size=4 * patch,
        patch_size=patch,
        embed_dim=16,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=NUM_CLASSES,
        class_token=cls,
        reg_tokens=prefix - int(cls),
        global_pool="token" if cls else "avg",
        dynamic_img_size=True,
    ).eval()


@st.composite
def cases(draw: st.DrawFn) -> tuple[nn.Module, Tensor, Tensor, int]:
    patch = draw(st.sampled_from([4, 8, 16]))
    prefix = draw(st.integers(0, 5))
    cls_pool = draw(st.booleans())
    gh, gw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    batch = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, gh * patch, gw * patch, generator=g)
    targets = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return _model(patch, prefix, cls_pool), x, targets, prefix


def _model_state(model: nn.Module) -> tuple[Any, ...]:
    return (
        [dict(m._forward_hooks) for m in model.modules()],
        [dict(m._forward_pre_hooks) for m in model.modules()],
        [(type(m.fused_attn), m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")],
        ["forward" in m.__dict__ for m in model.modules()],
    )


Method = Callable[[nn.Module, Tensor, Tensor, bool], Tensor]

METHODS: dict[str, Method] = {
    "raw": lambda m, x, t, g: RawAttention(m).attribute(x, return_patch_grid=g),
    "raw_first": lambda m, x, t, g: RawAttention(m, layer=0, head_fusion="max").attribute(x, return_patch_grid=g),
    "rollout": lambda m, x, t, g: AttentionRollout(m, discard_ratio=0.3).attribute(x, return_patch_grid=g),
    "chefer": lambda m, x, t, g: GradientRollout(m).attribute(x, target=t, return_patch_grid=g),
    "grad_rollout": lambda m, x, t, g: GradientRollout(m, variant="rollout").attribute(x, target=t, return_patch_grid=g),
    "gradcam": lambda m, x, t, g: ViTGradCam(m).attribute(x, target=t, return_patch_grid=g),
    "occlusion": lambda m, x, t, g: PatchOcclusion(m).attribute(
        x, target=t, perturbations_per_eval=3, return_patch_grid=g
    ),
}


@pytest.mark.parametrize("name", sorted(METHODS))
@settings(SETTINGS, max_examples=8)
@given(case=cases(), patch_grid=st.booleans())
def test_methods_batch_equals_single_shapes_no_nan_no_leftovers(
    name: str, case: tuple[nn.Module, Tensor, Tensor, int], patch_grid: bool
) -> None:
    model, x, targets, _ = case
    method = METHODS[name]
    before = _model_state(model)
    out = method(model, x, targets, patch_grid)
    b, _, h, w = x.shape
    gh, gw = adapt(model).grid_size(x)
    assert out.shape == ((b, 1, gh, gw) if patch_grid else (b, 3, h, w)), (name, out.shape)
    assert torch.isfinite(out).all(), name
    for i in range(b):
        alone = method(model, x[i : i + 1], targets[i : i + 1], patch_grid)
        torch.testing.assert_close(out[i : i + 1], alone, atol=2e-5, rtol=1e-4, msg=name)
    assert _model_state(model) == before
    assert _slots_in_use() == 0


@SETTINGS
@given(case=cases())
def test_capture_shapes_layout_and_restoration(case: tuple[nn.Module, Tensor, Tensor, int]) -> None:
    model, x, _, prefix = case
    adapter = adapt(model)
    before = _model_state(model)
    with torch.no_grad():
        plain = model(x)
    with torch.no_grad(), adapter.capture() as rec:
        logits = adapter.forward(x)
    gh, gw = adapter.grid_size(x)
    n = prefix + gh * gw
    assert rec.seen == {0, 1} and rec.num_tokens == n
    for attn in rec.kept():
        assert attn.shape == (x.shape[0], 2, n, n)
        assert torch.isfinite(attn).all()
        torch.testing.assert_close(attn.sum(-1), torch.ones(x.shape[0], 2, n))
    layout = adapter.layout(x, n)
    assert (layout.num_prefix_tokens, layout.grid) == (prefix, (gh, gw))
    weights = adapter.query_weights(layout)
    assert weights.shape == (n,) and abs(float(weights.sum()) - 1) < 1e-6
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-4)
    assert _model_state(model) == before
    assert _slots_in_use() == 0
