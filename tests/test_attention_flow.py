"""AttentionFlow: networkx reference, hand-computed flows, rollout relations, API conventions."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from conftest import make_model
from torch import nn

from captum_vit import AttentionFlow, AttentionRollout, adapt
from captum_vit.attr.attention_flow import _max_flows


def _independent_capacities(model: nn.Module, x: torch.Tensor, w: float = 0.5) -> np.ndarray:
    """Ã_l = rownorm((1 - w)·mean_heads(A_l) + w·I) for every layer: (B, L, N, N)."""
    adapter = adapt(model)
    with torch.no_grad(), adapter.capture() as rec:
        adapter.forward(x)
    mats = []
    for a in rec.kept():
        fused = a.double().mean(1)
        mixed = (1 - w) * fused + w * torch.eye(fused.shape[-1], dtype=torch.float64)
        mats.append(mixed / mixed.sum(-1, keepdim=True))
    return torch.stack(mats, 1).numpy()


def _networkx_flows(caps: np.ndarray, query: np.ndarray, prefix: int) -> np.ndarray:
    """The published recipe: one networkx max flow per input token, float capacities."""
    k_layers, n, _ = caps.shape
    g = nx.DiGraph()
    for k in range(k_layers):
        for i in range(n):
            if k == k_layers - 1 and query[i] == 0:
                continue
            for j in range(n):
                g.add_edge((k, j), (k + 1, i), capacity=float(caps[k, i, j]))
    for i in np.flatnonzero(query):
        g.add_edge((k_layers, int(i)), "sink", capacity=float(query[i]))
    return np.array([nx.maximum_flow_value(g, (0, j), "sink") for j in range(prefix, n)])


@pytest.mark.parametrize("name", ["hf_vit", "timm_deit_distilled", "timm_avgpool"])
def test_matches_networkx_reference(name: str) -> None:
    # single CLS query, CLS+dist super-sink (1/2 each), mean-patch super-sink (1/P each)
    model, size = make_model(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    flow = AttentionFlow(model)
    got = flow.attribute(x, return_patch_grid=True)
    caps = _independent_capacities(model, x)
    np.testing.assert_allclose(flow.capacities(x).numpy(), caps, atol=1e-6)
    adapter = flow.adapter
    layout = adapter.layout(x, caps.shape[-1])
    query = adapter.query_weights(layout).double().numpy()
    for b in range(2):
        ref = _networkx_flows(caps[b], query, layout.num_prefix_tokens)
        # documented precision: |min cut| / (2 * 2**30) plus float32 output rounding
        np.testing.assert_allclose(got[b, 0].flatten().numpy(), ref, atol=1e-6, rtol=0)


def test_one_layer_known_answer() -> None:
    a = np.array([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]])
    q = np.array([1.0, 0.0, 0.0])
    got = _max_flows(a, q, np.array([1, 2]), 2**30)
    np.testing.assert_allclose(got, [0.3, 0.2], atol=1e-8)
    # two query tokens with weights 0.5 each: sum_i min(A[i, j], q_i)
    q2 = np.array([0.5, 0.5, 0.0])
    got2 = _max_flows(a, q2, np.array([0, 1, 2]), 2**30)
    np.testing.assert_allclose(got2, [0.5 + 0.1, 0.3 + 0.5, 0.2 + 0.3], atol=1e-8)


def test_two_layer_known_answer() -> None:
    # two layers and one query: disjoint 2-edge paths j -> i -> q, flow = sum_i min(.,.)
    rng = np.random.default_rng(0)
    a = rng.random((2, 4, 4))
    a /= a.sum(-1, keepdims=True)
    q = np.array([1.0, 0, 0, 0])
    got = _max_flows(a, q, np.arange(4), 2**30)
    expected = [np.minimum(a[0][:, j], a[1][0, :]).sum() for j in range(4)]
    np.testing.assert_allclose(got, expected, atol=1e-8)


def test_capacity_scale_precision() -> None:
    # a coarse scale loses precision within the documented |cut| / (2 * scale)
    rng = np.random.default_rng(3)
    a = rng.random((1, 5, 5))
    a /= a.sum(-1, keepdims=True)
    q = np.array([1.0, 0, 0, 0, 0])
    got = _max_flows(a, q, np.arange(5), 1000)
    np.testing.assert_allclose(got, a[0, 0], atol=0.5 / 1000)


def test_single_layer_equals_rollout() -> None:
    model, size = make_model("hf_vit")
    x = torch.randn(2, 3, size, size)
    flow = AttentionFlow(model, start_layer=-1).attribute(x, return_patch_grid=True)
    roll = AttentionRollout(model, start_layer=-1).attribute(x, return_patch_grid=True)
    torch.testing.assert_close(flow, roll, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["timm_vit", "timm_deit_distilled", "timm_avgpool"])
def test_rollout_is_a_feasible_flow(name: str) -> None:
    model, size = make_model(name)
    x = torch.randn(1, 3, size, size)
    flow = AttentionFlow(model, head_fusion="max").attribute(x, return_patch_grid=True)
    roll = AttentionRollout(model, head_fusion="max").attribute(x, return_patch_grid=True)
    assert (roll <= flow + 1e-6).all()
    assert flow.sum() > roll.sum()  # flow is not additive over patches
    assert (flow >= 0).all() and (flow <= 1 + 1e-6).all()


def test_every_family_shape_and_range(family_model: tuple[str, nn.Module, int]) -> None:
    _, model, size = family_model
    x = torch.randn(1, 3, size, size)
    flow = AttentionFlow(model, start_layer=-2 if len(adapt(model).attention_modules) > 2 else 0)
    with torch.no_grad():
        out = flow.attribute(x)
    assert out.shape == x.shape and out.is_contiguous()
    assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 1 + 1e-6).all()
    assert out.max() > 0


def test_batch_equals_single_and_tuple() -> None:
    model, size = make_model("timm_deit_distilled")
    x = torch.randn(3, 3, size, size)
    flow = AttentionFlow(model)
    batch = flow.attribute((x,), show_progress=True)
    assert isinstance(batch, tuple) and batch[0].shape == x.shape
    for i in range(3):
        single = flow.attribute(x[i : i + 1])
        torch.testing.assert_close(batch[0][i : i + 1], single, atol=1e-6, rtol=0)
    assert hasattr(AttentionFlow.attribute, "__wrapped__")


def test_bad_arguments() -> None:
    model, size = make_model("hf_vit")
    with pytest.raises(ValueError, match="capacity_scale"):
        AttentionFlow(model, capacity_scale=0)
    with pytest.raises(ValueError, match="capacity_scale"):
        AttentionFlow(model, capacity_scale=2**31)
    with pytest.raises(TypeError, match="capacity_scale"):
        AttentionFlow(model, capacity_scale=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionFlow(model, head_fusion="sum")
    with pytest.raises(ValueError, match="residual_weight"):
        AttentionFlow(model, residual_weight=1.5)
    with pytest.raises(ValueError, match="start_layer"):
        AttentionFlow(model, start_layer=5)
    with pytest.raises(ValueError):
        AttentionFlow(model).attribute(torch.randn(3, size, size))


def test_non_square_grid() -> None:
    model, _ = make_model("hf_dinov2")  # accepts any multiple of the patch size
    x = torch.randn(1, 3, 32, 48)
    grid = AttentionFlow(model).attribute(x, return_patch_grid=True)
    assert isinstance(grid, torch.Tensor) and grid.shape == (1, 1, 4, 6)


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit"])
def test_flow_bounded_by_source_cut(name: str) -> None:
    # The cut around the source: a patch's flow is at most its out-capacity into the
    # first layer (column sum of Ã_0 over all tokens) and at most the query's capacity 1.
    model, size = make_model(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    flow = AttentionFlow(model)
    got = flow.attribute(x, return_patch_grid=True).flatten(1)
    caps = flow.capacities(x)
    prefix = caps.shape[-1] - got.shape[1]
    bound = caps[:, 0, :, prefix:].sum(1).clamp(max=1.0)
    assert (got <= bound + 1e-6).all()
    assert (got < 1 - 1e-4).any()  # some patch is held below 1 by its own cut


@pytest.mark.slow
@pytest.mark.real_model
def test_real_deit_flow_is_first_layer_attention_received(real_deit: nn.Module) -> None:
    # On the real DeiT-Tiny the source cut binds for almost every patch: flow equals
    # min(first-layer attention received + residual, 1) (benchmarks/flow_diagnosis.py).
    from PIL import Image
    from skimage import data

    from captum_vit.models import load_default

    _, transform, _ = load_default()
    x = transform(Image.fromarray(data.chelsea())).unsqueeze(0)
    flow = AttentionFlow(real_deit)
    got = flow.attribute(x, return_patch_grid=True).flatten(1).double()
    caps = flow.capacities(x)
    bound = caps[:, 0, :, 1:].sum(1).clamp(max=1.0).double()
    assert ((got - bound).abs() <= 1e-5).double().mean() > 0.95
