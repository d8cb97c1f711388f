"""AttnLRP: lxt's own map, known answers of the rules, an independent reference,
every family, batch = single, the model untouched (also on errors and across threads),
bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_FACTORIES, make_model
from torch import Tensor, nn

from captum_vit import AttnLRP, GradientRollout, _lrp, adapt
from captum_vit._capture import _slots_in_use

ROOT = Path(__file__).resolve().parents[1]
PLAIN = {"patch_embed": "epsilon", "mlp": "epsilon", "head": "epsilon", "attn_proj": "gradient", "epsilon": 0.0}


# ------------------------------------------------------------------------ lxt itself
@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("lxt") is None or importlib.util.find_spec("zennit") is None,
    reason="lxt / zennit not installed (pip install -e .[lrp-test])",
)
def test_equals_lxt_cp_lrp_on_torchvision_vit() -> None:
    # lxt's monkey_patch replaces torch classes for the whole process: subprocess only.
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_lxt_reference.py")],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert diffs["gamma_scale"] > 0 and diffs["epsilon0_scale"] > 0
    assert diffs["gamma"] < 1e-5, diffs  # Gamma 0.25 conv / 0.05 linears, lxt's ViT example
    assert diffs["epsilon0"] < 1e-5, diffs  # lxt's cp_LRP without zennit


# ------------------------------------------------------------------------ known answers
def _explicit_gamma(w: Tensor, b: Tensor, x: Tensor, r_out: Tensor, gamma: float, eps: float) -> Tensor:
    """zennit's generalised Gamma rule written out term by term."""
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    bp, bn = b.clamp(min=0), b.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    w_pp, w_nn = w + gamma * wp, w + gamma * wn  # favour positive / negative weights
    z = x @ w.T + b
    z_pos = xp @ w_pp.T + (b + gamma * bp) + xn @ w_nn.T
    z_neg = xp @ w_nn.T + (b + gamma * bn) + xn @ w_pp.T

    def stab(d: Tensor) -> Tensor:
        return d + eps * torch.where(d >= 0, 1.0, -1.0)

    s_pos = torch.where(z > 0, r_out / stab(z_pos), torch.zeros_like(z))
    s_neg = torch.where(z < 0, r_out / stab(z_neg), torch.zeros_like(z))
    return xp * (s_pos @ w_pp + s_neg @ w_nn) + xn * (s_pos @ w_nn + s_neg @ w_pp)


