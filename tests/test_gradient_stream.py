"""Streamed GradientRollout equals the all-layers-at-once computation it replaced.

The reference below is the previous implementation written out: one captured
(unfused) forward pass keeping every layer's attention, ``torch.autograd.grad`` of the
target score w.r.t. all of them at once, then Chefer's update or the rollout product
from the first layer up. The streamed version keeps fused attention, recomputes each
layer's probabilities in the backward pass and multiplies from the last layer down.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from torch import Tensor, nn

from captum_vit import GradientRollout, adapt
from captum_vit.attr._rollout import RolloutProduct, chefer_update


def _reference(
    model: nn.Module, x: Tensor, target: int, *, variant: str, start: int = 0, **kw: float
) -> Tensor:
    adapter = adapt(model)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        with adapter.capture(keep=True) as rec:
            scores = adapter.forward(xg)
        attns = rec.kept()[start:]
        score = scores[:, target].sum()
        grads = torch.autograd.grad(score, attns, allow_unused=True)
    layout = adapter.layout(x, rec.num_tokens or 0)
    relevance: Tensor | None = None
    product = None
    if variant == "rollout":
        weights = adapter.query_weights(layout)
        product = RolloutProduct(
            str(kw.get("head_fusion", "mean")), float(kw.get("discard_ratio", 0.0)),
            float(kw.get("residual_weight", 0.5)), torch.nonzero(weights > 0).flatten(),
        )
    for a, g in zip(attns, grads, strict=True):
        g = torch.zeros_like(a) if g is None else g
        if product is None:
            relevance = chefer_update(relevance, a.detach(), g.detach())
        else:
            product.update((a.detach().float() * g.float()).clamp(min=0))
    full = relevance if product is None else product.result
    assert full is not None
    rows = torch.einsum("n,bnm->bm", adapter.query_weights(layout), full)
    return rows[:, layout.num_prefix_tokens :].reshape(-1, 1, *layout.grid)


@pytest.mark.parametrize("variant", ["chefer", "rollout"])
def test_streamed_equals_all_at_once_every_family(
    family_model: tuple[str, nn.Module, int], variant: str
) -> None:
    _, model, size = family_model
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    got = GradientRollout(model, variant=variant).attribute(x, target=1, return_patch_grid=True)
    want = _reference(model, x, 1, variant=variant)
    assert isinstance(got, Tensor)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        {"head_fusion": "max", "discard_ratio": 0.3, "residual_weight": 0.25},
        {"head_fusion": "min", "residual_weight": 0.0},
    ],
)
def test_streamed_rollout_options(kw: dict[str, float]) -> None:
    model, size = make_model("timm_registers")
    x = torch.randn(2, 3, size, size)
    got = GradientRollout(model, variant="rollout", **kw).attribute(x, target=2, return_patch_grid=True)  # type: ignore[arg-type]
    torch.testing.assert_close(got, _reference(model, x, 2, variant="rollout", **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["chefer", "rollout"])
def test_streamed_start_layer_and_full_matrix(variant: str) -> None:
    model, size = make_model("timm_vit")
    x = torch.randn(1, 3, size, size)
    gr = GradientRollout(model, variant=variant, start_layer=1)
    got = gr.attribute(x, target=4, return_patch_grid=True)
    torch.testing.assert_close(got, _reference(model, x, 4, variant=variant, start=1), rtol=1e-5, atol=1e-5)
    full = gr.relevance(x, target=4)
    layout = gr.adapter.layout(x, full.shape[-1])
    rows = torch.einsum("n,bnm->bm", gr.adapter.query_weights(layout), full)
    torch.testing.assert_close(rows[:, 1:].reshape(1, 1, *layout.grid), got, rtol=1e-5, atol=1e-6)


def test_fused_attention_kept_and_one_layer_at_a_time() -> None:
    """The forward runs timm's fused kernel (no attn_drop call, flags untouched) and
    the backward delivers the layers from the last one down, each once."""
    model, size = make_model("timm_vit")
    adapter = adapt(model)
    drops = []
    handles = [m.attn.attn_drop.register_forward_hook(lambda *_: drops.append(1)) for m in model.blocks]
    order: list[int] = []
    try:
        with adapter.stream_attention_grads(lambda g: order.append(g.layer)) as stream:
            x = torch.randn(1, 3, size, size, requires_grad=True)
            score = adapter.forward(x)[:, 0].sum()
            assert all(bool(m.attn.fused_attn) for m in model.blocks)
            stream.backward(score)
    finally:
        for h in handles:
            h.remove()
    assert drops == []
    assert order == list(range(adapter.num_layers - 1, -1, -1))
    assert x.grad is None  # no backward to the input (and no parameter gradients)
    assert all(p.grad is None for p in model.parameters())


def test_training_mode_dropout_uses_materialised_attention() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, attn_drop_rate=0.5).train()
    x = torch.randn(1, 3, 160, 160)
    out = GradientRollout(model).attribute(x, target=0, return_patch_grid=True)
    assert isinstance(out, Tensor) and torch.isfinite(out).all()


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    logits = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    probs = logits.softmax(-1)
    return probs @ v, probs


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
def test_fused_layer_backward_matches_explicit_attention(mask_kind: str) -> None:
    """The fused layer's backward: P, G = dO·Vᵀ and the gradients of q, k, v equal
    those of attention written out, with and without masks."""
    from captum_vit._capture import AttentionGradStream

    gen = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 3, 7, 4
    q, k, v = (torch.randn(b, h, n, d, generator=gen, requires_grad=True) for _ in range(3))
    w = torch.randn(b, h, n, d, generator=gen)
    kwargs: dict[str, object] = {"scale": 0.3}
    mask: Tensor | None = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, n, n, generator=gen) > 0.3
        mask |= torch.eye(n, dtype=torch.bool)
        kwargs["attn_mask"] = mask
    elif mask_kind == "float":
        mask = torch.randn(b, h, n, n, generator=gen)
        kwargs["attn_mask"] = mask
    elif mask_kind == "causal":
        kwargs["is_causal"] = True
        mask = torch.ones(n, n, dtype=torch.bool).tril()
    got: list[tuple[Tensor, Tensor]] = []

    def on_layer(grad: object) -> None:
        got.extend((a.clone(), g.clone()) for a, g in grad.chunks(max_elements=b * n * n))  # type: ignore[attr-defined]

    stream = AttentionGradStream(2, on_layer, first_layer=0, validate=True)
    out = stream.sdpa(1, torch.nn.functional.scaled_dot_product_attention, (q, k, v), kwargs)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_out, ref_probs = _explicit_attention(q, k, v, 0.3, mask)
    ref_grads = torch.autograd.grad((ref_out * w).sum(), (q, k, v))
    assert len(got) == h  # one head per chunk at this budget
    probs = torch.cat([a for a, _ in got], dim=1)
    g = torch.cat([g for _, g in got], dim=1)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, ref_probs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, w @ v.detach().transpose(-2, -1), rtol=1e-5, atol=1e-6)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_stream_leaves_the_model_untouched() -> None:
    from captum_vit._capture import _slots_in_use

    model, size = make_model("timm_vit")
    before = {n: type(getattr(m, "fused_attn", None)) for n, m in model.named_modules()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    GradientRollout(model).attribute(torch.randn(1, 3, size, size), target=0)
    assert _slots_in_use() == 0
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert {n: type(getattr(m, "fused_attn", None)) for n, m in model.named_modules()} == before
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert all(p.grad is None for p in model.parameters())


def test_attention_without_sdpa_or_weights_runs_unfused() -> None:
    """A Hugging Face attention implementation that neither calls SDPA nor returns
    its weights: GradientRollout reruns with eager attention and gives the same map."""
    from transformers import AttentionInterface

    def opaque(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: object,
               scaling: float = 1.0, **kwargs: object) -> tuple[Tensor, None]:
        out = ((query * scaling) @ key.transpose(-2, -1)).softmax(-1) @ value  # no SDPA call
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("captum_vit_test_opaque", opaque)
    model, size = make_model("hf_vit")
    x = torch.randn(2, 3, size, size)
    want = _reference(model, x, 1, variant="chefer")
    model.set_attn_implementation("captum_vit_test_opaque")
    try:
        got = GradientRollout(model).attribute(x, target=1, return_patch_grid=True)
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
