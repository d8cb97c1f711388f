"""Known-answer tests of the rollout arithmetic on tiny matrices multiplied out by hand.

Every expected number below was computed on paper (the working is in the comments);
the tests check the shared helpers of ``captum_vit.attr._rollout`` and, through a
custom model whose attention is a fixed buffer, the public classes end to end.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import captum_vit
from captum_vit import AttentionRollout, GradientRollout, RawAttention
from captum_vit.attr._rollout import (
    RolloutProduct,
    chefer_update,
    discard_smallest,
    fuse_heads,
    residual_normalize,
)

# Two heads over three tokens (rows sum to 1).
HEAD0 = [[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]
HEAD1 = [[0.1, 0.7, 0.2], [0.4, 0.4, 0.2], [0.3, 0.3, 0.4]]


def _t(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _heads() -> Tensor:
    return torch.stack([_t(HEAD0), _t(HEAD1)])[None]  # (1, 2, 3, 3)


@pytest.mark.parametrize(
    ("fusion", "expected"),
    [
        # elementwise (h0 + h1) / 2
        ("mean", [[0.3, 0.475, 0.225], [0.3, 0.5, 0.2], [0.2, 0.2, 0.6]]),
        ("max", [[0.5, 0.7, 0.25], [0.4, 0.6, 0.2], [0.3, 0.3, 0.8]]),
        ("min", [[0.1, 0.25, 0.2], [0.2, 0.4, 0.2], [0.1, 0.1, 0.4]]),
    ],
)
def test_fuse_heads_known_answer(fusion: str, expected: list[list[float]]) -> None:
    out = fuse_heads(_heads(), fusion)
    assert out.shape == (1, 3, 3)
    torch.testing.assert_close(out[0], _t(expected))


def test_fuse_heads_is_float32_for_half_input() -> None:
    assert fuse_heads(_heads().half(), "mean").dtype == torch.float32


def test_fuse_heads_rejects_unknown_fusion() -> None:
    with pytest.raises(ValueError, match="head_fusion"):
        fuse_heads(_heads(), "median")


# F: the diagonal entry (0, 0) = 0.10 is the protected query-row diagonal.
F_DISCARD = [[0.10, 0.50, 0.40], [0.02, 0.90, 0.08], [0.30, 0.25, 0.45]]


def test_discard_protects_query_diagonal() -> None:
    # ratio 1/3 of 9 entries -> k = 3. Sorted: 0.02, 0.08, (0.10 protected), 0.25, ...
    # -> zero 0.02, 0.08 and 0.25; 0.10 survives although it is the third smallest.
    out = discard_smallest(_t(F_DISCARD)[None], 1 / 3, torch.tensor([0]))
    expected = [[0.10, 0.50, 0.40], [0.0, 0.90, 0.0], [0.30, 0.0, 0.45]]
    torch.testing.assert_close(out[0], _t(expected))


def test_discard_without_protection_of_that_entry() -> None:
    # protecting token 1 instead: (1, 1) = 0.90 is safe anyway, so the three smallest
    # 0.02, 0.08, 0.10 are zeroed.
    out = discard_smallest(_t(F_DISCARD)[None], 1 / 3, torch.tensor([1]))
    expected = [[0.0, 0.50, 0.40], [0.0, 0.90, 0.0], [0.30, 0.25, 0.45]]
    torch.testing.assert_close(out[0], _t(expected))


def test_discard_is_per_sample_and_does_not_modify_input() -> None:
    a = _t(F_DISCARD)
    b = a.flip(0)  # rows reversed: a different sample
    batch = torch.stack([a, b])
    before = batch.clone()
    out = discard_smallest(batch, 1 / 3, torch.tensor([0]))
    torch.testing.assert_close(batch, before)
    torch.testing.assert_close(out[0], discard_smallest(a[None], 1 / 3, torch.tensor([0]))[0])
    torch.testing.assert_close(out[1], discard_smallest(b[None], 1 / 3, torch.tensor([0]))[0])


def test_discard_count_is_exact_despite_float_error() -> None:
    # 0.29 * 100 = 28.999999999999996 in floating point; the count must be 29.
    vals = torch.arange(1, 101, dtype=torch.float32).reshape(1, 10, 10) / 100
    out = discard_smallest(vals, 0.29, torch.tensor([], dtype=torch.long))
    assert int((out == 0).sum()) == 29
    assert float(out[out > 0].min()) == pytest.approx(0.30)


def test_discard_zero_ratio_is_identity() -> None:
    x = _t(F_DISCARD)[None]
    assert discard_smallest(x, 0.0, torch.tensor([0])) is x


def test_residual_normalize_known_answer() -> None:
    # F rows do not sum to 1. w = 0.5: 0.5 F + 0.5 I =
    # [[0.6, 0.1, 0], [0, 0.7, 0.2], [0, 0, 0.5]] -> rows / (0.7, 0.9, 0.5).
    f = _t([[0.2, 0.2, 0.0], [0.0, 0.4, 0.4], [0.0, 0.0, 0.0]])[None]
    out = residual_normalize(f, 0.5)
    expected = [[6 / 7, 1 / 7, 0.0], [0.0, 7 / 9, 2 / 9], [0.0, 0.0, 1.0]]
    torch.testing.assert_close(out[0], _t(expected))


def test_residual_zero_weight_keeps_zero_rows() -> None:
    f = _t([[0.2, 0.2, 0.0], [0.0, 0.4, 0.4], [0.0, 0.0, 0.0]])[None]
    out = residual_normalize(f, 0.0)
    expected = [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(out[0], _t(expected))


# Layer 0 after discard 1/3 (see test_discard_protects_query_diagonal) and w = 0.5:
#   0.5 F + 0.5 I = [[0.55, 0.25, 0.20], [0, 0.95, 0], [0.15, 0, 0.725]]
#   row sums 1, 0.95, 0.875 -> A0 = [[0.55, 0.25, 0.20], [0, 1, 0], [6/35, 0, 29/35]]
# Layer 1 = [[1, 0, 0], [0.5, 0.5, 0], [0, 0, 1]] (its 3 smallest entries are zeros:
# discarding them changes nothing) -> A1 = [[1, 0, 0], [0.25, 0.75, 0], [0, 0, 1]]
# R = A1 @ A0:
#   row 0 = A0 row 0                         = [0.55, 0.25, 0.20]
#   row 1 = 0.25 * A0 row 0 + 0.75 * A0 row 1 = [0.1375, 0.8125, 0.05]
#   row 2 = A0 row 2                         = [6/35, 0, 29/35]
LAYER1 = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
R_EXPECTED = [[0.55, 0.25, 0.20], [0.1375, 0.8125, 0.05], [6 / 35, 0.0, 29 / 35]]


def test_rollout_product_known_answer() -> None:
    prod = RolloutProduct("mean", 1 / 3, 0.5, torch.tensor([0]))
    # one head per layer (mean over one head = the matrix itself)
    prod.update(_t(F_DISCARD)[None, None])
    prod.update(_t(LAYER1)[None, None])
    assert prod.result is not None
    torch.testing.assert_close(prod.result[0], _t(R_EXPECTED))


# Chefer: two tokens, two heads.
#   layer a: A = [[.6,.4],[.2,.8]] / [[.5,.5],[.9,.1]], G = [[1,-1],[2,.5]] / [[-2,1],[1,1]]
#   G*A = [[.6,-.4],[.4,.4]] / [[-1,.5],[.9,.1]]  ->  ReLU -> mean over heads
#   Abar = [[0.3, 0.25], [0.65, 0.25]];  R1 = I + Abar I = [[1.3, .25], [.65, 1.25]]
#   R2 = R1 + Abar R1 = R1 + [[.5525, .3875], [1.0075, .475]] = [[1.8525, .6375], [1.6575, 1.725]]
CHEFER_A = [[[0.6, 0.4], [0.2, 0.8]], [[0.5, 0.5], [0.9, 0.1]]]
CHEFER_G = [[[1.0, -1.0], [2.0, 0.5]], [[-2.0, 1.0], [1.0, 1.0]]]


def test_chefer_update_known_answer() -> None:
    a = torch.tensor(CHEFER_A)[None]
    g = torch.tensor(CHEFER_G)[None]
    r1 = chefer_update(None, a, g)
    torch.testing.assert_close(r1[0], _t([[1.3, 0.25], [0.65, 1.25]]))
    r2 = chefer_update(r1, a, g)
    torch.testing.assert_close(r2[0], _t([[1.8525, 0.6375], [1.6575, 1.725]]))


# ---------------------------------------------------------------------------------
# End to end: a custom model whose attention probabilities are fixed buffers.


class _FixedAttention(nn.Module):
    def __init__(self, probs: Tensor) -> None:
        super().__init__()
        self.probs = nn.Parameter(probs.clone())  # (heads, N, N)
        self.probe = nn.Identity()

    def forward(self, tokens: Tensor) -> Tensor:
        p = self.probe(self.probs.expand(tokens.shape[0], -1, -1, -1))
        return tokens + (p @ tokens[:, None]).mean(1)


class _FixedModel(nn.Module):
    """1 CLS + a 1x2 patch grid (patch size 2 on 2x4 images); fixed attention."""

    def __init__(self, layers: list[Tensor]) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 2 * 2, 4)
        self.cls = nn.Parameter(torch.ones(1, 1, 4))
        self.blocks = nn.ModuleList(_FixedAttention(p) for p in layers)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        patches = x.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, 3, 1, 2, 2, 2)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, 2, 12)
        t = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], 1)
        for blk in self.blocks:
            t = blk(t)
        return self.head(t[:, 0])


def _fixed_model(layers: list[Tensor]) -> tuple[nn.Module, captum_vit.ViTAdapter]:
    torch.manual_seed(0)
    model = _FixedModel(layers).eval()
    adapter = captum_vit.adapt(
        model,
        attention_modules=[b.probe for b in model.blocks],  # type: ignore[union-attr]
        num_prefix_tokens=1,
        patch_size=2,
    )
    return model, adapter


def _two_heads(mean: list[list[float]], delta: float = 0.05) -> Tensor:
    """Two row-stochastic heads whose mean is ``mean`` (h = mean ± delta·(e_i - e_j))."""
    m = _t(mean)
    d = torch.tensor([[delta, -delta, 0.0]] * 3)
    # keep entries positive: only rows where the first two entries allow it
    d = torch.where((m[:, :2] > delta).all(1, keepdim=True), d, torch.zeros_like(d))
    return torch.stack([m + d, m - d])


def test_attention_rollout_end_to_end_known_answer() -> None:
    # F_DISCARD rows sum to 1; two heads with that mean for layer 0.
    layers = [_two_heads(F_DISCARD), _t(LAYER1)[None].expand(2, 3, 3).clone()]
    model, adapter = _fixed_model(layers)
    x = torch.randn(2, 3, 2, 4)
    ro = AttentionRollout(model, discard_ratio=1 / 3, residual_weight=0.5, adapter=adapter)
    r = ro.rollout(x)
    assert r.shape == (2, 3, 3)
    for i in range(2):
        torch.testing.assert_close(r[i], _t(R_EXPECTED))
    grid = ro.attribute(x, return_patch_grid=True)
    assert isinstance(grid, Tensor)
    torch.testing.assert_close(grid, torch.tensor([[[[0.25, 0.20]]]]).expand(2, 1, 1, 2))
    # input-shaped: each pixel takes its patch's value, in every channel
    full = ro.attribute(x)
    assert isinstance(full, Tensor) and full.shape == x.shape
    torch.testing.assert_close(full[:, :, :, :2], torch.full((2, 3, 2, 2), 0.25))
    torch.testing.assert_close(full[:, :, :, 2:], torch.full((2, 3, 2, 2), 0.20))


def test_max_min_fusion_end_to_end_known_answer() -> None:
    layer = torch.stack([_t(HEAD0), _t(HEAD1)])
    model, adapter = _fixed_model([layer])
    x = torch.randn(1, 3, 2, 4)
    # w = 0: A = fused / row sums. max rows sum to 1.45, 1.2, 1.4; CLS row of max =
    # [0.5, 0.7, 0.25] / 1.45 -> patches [0.7/1.45, 0.25/1.45].
    r_max = AttentionRollout(model, head_fusion="max", residual_weight=0.0, adapter=adapter)
    torch.testing.assert_close(
        r_max.attribute(x, return_patch_grid=True), torch.tensor([[[[0.7 / 1.45, 0.25 / 1.45]]]])
    )
    # min CLS row = [0.1, 0.25, 0.2] / 0.55
    r_min = AttentionRollout(model, head_fusion="min", residual_weight=0.0, adapter=adapter)
    torch.testing.assert_close(
        r_min.attribute(x, return_patch_grid=True), torch.tensor([[[[0.25 / 0.55, 0.2 / 0.55]]]])
    )
    # raw attention, mean fusion: CLS row of the mean = [0.3, 0.475, 0.225]
    raw = RawAttention(model, adapter=adapter)
    torch.testing.assert_close(raw.attribute(x, return_patch_grid=True), torch.tensor([[[[0.475, 0.225]]]]))
    maps = raw.attention_maps(x)
    assert maps.shape == (1, 1, 2, 1, 2)
    torch.testing.assert_close(maps[0, 0], torch.tensor([[[0.25, 0.25]], [[0.7, 0.2]]]))


def test_start_layer_skips_earlier_layers() -> None:
    layers = [_two_heads(F_DISCARD), _t(LAYER1)[None].expand(2, 3, 3).clone()]
    model, adapter = _fixed_model(layers)
    x = torch.randn(1, 3, 2, 4)
    r = AttentionRollout(model, start_layer=1, adapter=adapter).rollout(x)
    torch.testing.assert_close(r[0], _t([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.0, 0.0, 1.0]]))


def test_chefer_with_fixed_attention_matches_hand_gradients() -> None:
    # One layer with one head: the model output is head(t + A t) at the CLS row, so
    # d y / d A[i, j] = [i == 0] * (w_head . t_j): gradients only in row 0.
    a = _t(F_DISCARD)[None]
    model, adapter = _fixed_model([a])
    x = torch.randn(1, 3, 2, 4)
    target = 1
    with torch.no_grad():
        b = x.shape[0]
        patches = x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(b, 2, 12)
        t = torch.cat([model.cls.expand(b, -1, -1), model.embed(patches)], 1)[0]  # type: ignore[operator]
        w = model.head.weight[target]  # type: ignore[index]
    grad = torch.zeros(3, 3)
    grad[0] = t @ w  # (N,)
    cam = (grad * a[0]).clamp(min=0)
    expected = torch.eye(3) + cam
    rel = GradientRollout(model, adapter=adapter).relevance(x, target=target)
    torch.testing.assert_close(rel[0], expected)