def test_gamma_modified_gradient_equals_explicit_rule() -> None:
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.0, 0.5, 2.0]]))
        lin.bias.copy_(torch.tensor([0.25, -0.5]))
    x = torch.tensor([[1.0, 0.5, -1.0], [-2.0, 1.0, 0.5]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    for gamma in (0.0, 0.25, 1.0):
        z = lin(x)
        out = _lrp.gamma_output(lin, x, z, gamma, 1e-6)
        torch.testing.assert_close(out, z, rtol=0, atol=0)  # the forward value is untouched
        (grad,) = torch.autograd.grad(out, x, g)
        expected = _explicit_gamma(lin.weight.detach(), lin.bias.detach(), x.detach(), z.detach() * g, gamma, 1e-6)
        torch.testing.assert_close(x.detach() * grad, expected, rtol=1e-6, atol=1e-7)


def test_gamma_on_convolution_equals_the_unfolded_linear() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=2, stride=2)
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    z = conv(x)
    g = torch.randn_like(z)
    (grad,) = torch.autograd.grad(_lrp.gamma_output(conv, x, z, 0.25, 1e-6), x, g)
    # the same convolution as a linear layer on 2x2 patches
    cols = F.unfold(x.detach(), 2, stride=2).transpose(1, 2)[0]  # (4 patches, 8)
    w = conv.weight.detach().reshape(3, -1)
    r = _explicit_gamma(w, conv.bias.detach(), cols, (z * g).detach().flatten(2)[0].T, 0.25, 1e-6)
    ours = F.unfold(x.detach() * grad, 2, stride=2).transpose(1, 2)[0]
    torch.testing.assert_close(ours, r, rtol=1e-5, atol=1e-6)


def test_identity_rules_conserve_relevance() -> None:
    # LayerNorm without bias: Σ R_in = Σ y·g exactly (the mean's share cancels).
    ln = nn.LayerNorm(4, elementwise_affine=True, bias=False)
    with torch.no_grad():
        ln.weight.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    x = torch.tensor([[1.0, 2.0, 4.0, -3.0]], requires_grad=True)
    g = torch.tensor([[1.0, -1.0, 0.5, 2.0]])
    y = ln(x)
    (grad,) = torch.autograd.grad(_lrp.identity_norm(ln, x, y), x, g)
    torch.testing.assert_close((x * grad).sum(), (y * g).sum())
    # ... and the gradient is the one with std held constant: (gw - mean(gw)) / std
    std = (x.detach().var(unbiased=False) + ln.eps).sqrt()
    gw = g * ln.weight.detach()
    torch.testing.assert_close(grad, (gw - gw.mean()) / std)
    # RMSNorm: R_in = R_out
    rms = nn.RMSNorm(4)
    y = rms(x)
    (grad,) = torch.autograd.grad(_lrp.identity_norm(rms, x, y), x, g)
    torch.testing.assert_close(x * grad, y.detach() * g)
    # GELU, identity rule: R_in = R_out elementwise
    a = torch.tensor([-2.0, -0.5, 0.3, 1.5], requires_grad=True)
    y = F.gelu(a)
    (grad,) = torch.autograd.grad(_lrp.identity_activation(a, y), a, torch.ones(4))
    torch.testing.assert_close(a * grad, y.detach(), rtol=1e-6, atol=1e-8)


def test_uniform_rule_halves_each_factor() -> None:
    # z = a * b: the plain gradient gives R_a + R_b = 2 z; the uniform rule z / 2 each.
    a = torch.tensor([3.0], requires_grad=True)
    b = torch.tensor([-2.0], requires_grad=True)
    z = _lrp._scale_grad(a * b, 0.5)
    ga, gb = torch.autograd.grad(z, [a, b])
    assert (a * ga).item() == pytest.approx(-3.0) and (b * gb).item() == pytest.approx(-3.0)


# ------------------------------------------------------------------------ a custom ViT
class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = self.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, bias=bias)
        self.attn = _Attention(dim, 2, bias)
        self.norm2 = nn.LayerNorm(dim, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim, bias=bias), nn.GELU(), nn.Linear(2 * dim, dim, bias=bias))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CustomViT(nn.Module):
    """Patches of 4x4 pixels, no prefix token, mean-pooled head."""

    def __init__(self, bias: bool = True, depth: int = 2, dim: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4, bias=bias)
        self.pos = nn.Parameter(torch.randn(1, 4, dim) * 0.1)
        self.blocks = nn.ModuleList(_Block(dim, bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, bias=bias)
        self.head = nn.Linear(dim, 3, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            t = blk(t)
        return self.head(self.norm(t).mean(1))


def _custom(bias: bool = True) -> tuple[CustomViT, Any]:
    torch.manual_seed(0)
    m = CustomViT(bias=bias).eval()
    return m, adapt(m, attention_modules=[b.attn.softmax for b in m.blocks], patch_size=4, pooling="mean_patch")


def test_conservation_through_a_bias_free_custom_vit() -> None:
    # Bias-free, ε = 0, constant attention, identity rules: every block's output tokens
    # carry exactly the target logit (no prefix tokens, so the grid holds them all).
    m, ad = _custom(bias=False)
    x = torch.randn(2, 3, 8, 8)
    lrp = AttnLRP(m, rules={"attention": "cp", **PLAIN}, adapter=ad)
    logits = m(x)
    for layer in (0, 1):
        r = lrp.attribute(x, target=[0, 2], layer=layer, return_patch_grid=True)
        torch.testing.assert_close(r.sum((1, 2, 3)), logits[[0, 1], [0, 2]].detach(), rtol=1e-5, atol=1e-6)
        # tokens come on the patch grid with or without return_patch_grid (no pixels to fill)
        torch.testing.assert_close(lrp.attribute(x, target=[0, 2], layer=layer), r, rtol=0, atol=0)
        (t,) = lrp.attribute((x,), target=[0, 2], layer=layer)
        assert t.shape == r.shape == (2, 1, *ad.grid_size(x))
    # the pixels get the logit minus the position embeddings' share
    r = lrp.attribute(x, target=[0, 2])
    assert r.shape == x.shape
    grid = lrp.attribute(x, target=[0, 2], return_patch_grid=True)
    torch.testing.assert_close(grid.sum((1, 2, 3)), r.sum((1, 2, 3)), rtol=1e-5, atol=1e-6)


def test_custom_vit_attnlrp_needs_known_attention() -> None:
    m, ad = _custom()
    with pytest.raises(ValueError, match="rules=\\{'attention': 'cp'\\}"):
        AttnLRP(m, rules={"attention": "attnlrp"}, adapter=ad).attribute(torch.randn(1, 3, 8, 8))


# ------------------------------------------------------------------------ independent reference
def _gamma_ref(z: Tensor, pos: Tensor, neg: Tensor, gamma: float, eps: float) -> Tensor:
    """The Gamma rule as ``z_γ · (z / z_γ).detach()`` (the issue's form), ``z_γ`` built from
    the positive (``pos`` = P + b⁺) and negative (``neg`` = N + b⁻) contributions."""
    zg = torch.where(z > 0, z + gamma * pos, z + gamma * neg)
    out = zg * (z / (zg + eps * torch.where(zg >= 0, 1.0, -1.0))).detach()
    return out + (z - out).detach()  # the forward value stays z (ε would shift it)


def _lin(t: Tensor, mod: nn.Linear, gamma: float | None, eps: float) -> Tensor:
    z = F.linear(t, mod.weight, mod.bias)
    if gamma is None:
        return z
    w, b = mod.weight, mod.bias
    tp, tn = t.clamp(min=0), t.clamp(max=0)
    pos = F.linear(tp, w.clamp(min=0)) + F.linear(tn, w.clamp(max=0)) + b.clamp(min=0)
    neg = F.linear(tp, w.clamp(max=0)) + F.linear(tn, w.clamp(min=0)) + b.clamp(max=0)
    return _gamma_ref(z, pos, neg, gamma, eps)


def _reference_timm(
    m: nn.Module, x: Tensor, target: list[int], attention: str, gammas: dict[str, float] | None = None,
    eps: float = 0.0,
) -> Tensor:
    """A timm ViT written out by hand with the rules (plain linears, ε = 0, or the Gamma
    rule with ``gammas[kind]`` on the kinds it names)."""
    gm = gammas or {}

    def ln(mod: Any, t: Tensor) -> Tensor:
        mean = t.mean(-1, keepdim=True)
        std = (((t - mean) ** 2).mean(-1, keepdim=True) + mod.eps).sqrt()
        return (t - mean) / std.detach() * mod.weight + mod.bias

    def gelu(t: Tensor) -> Tensor:
        return t * (F.gelu(t) / (t + 1e-10)).detach()

    def half(t: Tensor) -> Tensor:
        return 0.5 * t + (0.5 * t).detach()

    x = x.clone().requires_grad_(True)
    pe = m.patch_embed.proj
    c = F.conv2d(x, pe.weight, pe.bias, stride=pe.stride)
    if "patch_embed" in gm:
        xp, xn, w, b = x.clamp(min=0), x.clamp(max=0), pe.weight, pe.bias
        pos = F.conv2d(xp, w.clamp(min=0), stride=8) + F.conv2d(xn, w.clamp(max=0), stride=8)
        neg = F.conv2d(xp, w.clamp(max=0), stride=8) + F.conv2d(xn, w.clamp(min=0), stride=8)
        c = _gamma_ref(c, pos + b.clamp(min=0)[:, None, None], neg + b.clamp(max=0)[:, None, None], gm["patch_embed"], eps)
    t = c.flatten(2).transpose(1, 2)
    t = torch.cat([m.cls_token.expand(len(x), -1, -1), t], 1) + m.pos_embed
    for blk in m.blocks:
        a = blk.attn
        h = ln(blk.norm1, t)
        b, n, d = h.shape
        q, k, v = _lin(h, a.qkv, gm.get("attn_proj"), eps).reshape(b, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        if attention == "cp":
            q, k = q.detach(), k.detach()
        else:
            q, k = half(q), half(k)
        o = (q * a.scale @ k.transpose(-2, -1)).softmax(-1) @ v
        if attention == "attnlrp":
            o = half(o)
        t = t + _lin(o.transpose(1, 2).reshape(b, n, d), a.proj, gm.get("attn_proj"), eps)
        h = ln(blk.norm2, t)
        h = _lin(gelu(_lin(h, blk.mlp.fc1, gm.get("mlp"), eps)), blk.mlp.fc2, gm.get("mlp"), eps)
        t = t + h
    y = _lin(ln(m.norm, t)[:, 0], m.head, gm.get("head"), eps)
    (g,) = torch.autograd.grad(y[torch.arange(len(x)), target].sum(), x)
    return (x * g).detach()


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_timm_equals_hand_written_reference(attention: str) -> None:
    import timm

    torch.manual_seed(0)
    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
        embed_dim=16, num_heads=2, num_classes=4,
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    got = AttnLRP(m, rules={"attention": attention, **PLAIN}).attribute(x, target=[1, 3])
    ref = _reference_timm(m, x, [1, 3], attention)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("attn_proj", [None, 0.25])
def test_timm_gamma_everywhere_equals_hand_written_reference(attn_proj: float | None) -> None:
    # Gamma on the patch embedding, MLPs, head and (or not) the attention projections,
    # against the rule written as z_γ · (z / z_γ).detach() from explicit P / N sums.
    import timm

    torch.manual_seed(1)
    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
        embed_dim=16, num_heads=2, num_classes=4,
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    gammas = {"patch_embed": 0.1, "mlp": 0.05, "head": 0.5}
    rules: dict[str, Any] = {k: ("gamma", v) for k, v in gammas.items()}
    rules["attn_proj"] = "gradient" if attn_proj is None else ("gamma", attn_proj)
    if attn_proj is not None:
        gammas["attn_proj"] = attn_proj
    got = AttnLRP(m, rules={"attention": "cp", "epsilon": 1e-6, **rules}).attribute(x, target=[1, 3])
    ref = _reference_timm(m, x, [1, 3], "cp", gammas, eps=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    if attn_proj is not None:  # the projections' rule is in effect
        plain = AttnLRP(m, rules={"attention": "cp", "epsilon": 1e-6, **rules, "attn_proj": "gradient"})
        assert (plain.attribute(x, target=[1, 3]) - got).abs().max() > 1e-3 * float(ref.abs().max())


def test_gamma_on_attention_projections_conserves_relevance() -> None:
    # Bias-free, ε = 0: Gamma on every linear (attention projections included) keeps
    # each block's output relevance equal to the target logit, as the identity rules do.
    m, ad = _custom(bias=False)
    x = torch.randn(2, 3, 8, 8)
    g = ("gamma", 0.25)
    lrp = AttnLRP(
        m, rules={"attention": "cp", "patch_embed": g, "mlp": g, "head": g, "attn_proj": g, "epsilon": 0.0},
        adapter=ad,
    )
    logits = m(x)
    for layer in (0, 1):
        r = lrp.attribute(x, target=[0, 2], layer=layer, return_patch_grid=True)
        torch.testing.assert_close(r.sum((1, 2, 3)), logits[[0, 1], [0, 2]].detach(), rtol=1e-5, atol=1e-6)


def test_attention_projection_rule_on_multihead_attention_raises() -> None:
    m, _ = make_model("torchvision_vit")
    with pytest.raises(ValueError, match="rules=\\{'attn_proj': 'gradient'\\}"):
        AttnLRP(m, rules={"attn_proj": ("gamma", 0.05)})
    AttnLRP(m, rules={"attn_proj": "gradient"})  # the plain gradient is fine


def test_attention_projection_rule_on_a_functional_projection_raises() -> None:
    # timm EVA (biased qkv) calls F.linear with qkv's weight: its rule could not act.
    m, size = make_model("timm_eva")
    state = _state(m)
    x = torch.randn(1, 3, size, size)
    with pytest.raises(ValueError, match="not called as modules"):
        AttnLRP(m, rules={"attn_proj": ("gamma", 0.05)}).attribute(x, target=0)
    assert _state(m) == state


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit", "hf_clip_vision", "hf_dinov2"])
def test_attention_projection_rule_acts_on_module_projections(name: str) -> None:
    m, size = make_model(name)
    x = torch.randn(2, 3, size, size)
    for rule, eps in ((("gamma", 0.25), 1e-6), ("epsilon", 0.1)):
        plain = AttnLRP(m, rules={"epsilon": eps}).attribute(x, target=[0, 1])
        lrp = AttnLRP(m, rules={"attn_proj": rule, "epsilon": eps})
        r = lrp.attribute(x, target=[0, 1])
        assert torch.isfinite(r).all()
        assert (r - plain).abs().max() > 1e-4 * float(plain.abs().max())  # the rule acted
        torch.testing.assert_close(lrp.attribute(x[1:], target=1), r[1:], rtol=1e-4, atol=1e-6 * float(r.abs().max()))


# ------------------------------------------------------------------------ every family
def _state(m: nn.Module) -> list[Any]:
    out: list[Any] = []
    for mod in m.modules():
        cfg = getattr(mod, "config", None)
        out.append(
            (
                len(mod._forward_hooks), len(mod._forward_pre_hooks), len(mod._backward_hooks),
                getattr(mod, "fused_attn", None), "forward" in mod.__dict__,
                getattr(cfg, "_attn_implementation_internal", None),
            )
        )
    return out


FAMILIES = [*sorted(MODEL_FACTORIES), "custom"]


def _family(name: str) -> tuple[nn.Module, int, Any]:
    if name == "custom":
        m, ad = _custom()
        return m, 8, ad
    m, size = make_model(name)
    if name == "torchvision_vit":  # torchvision zero-initialises its head: every map would be 0
        torch.nn.init.normal_(m.heads.head.weight, std=0.2)  # type: ignore[union-attr]
    return m, size, None


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family(name: str) -> None:
    m, size, ad = _family(name)
    x = torch.randn(3, 3, size, size)
    state = _state(m)
    with torch.no_grad():
        before = adapt(m).forward(x) if ad is None else m(x)
    rules = ("cp",) if name == "custom" else ("cp", "attnlrp")
    for attention in rules:
        lrp = AttnLRP(m, rules={"attention": attention}, adapter=ad)
        r = lrp.attribute(x, target=[0, 1, 2])
        assert r.shape == x.shape and torch.isfinite(r).all() and r.abs().sum() > 0
        single = lrp.attribute(x[1:2], target=1)
        torch.testing.assert_close(single, r[1:2], rtol=1e-4, atol=1e-6 * float(r.abs().max()))
        grid = lrp.attribute(x, target=[0, 1, 2], return_patch_grid=True)
        gh, gw = lrp.adapter.grid_size(x)
        assert grid.shape == (3, 1, gh, gw)
        torch.testing.assert_close(grid.sum((1, 2, 3)), r.sum((1, 2, 3)), rtol=1e-4, atol=1e-6)
        latent = lrp.attribute(x, target=[0, 1, 2], layer=-1, return_patch_grid=True)
        assert latent.shape == (3, 1, gh, gw) and torch.isfinite(latent).all()
        assert lrp.attribute((x,), target=0)[0].shape == x.shape  # tuple in, tuple out
    assert _state(m) == state
    with torch.no_grad():
        after = adapt(m).forward(x) if ad is None else m(x)
    assert torch.equal(before, after)


def test_under_no_grad_and_predicted_target() -> None:
    m, size = make_model("timm_deit_distilled")
    x = torch.randn(2, 3, size, size)
    lrp = AttnLRP(m)
    with torch.no_grad():
        r = lrp.attribute(x)
        pred = m(x).argmax(1)
    torch.testing.assert_close(r, lrp.attribute(x, target=pred))


def test_model_unchanged_when_attribute_raises() -> None:
    m, size = make_model("timm_vit")
    state = _state(m)
    x = torch.randn(1, 3, size, size)
    with pytest.raises(TypeError):
        AttnLRP(m).attribute(x, additional_forward_args=("not an argument", 1, 2))  # inside forward
    with pytest.raises(ValueError, match="out of range"):
        AttnLRP(m).attribute(x, target=10_000)  # after the forward pass
    assert _state(m) == state
    assert _slots_in_use() == 0


def test_other_threads_see_the_plain_model() -> None:
    # While this thread's AttnLRP forward pass runs (its hooks installed), another
    # thread computes a plain input gradient, a Chefer map and AttnLRP with other
    # rules on the same model: every result is exact.
    m, size = make_model("timm_vit")
    x = torch.randn(1, 3, size, size)

    def plain_grad() -> Tensor:
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(m(xg)[0, 1], xg)
        return g

    expected_grad = plain_grad()
    expected_chefer = GradientRollout(m).attribute(x, target=1)
    other_rules = AttnLRP(m, rules={"attention": "attnlrp", "mlp": "epsilon"})
    expected_lrp = other_rules.attribute(x, target=1)
    expected_own = AttnLRP(m).attribute(x, target=1)
    got: dict[str, Tensor] = {}
    lrp_thread = threading.get_ident()

    def meanwhile(_m: nn.Module, _a: Any, _o: Any) -> None:
        if threading.get_ident() != lrp_thread or got:
            return

        def other() -> None:
            got["grad"] = plain_grad()
            got["chefer"] = GradientRollout(m).attribute(x, target=1)
            got["lrp"] = other_rules.attribute(x, target=1)  # other rules, same modules

        t = threading.Thread(target=other)
        t.start()
        t.join()

    handle = m.blocks[0].register_forward_hook(meanwhile)
    try:
        own = AttnLRP(m).attribute(x, target=1)
    finally:
        handle.remove()
    torch.testing.assert_close(got["grad"], expected_grad, rtol=0, atol=0)
    torch.testing.assert_close(got["chefer"], expected_chefer, rtol=0, atol=0)
    torch.testing.assert_close(got["lrp"], expected_lrp, rtol=0, atol=0)
    torch.testing.assert_close(own, expected_own, rtol=0, atol=0)
    assert _slots_in_use() == 0


def test_captum_noise_tunnel() -> None:
    from captum.attr import NoiseTunnel

    m, size = make_model("hf_vit")
    x = torch.randn(2, 3, size, size)
    out = NoiseTunnel(AttnLRP(m)).attribute(x, nt_samples=2, target=0, stdevs=0.1)
    assert out.shape == x.shape


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"attn": "cp"}, "unknown rule key"),
        ({"attention": "softmax"}, "rules\\['attention'\\]"),
        ({"norm": "zero"}, "rules\\['norm'\\]"),
        ({"mlp": ("gamma", -1.0)}, "rules\\['mlp'\\]"),
        ({"head": "gamma"}, "rules\\['head'\\]"),
        ({"epsilon": -1e-6}, "rules\\['epsilon'\\]"),
    ],
)
def test_bad_rules(rules: dict[str, Any], message: str) -> None:
    m, _ = make_model("hf_vit")
    with pytest.raises(ValueError, match=message):
        AttnLRP(m, rules=rules)


def test_bad_calls() -> None:
    m, size = make_model("hf_vit")
    lrp = AttnLRP(m)
    with pytest.raises(ValueError, match="layer=5 is out of range"):
        lrp.attribute(torch.randn(1, 3, size, size), layer=5)
    with pytest.raises(ValueError, match="batch of images"):
        lrp.attribute(torch.randn(3, size, size))
    with pytest.raises(TypeError, match="rules must be a dict"):
        AttnLRP(m, rules=[("attention", "cp")])  # type: ignore[arg-type]
