"""Head importance (ablation, gradient), ablate_heads and the region probe."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_model
from torch import Tensor, nn

from captum_vit import RawAttention, RegionProbe, ablate_heads, adapt, head_importance, region_probe
from captum_vit._token_masking import masked_forward


def _model(name: str) -> tuple[nn.Module, int]:
    model, size = make_model(name)
    if name == "torchvision_vit":  # torchvision zero-initialises its head: give it weights
        torch.manual_seed(5)
        nn.init.normal_(model.heads.head.weight)  # type: ignore[union-attr,arg-type]
    return model, size


def _loop_ablation(model: nn.Module, proj_of: Any, x: Tensor, target: int, layers: int, heads: int) -> Tensor:
    """Per-head loop, written independently: zero the head's input channels of the
    output projection and keep (H-1)/H of its bias."""
    with torch.no_grad():
        base = model(x)
        base = (base.logits if hasattr(base, "logits") else base)[:, target]
        out = torch.zeros(x.shape[0], layers, heads)
        for layer in range(layers):
            proj = proj_of(layer)
            for h in range(heads):

                def pre(_m: nn.Module, args: tuple[Tensor, ...], h: int = h) -> tuple[Tensor, ...]:
                    o = args[0].clone()
                    dh = o.shape[-1] // heads
                    o[..., h * dh : (h + 1) * dh] = 0
                    return (o,)

                def post(m: nn.Module, _a: Any, y: Tensor) -> Tensor:
                    return y - m.bias / heads

                handles = [proj.register_forward_pre_hook(pre), proj.register_forward_hook(post)]
                try:
                    s = model(x)
                finally:
                    for hd in handles:
                        hd.remove()
                s = s.logits if hasattr(s, "logits") else s
                out[:, layer, h] = base - s[:, target]
    return out


@pytest.mark.parametrize("name", ["timm_avgpool", "hf_vit", "timm_deit_distilled"])
def test_ablation_equals_per_head_loop(name: str) -> None:
    model, size = _model(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    adapter = adapt(model)
    got = head_importance(model, x, target=1, perturbations_per_eval=5)
    layers, heads = got.shape[1:]
    ref = _loop_ablation(model, lambda layer: adapter.out_projections[layer], x, 1, layers, heads)  # type: ignore[index]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert got.abs().max() > 1e-4


def test_ablation_torchvision_equals_loop_of_ablate_heads() -> None:
    model, size = _model("torchvision_vit")
    x = torch.randn(2, 3, size, size)
    got = head_importance(model, x, target=2)
    base = model(x)[:, 2]
    for layer in range(2):
        for h in range(2):
            mask = torch.zeros(2, 2, dtype=torch.bool)
            mask[layer, h] = True
            with torch.no_grad():
                s = ablate_heads(model, x, mask)[:, 2]
            torch.testing.assert_close(got[:, layer, h], (base - s).detach(), atol=2e-5, rtol=1e-4)
    assert got.abs().max() > 1e-4


class _ZeroAttention(nn.Module):
    """Stands in for an attention branch that contributes nothing."""

    def __init__(self, tuple_out: bool) -> None:
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        zero = torch.zeros_like(args[0] if args else kwargs["hidden_states"])
        return (zero, None) if self.tuple_out else zero


def _branch(model: nn.Module, name: str, layer: int) -> tuple[nn.Module, str, bool]:
    """(parent, attribute name, returns tuple) of a layer's attention branch."""
    if name.startswith("timm"):
        return model.blocks[layer], "attn", False  # type: ignore[index]
    if name == "torchvision_vit":
        return model.encoder.layers[layer], "self_attention", True  # type: ignore[union-attr,index]
    block = adapt(model).blocks[layer]  # type: ignore[index]
    return block, "self_attn" if hasattr(block, "self_attn") else "attention", True


@pytest.mark.parametrize("name", ["timm_deit_distilled", "timm_registers", "hf_vit", "hf_dinov2", "hf_clip_classifier", "torchvision_vit"])
def test_zeroing_all_heads_removes_attention_branch(name: str) -> None:
    model, size = _model(name)
    x = torch.randn(2, 3, size, size)
    adapter = adapt(model)
    layer = 1
    heads = head_importance(model, x[:1], target=0).shape[-1]
    mask = torch.zeros(adapter.num_layers, heads, dtype=torch.bool)
    mask[layer] = True
    with torch.no_grad():
        got = ablate_heads(model, x, mask, adapter=adapter)
        parent, attr, tuple_out = _branch(model, name, layer)
        original = getattr(parent, attr)
        setattr(parent, attr, _ZeroAttention(tuple_out))
        try:
            ref = adapter.forward(x)
        finally:
            setattr(parent, attr, original)
        full = adapter.forward(x)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)
    assert (full - ref).abs().max() > 5e-6


def test_gradient_importance_one_pass_and_reference() -> None:
    model, size = _model("hf_deit_teacher")
    x = torch.randn(3, 3, size, size)
    adapter = adapt(model)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            got = head_importance(model, x, target=[0, 1, 2], method="gradient", adapter=adapter)
    finally:
        handle.remove()
    assert len(calls) == 1 and got.shape == (3, 2, 2)
    # reference: retain_grad on the captured maps and a plain backward()
    xg = x.clone().requires_grad_(True)
    with adapter.capture() as rec:
        scores = adapter.forward(xg)
    attns = rec.kept()
    for a in attns:
        a.retain_grad()
    scores.gather(1, torch.tensor([[0], [1], [2]])).sum().backward()
    ref = torch.stack([(a * a.grad).abs().sum((-2, -1)) for a in attns], 1)  # type: ignore[operator]
    torch.testing.assert_close(got, ref.detach(), atol=1e-6, rtol=1e-4)
    single = head_importance(model, x[1:2], target=1, method="gradient")
    torch.testing.assert_close(got[1:2], single, atol=1e-6, rtol=1e-4)


