"""The fused rollout product against a straightforward one written out in float64.

:class:`RolloutProduct` keeps the product with its rows unscaled and carries the row
sums in an extra column; :meth:`RolloutProduct.final_rows` multiplies only the query
rows of the last layer. Both are checked against the definition (fuse, discard,
``(1 - w)·F + w·I``, rows divided by their sums, ``R = Ã_L ⋯ Ã_start``) computed
layer by layer in float64, and the timm capture that computes only the query rows of
the last layer's scores against the full capture.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import make_model
from torch import Tensor

from captum_vit import AttentionRollout, RawAttention, ViTAdapter, adapt
from captum_vit._capture import _slots_in_use
from captum_vit.attr._common import _query_indices
from captum_vit.attr._rollout import RolloutProduct, discard_smallest


def _reference(layers: list[Tensor], fusion: str, ratio: float, w: float, protected: Tensor) -> Tensor:
    """The definition, float64: layers of (B, heads, N, N) -> R (B, N, N)."""
    r = None
    for a in layers:
        a = a.double()
        f = {"mean": a.mean(1), "max": a.amax(1), "min": a.amin(1)}[fusion]
        f = discard_smallest(f, ratio, protected)
        m = (1 - w) * f + w * torch.eye(f.shape[-1], dtype=torch.float64)
        sums = m.sum(-1, keepdim=True)
        m = m / torch.where(sums > 0, sums, torch.ones_like(sums))
        r = m if r is None else m @ r
    assert r is not None
    return r


def _layers(batch: int, heads: int, n: int, count: int, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(batch, heads, n, n, generator=g)).softmax(-1) for _ in range(count)]


SETTINGS = [
    ("mean", 0.0, 0.5),
    ("mean", 0.0, 0.0),
    ("mean", 0.0, 1.0),
    ("max", 0.0, 0.5),
    ("min", 0.0, 0.3),
    ("mean", 0.4, 0.5),
    ("max", 0.6, 0.0),
]


@pytest.mark.parametrize("heads", [1, 3, 6])
@pytest.mark.parametrize(("fusion", "ratio", "w"), SETTINGS)
def test_product_matches_definition(heads: int, fusion: str, ratio: float, w: float) -> None:
    layers = _layers(2, heads, 9, 4)
    protected = torch.tensor([0])
    prod = RolloutProduct(fusion, ratio, w, protected)
    for a in layers:
        prod.update(a)
    assert prod.result is not None and prod.result.dtype == torch.float32
    want = _reference(layers, fusion, ratio, w, protected)
    torch.testing.assert_close(prod.result.double(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("fusion", "ratio", "w"), SETTINGS)
@pytest.mark.parametrize("count", [1, 3])  # 1: the last layer is also the first
@pytest.mark.parametrize("pooling", ["cls", "cls_dist", "patches"])
def test_final_rows_equal_the_full_product(
    fusion: str, ratio: float, w: float, count: int, pooling: str
) -> None:
    n = 10
    weights = torch.zeros(n)
    if pooling == "cls":
        weights[0] = 1.0
    elif pooling == "cls_dist":
        weights[:2] = 0.5
    else:
        weights[1:] = 1.0 / (n - 1)
    rows = torch.nonzero(weights > 0).flatten()
    layers = _layers(3, 3, n, count, seed=1)
    want = torch.einsum("n,bnm->bm", weights.double(), _reference(layers, fusion, ratio, w, rows))
    for sliced in ([False, True] if ratio == 0 else [False]):
        prod = RolloutProduct(fusion, ratio, w, rows)
        for a in layers[:-1]:
            prod.update(a)
        last = layers[-1].index_select(2, rows) if sliced else layers[-1]
        got = prod.final_rows(last, weights, rows, sliced=sliced)
        assert got.shape == (3, n)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_zero_rows_stay_zero() -> None:
    # w = 0 and a row that the discard empties: Ã keeps that row zero (not NaN)
    a = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.2, 0.3, 0.5]]])[None]
    layers = [a, _layers(1, 1, 3, 1)[0], a]
    prod = RolloutProduct("mean", 0.0, 0.0, torch.tensor([0]))
    for x in layers[:-1]:
        prod.update(x)
    weights = torch.tensor([0.0, 1.0, 0.0])
    rows = prod.final_rows(layers[-1], weights, torch.tensor([1]))
    torch.testing.assert_close(rows, torch.zeros(1, 3))
    prod.update(layers[-1])
    want = _reference(layers, "mean", 0.0, 0.0, torch.tensor([0]))
    assert prod.result is not None and torch.isfinite(prod.result).all()
    torch.testing.assert_close(prod.result.double(), want, atol=1e-6, rtol=1e-5)


def test_final_rows_refuses_sliced_maps_with_discard() -> None:
    prod = RolloutProduct("mean", 0.5, 0.5, torch.tensor([0]))
    with pytest.raises(ValueError, match="discarding"):
        prod.final_rows(torch.rand(1, 2, 1, 4), torch.tensor([1.0, 0, 0, 0]), torch.tensor([0]), sliced=True)


# --------------------------------------------------------------- the timm row capture
TIMM = ["timm_vit", "timm_deit_distilled", "timm_registers", "timm_avgpool"]


def _rows_of(adapter: ViTAdapter, x: Tensor) -> Callable[[int], Tensor]:
    def rows_of(n: int) -> Tensor:
        return _query_indices(adapter, adapter.layout(x, n), x.device)

    return rows_of


@pytest.mark.parametrize("name", TIMM)
def test_timm_rows_forward_equals_the_full_map(name: str) -> None:
    model, size = make_model(name)
    x = torch.randn(2, 3, size, size)
    adapter = adapt(model)
    last = adapter.num_layers - 1
    assert adapter._timm_rows_ok(last)
    with torch.no_grad(), adapter.capture(keep=True) as rec:
        adapter.forward(x)
    full = rec.kept()[last]
    rows_of = _rows_of(adapter, x)
    with torch.no_grad(), adapter.capture(keep=True, stop_after=last, stop_rows=rows_of) as rec:
        adapter.forward(x)
    got = rec.attentions[last]
    assert got is not None
    idx = rows_of(full.shape[-1])
    assert got.shape == (2, full.shape[1], idx.numel(), full.shape[-1])
    torch.testing.assert_close(got, full.index_select(2, idx), atol=1e-6, rtol=1e-5)
    assert _slots_in_use() == 0
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_timm_rows_forward_falls_back_to_the_module() -> None:
    """Training mode and a user's own instance forward run the module's forward
    (the map is then sliced), with the same rows."""
    model, size = make_model("timm_vit")
    x = torch.randn(1, 3, size, size)
    adapter = adapt(model)
    want = RawAttention(model).attribute(x, return_patch_grid=True)
    attn = adapter.attention_modules[-1]
    calls: list[int] = []
    cls_forward = type(attn).forward

    def own(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return cls_forward(attn, *args, **kwargs)

    attn.forward = own  # type: ignore[method-assign]
    try:
        assert not adapter._timm_rows_ok(adapter.num_layers - 1)
        got = RawAttention(model).attribute(x, return_patch_grid=True)
    finally:
        del attn.forward
    assert calls and "forward" not in attn.__dict__
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    torch.testing.assert_close(RawAttention(model).attribute(x, return_patch_grid=True), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["timm_vit", "timm_eva", "hf_vit", "torchvision_vit"])
@pytest.mark.parametrize("kw", [{}, {"head_fusion": "min"}, {"start_layer": -1}, {"discard_ratio": 0.5}])
def test_attribute_is_the_query_row_of_rollout(name: str, kw: dict[str, object]) -> None:
    """attribute() (last layer: query rows only) equals the query rows of rollout()
    (the full product), read by the adapter's own weights."""
    model, size = make_model(name)
    x = torch.randn(2, 3, size, size)
    ro = AttentionRollout(model, **kw)  # type: ignore[arg-type]
    r = ro.rollout(x)
    layout = ro.adapter.layout(x, r.shape[-1])
    weights = ro.adapter.query_weights(layout)
    want = torch.einsum("n,bnm->bm", weights, r)[:, layout.num_prefix_tokens :].reshape(2, 1, *layout.grid)
    torch.testing.assert_close(ro.attribute(x, return_patch_grid=True), want, atol=1e-6, rtol=1e-5)


def test_timm_rows_forward_is_batch_invariant() -> None:
    """A sample's query rows do not depend on the other samples of its batch (the
    evaluation tables compare per-batch maps with maps of the whole set)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, size = make_model("timm_deit_distilled")
        x = torch.randn(9, 3, size, size, generator=torch.Generator().manual_seed(3))
        ro = AttentionRollout(model)
        whole = ro.attribute(x, return_patch_grid=True)
        parts = torch.cat([ro.attribute(x[i : i + 3], return_patch_grid=True) for i in range(0, 9, 3)])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(whole, parts)