def test_ablation_batched_passes_and_batch_equals_single() -> None:
    model, size = _model("timm_avgpool")  # 2 layers x 3 heads
    x = torch.randn(3, 3, size, size)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        got = head_importance(model, x, target=[1, 2, 3], perturbations_per_eval=4)
    finally:
        handle.remove()
    assert len(calls) == 1 + 2  # baseline + ceil(6 / 4)
    for i in range(3):
        single = head_importance(model, x[i : i + 1], target=i + 1)
        torch.testing.assert_close(got[i : i + 1], single, atol=2e-5, rtol=1e-4)


def test_region_probe() -> None:
    model, size = _model("timm_vit")  # CLS pooling, 10x10 grid
    x = torch.randn(2, 3, size, size)
    region = torch.zeros(10, 10, dtype=torch.bool)
    region[3:7, 3:7] = True
    probe = region_probe(model, x, region, target=4)
    assert isinstance(probe, RegionProbe)
    # mass from an independent path: RawAttention's per-head CLS rows
    maps = RawAttention(model).attention_maps(x)  # (B, L, H, 10, 10)
    torch.testing.assert_close(probe.mass, maps[..., region].sum(-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probe.mass_deviation.mean((1, 2)), torch.zeros(2), atol=1e-6, rtol=0)
    # the pruned prediction is the shared token-masking forward
    with torch.no_grad():
        pruned = masked_forward(adapt(model), x, region.flatten(), "drop")
    torch.testing.assert_close(probe.pruned_score, pruned[:, 4])
    # first layer: dropping keys renormalises the softmax over the kept keys exactly
    torch.testing.assert_close(probe.attention_shift[:, 0], torch.zeros(2, 2), atol=1e-6, rtol=0)
    assert (probe.attention_shift[:, 1:] > 1e-6).any()
    assert (probe.attention_shift >= 0).all() and (probe.attention_shift <= 1).all()
    top = probe.top_heads(3)
    assert len(top) == 3 and top[0][2] >= top[1][2] >= top[2][2]


def test_region_probe_per_sample_regions_equal_single() -> None:
    model, size = _model("hf_vit")  # 4x4 grid
    x = torch.randn(2, 3, size, size)
    region = torch.zeros(2, 16, dtype=torch.bool)
    region[0, :3] = True
    region[1, 5:10] = True
    probe = region_probe(model, x, region)
    for i in range(2):
        single = region_probe(model, x[i : i + 1], region[i : i + 1])
        for field in ("mass", "attention_shift", "pruned_score", "pruned_probability"):
            torch.testing.assert_close(getattr(probe, field)[i : i + 1], getattr(single, field), atol=1e-5, rtol=1e-4)
    zero = region_probe(model, x, region, replacement="zero")
    assert zero.attention_shift.shape == (2, 2, 2)


def test_bad_inputs() -> None:
    model, size = _model("hf_vit")
    x = torch.randn(1, 3, size, size)
    with pytest.raises(ValueError, match="method"):
        head_importance(model, x, method="taylor")
    with pytest.raises(ValueError, match="perturbations_per_eval"):
        head_importance(model, x, perturbations_per_eval=0)
    with pytest.raises(TypeError, match="bool"):
        ablate_heads(model, x, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="head_mask"):
        ablate_heads(model, x, torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one"):
        region_probe(model, x, torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one"):
        region_probe(model, x, torch.ones(16, dtype=torch.bool))
    with pytest.raises(TypeError):
        region_probe(model, x, torch.zeros(16))
    with pytest.raises(ValueError, match="replacement"):
        region_probe(model, x, torch.ones(16, dtype=torch.bool), replacement="blur")
    with pytest.raises(ValueError, match="by must be"):
        region_probe(model, x, torch.eye(4, dtype=torch.bool)).top_heads(by="x")
    no_proj = adapt(model, out_projections=None)
    no_proj.out_projections = None
    with pytest.raises(ValueError, match="out_projections"):
        head_importance(model, x, adapter=no_proj)


def test_plots_return_figures() -> None:
    from matplotlib.figure import Figure

    from captum_vit.viz import plot_head_bars, plot_head_importance, plot_region_probe

    scores = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.4]])
    fig = plot_head_importance(scores.unsqueeze(0))
    assert isinstance(fig, Figure)
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (3, 2)  # heads x layers
    assert isinstance(plot_head_bars(scores, layer=-1), Figure)
    bars = plot_head_bars(scores, top_k=4)
    assert [t.get_text() for t in bars.axes[0].get_xticklabels()] == ["L0h0", "L1h1", "L0h2", "L1h0"]
    with pytest.raises(ValueError, match="layers, heads"):
        plot_head_importance(torch.zeros(4))
    with pytest.raises(ValueError, match="out of range"):
        plot_head_bars(scores, layer=2)
    model, size = _model("hf_vit")
    x = torch.rand(1, 3, size, size)
    probe = region_probe(model, x, torch.eye(4, dtype=torch.bool))
    assert isinstance(plot_region_probe(probe, image=x[0]), Figure)
    assert isinstance(plot_region_probe(probe), Figure)
