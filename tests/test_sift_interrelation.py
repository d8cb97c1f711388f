"""SiftInterrelation: known answers, an independent loop implementation on every model
family, SIFT counting, stages, aggregation, Mask-as-Prompt and the plot."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from conftest import make_model
from torch import Tensor, nn

from captum_vit import SiftInterrelation, adapt
from captum_vit._sift import IMAGENET_MEAN, IMAGENET_STD, keypoint_counts, unnormalize_inputs
from captum_vit._token_masking import masked_forward
from captum_vit.interrelation import (
    InterrelationSummary,
    aggregate_interrelation,
    detect_stages,
    interrelation_stats,
    mask_as_prompt,
)

# ------------------------------------------------------------------ known answers
# t = [2, 0, 1, 0]: patches 0 and 2 have keypoints.
ALPHA_4 = torch.tensor(
    [
        [0.40, 0.10, 0.30, 0.20],  # mean .25 -> S={0,2}: theta=(2+1)/(0+3)=1
        [0.10, 0.50, 0.10, 0.30],  # S={1,3}, no keypoints: theta=0/2=0
        [0.30, 0.30, 0.20, 0.20],  # S={0,1}: theta=2/(1+2)=2/3
        [0.25, 0.25, 0.25, 0.25],  # constant: S=all: theta=3/(2+3)=0.6
    ]
)
T_4 = torch.tensor([[2, 0, 1, 0]])


def test_known_answer_theta_groups_focus() -> None:
    theta, kk, nk, focus = interrelation_stats(ALPHA_4[None, None], T_4)
    torch.testing.assert_close(theta[0, 0], torch.tensor([1.0, 0.0, 0.666667, 0.6]), atol=1e-5, rtol=0)
    # KK: start patches 0, 2 -> (1 + 2/3) / 2; NK: patches 1, 3 -> (0 + 0.6) / 2
    assert kk.item() == pytest.approx(0.833333, abs=1e-5)
    assert nk.item() == pytest.approx(0.3, abs=1e-6)
    # focus: row0 scaled [1,0,2/3,1/3]/2 -> H=1.011404; row1 [0,1,0,.5]/1.5 -> 0.636514;
    # row2 [1,1,0,0]/2 -> ln2=0.693147; row3 constant -> ln4=1.386294; mean 0.931840
    assert focus.item() == pytest.approx(0.931840, abs=1e-5)


class _FixedAttention(nn.Module):
    """Outputs a fixed (B, 1, 5, 5) attention: a CLS row/column plus ALPHA_4."""

    def forward(self, x: Tensor) -> Tensor:
        full = torch.zeros(5, 5)
        full[0, 0] = 1.0
        full[1:, 1:] = ALPHA_4
        return full.expand(x.shape[0], 1, 5, 5)


class _FixedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleList([_FixedAttention(), _FixedAttention()])
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        for a in self.attn:
            a(x)
        return self.head(x.mean((2, 3)))


def test_known_answer_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _FixedModel()
    adapter = adapt(model, attention_modules=list(model.attn), num_prefix_tokens=1, patch_size=8)
    explainer = SiftInterrelation(model, adapter=adapter)
    monkeypatch.setattr(explainer, "keypoint_counts", lambda images: T_4)
    res = explainer.analyze(torch.zeros(1, 3, 16, 16))
    assert res.theta.shape == (1, 2, 1, 4) and res.kk.shape == (1, 2, 1)
    torch.testing.assert_close(res.theta[0, 1, 0], torch.tensor([1.0, 0.0, 0.666667, 0.6]), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.kk, torch.full((1, 2, 1), 0.833333), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.nk, torch.full((1, 2, 1), 0.3), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.kn, torch.full((1, 2, 1), 0.166667), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.nn, torch.full((1, 2, 1), 0.7), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.focus_index, torch.full((1, 2, 1), 0.931840), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.patch_scores, torch.tensor([[1.0, 0.0, 0.666667, 0.6]]), atol=1e-5, rtol=0)
    assert not res.stages.clear  # two identical layers: no stages
    grid = explainer.attribute(torch.zeros(1, 3, 16, 16), return_patch_grid=True)
    assert isinstance(grid, Tensor)
    torch.testing.assert_close(grid, torch.tensor([[[[1.0, 0.0], [0.666667, 0.6]]]]), atol=1e-5, rtol=0)


def test_non_probability_attention_is_rejected() -> None:
    model = _FixedModel()
    model.attn[1].forward = lambda x: 2 * _FixedAttention().forward(x)  # type: ignore[method-assign]
    adapter = adapt(model, attention_modules=list(model.attn), num_prefix_tokens=1, patch_size=8)
    with pytest.raises(ValueError, match="row-stochastic"):
        SiftInterrelation(model, adapter=adapter).analyze(torch.zeros(1, 3, 16, 16))


def test_gamma_known_answers_and_nan() -> None:
    # gamma 1.5: line .375 -> rows 0,1 keep only their max; rows 2,3 have nothing >= .375
    theta, kk, nk, _ = interrelation_stats(ALPHA_4[None, None], T_4, gamma=1.5)
    assert theta[0, 0, 0].item() == 1.0 and theta[0, 0, 1].item() == 0.0
    assert math.isnan(theta[0, 0, 2].item()) and math.isnan(theta[0, 0, 3].item())
    assert kk.item() == 1.0 and nk.item() == 0.0  # NaN rows skipped
    # gamma 2: line .5 -> row1 keeps 0.5 (>=, not >); rows 0, 2 empty -> KK NaN
    theta, kk, nk, _ = interrelation_stats(ALPHA_4[None, None], T_4, gamma=2.0)
    assert theta[0, 0, 1].item() == 0.0 and math.isnan(theta[0, 0, 0].item())
    assert math.isnan(kk.item()) and nk.item() == 0.0
    # gamma 0.5: line .125 -> row0 S={0,2,3}: 3/(1+3)=0.75
    theta, *_ = interrelation_stats(ALPHA_4[None, None], T_4, gamma=0.5)
    assert theta[0, 0, 0].item() == pytest.approx(0.75)


def test_empty_groups() -> None:
    _, kk, nk, _ = interrelation_stats(ALPHA_4[None, None], torch.zeros(1, 4, dtype=torch.long))
    assert math.isnan(kk.item()) and nk.item() == 0.0  # no keypoint patch: theta all 0
    _, kk, nk, _ = interrelation_stats(ALPHA_4[None, None], torch.ones(1, 4, dtype=torch.long))
    assert kk.item() == 1.0 and math.isnan(nk.item())


def test_bad_math_inputs() -> None:
    with pytest.raises(ValueError, match="keypoint_counts has shape"):
        interrelation_stats(ALPHA_4[None, None], torch.zeros(1, 5))
    with pytest.raises(ValueError, match="non-negative"):
        interrelation_stats(ALPHA_4[None, None], -T_4)
    with pytest.raises(ValueError, match="gamma"):
        interrelation_stats(ALPHA_4[None, None], T_4, gamma=0.0)
    with pytest.raises(ValueError, match="P, P"):
        interrelation_stats(torch.rand(1, 4, 3), T_4)


# ------------------------------------------------------------------ independent loops
def _loop_reference(attns: list[Tensor], t: Tensor, gamma: float) -> dict[str, np.ndarray]:
    """Straightforward per-sample/layer/head/row implementation in float64 numpy."""
    b = attns[0].shape[0]
    p = t.shape[1]
    out = {k: np.zeros((b, len(attns), attns[0].shape[1])) for k in ("kk", "nk", "focus")}
    theta_all = np.zeros((b, len(attns), attns[0].shape[1], p))
    # rows with an entry within float32 rounding of the detection line: float32 and
    # float64 may legitimately disagree there, so the comparison skips them
    ambiguous = np.zeros((b, len(attns), attns[0].shape[1], p), dtype=bool)
    for li, a in enumerate(attns):
        pre = a.shape[-1] - p
        a = a[:, :, pre:, pre:].double().numpy()
        for bi in range(b):
            tt = t[bi].numpy()
            for h in range(a.shape[1]):
                thetas, ents = [], []
                for i in range(p):
                    row = a[bi, h, i]
                    line = gamma * row.mean()
                    s = [j for j in range(p) if row[j] >= line * (1 - 1e-6)]
                    ambiguous[bi, li, h, i] = bool(np.any(np.abs(row - line) <= 1e-5 * line))
                    kp = sum(tt[j] for j in s if tt[j] > 0)
                    nz = sum(1 for j in s if tt[j] == 0)
                    thetas.append(kp / (nz + kp) if s else float("nan"))
                    lo, hi = row.min(), row.max()
                    if hi > lo:
                        q = (row - lo) / (hi - lo)
                        q = q / q.sum()
                        ents.append(-sum(v * math.log(v) for v in q if v > 0))
                    else:
                        ents.append(math.log(p))
                th = np.array(thetas)
                theta_all[bi, li, h] = th
                kgrp = [th[i] for i in range(p) if tt[i] > 0 and not math.isnan(th[i])]
                ngrp = [th[i] for i in range(p) if tt[i] == 0 and not math.isnan(th[i])]
                out["kk"][bi, li, h] = np.mean(kgrp) if kgrp else np.nan
                out["nk"][bi, li, h] = np.mean(ngrp) if ngrp else np.nan
                out["focus"][bi, li, h] = np.mean(ents)
    out["theta"] = theta_all
    out["ambiguous"] = ambiguous
    return out


@pytest.mark.parametrize("gamma", [1.0, 1.02])
def test_matches_loop_reference_every_family(
    family_model: tuple[str, nn.Module, int], gamma: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, model, size = family_model
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    explainer = SiftInterrelation(model, gamma=gamma)
    grid = explainer.adapter.grid_size(x)
    p = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 3, (2, p), generator=gen) * torch.randint(0, 2, (2, p), generator=gen)
    monkeypatch.setattr(explainer, "keypoint_counts", lambda images: counts)
    res = explainer.analyze(x)
    with torch.no_grad(), explainer.adapter.capture() as rec:
        explainer.adapter.forward(x)
    ref = _loop_reference([a.detach() for a in rec.kept()], counts, gamma)
    L = explainer.adapter.num_layers
    assert res.theta.shape == (2, L, ref["kk"].shape[2], p), name
    amb_rows = torch.from_numpy(ref["ambiguous"])
    assert amb_rows.float().mean() < 0.05, name  # only a few rows sit on the line
    amb_heads = amb_rows.any(-1)
    for key, got, skip in (("theta", res.theta, amb_rows), ("kk", res.kk, amb_heads),
                           ("nk", res.nk, amb_heads), ("focus", res.focus_index, None)):
        want = torch.from_numpy(ref[key])
        keep = torch.ones_like(want, dtype=torch.bool) if skip is None else ~skip
        torch.testing.assert_close(got.double()[keep], want[keep], atol=2e-5, rtol=1e-4,
                                   equal_nan=True, msg=f"{name} {key}")
    torch.testing.assert_close(res.kn, 1 - res.kk, equal_nan=True)
    torch.testing.assert_close(res.nn, 1 - res.nk, equal_nan=True)
    th = ref["theta"].reshape(2, -1, p)
    n_def = (~np.isnan(th)).sum(1)
    expected_scores = torch.from_numpy(np.where(n_def > 0, np.nan_to_num(th).sum(1) / np.maximum(n_def, 1), np.nan))
    clean = ~amb_rows.reshape(2, -1, p).any(1)
    torch.testing.assert_close(res.patch_scores.double()[clean], expected_scores[clean], atol=2e-5,
                               rtol=1e-4, equal_nan=True)
    assert torch.equal(res.keypoint_counts, counts)


# ------------------------------------------------------------------ SIFT counting
def _chelsea_224() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA))


def test_keypoint_counts_match_direct_opencv() -> None:
    img = _chelsea_224()
    counts = keypoint_counts(img, 16)
    kps = cv2.SIFT_create().detect(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), None)
    expected = np.zeros(196, dtype=np.int64)
    for kp in kps:
        x, y = kp.pt
        expected[int(y // 16) * 14 + int(x // 16)] += 1
    assert counts.shape == (1, 196) and counts.dtype == torch.int64
    assert counts.sum().item() == len(kps) > 50
    assert np.array_equal(counts[0].numpy(), expected)
    # options pass through to cv2.SIFT_create
    few = keypoint_counts(img, 16, sift_options={"nfeatures": 10})
    assert 0 < few.sum().item() <= 12


def test_keypoint_counts_formats_agree() -> None:
    img = _chelsea_224()
    u8 = keypoint_counts(np.stack([img, img[::-1].copy()]), 16)
    f = keypoint_counts(torch.from_numpy(np.stack([img, img[::-1].copy()])).permute(0, 3, 1, 2) / 255.0, 16)
    assert torch.equal(u8, f)
    assert not torch.equal(u8[0], u8[1])
    flat = keypoint_counts(np.full((64, 64, 3), 128, np.uint8), 16)
    assert flat.sum().item() == 0  # a flat image has no keypoints


def test_analyze_counts_on_unnormalized_inputs(real_deit: nn.Module) -> None:
    img = _chelsea_224()
    x01 = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (x01 - mean) / std
    torch.testing.assert_close(unnormalize_inputs(x), x01, atol=1e-6, rtol=0)
    explainer = SiftInterrelation(real_deit)
    res = explainer.analyze(x)
    assert torch.equal(res.keypoint_counts, keypoint_counts(img, 16))
    assert torch.equal(explainer.keypoint_counts(img), res.keypoint_counts)
    # passing the images explicitly gives the same result
    res2 = explainer.analyze(x, images=img[None])
    torch.testing.assert_close(res2.theta, res.theta, equal_nan=True)
    # a custom (mean, std) pair is honoured
    x_half = (x01 - 0.5) / 0.5
    custom = SiftInterrelation(real_deit, unnormalize=((0.5,) * 3, (0.5,) * 3))
    assert torch.equal(custom.keypoint_counts(unnormalize_inputs(x_half, custom.unnormalize)),
                       res.keypoint_counts)
    assert res.theta.shape == (1, 12, 3, 196)
    assert torch.isfinite(res.theta).all()  # gamma = 1: S_i never empty


# ------------------------------------------------------------------ attribute
def test_attribute_shapes_batch_equals_single_and_tuple() -> None:
    model, size = make_model("timm_vit")
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    explainer = SiftInterrelation(model)
    out = explainer.attribute(x)
    assert isinstance(out, Tensor) and out.shape == x.shape and out.is_contiguous()
    grid = explainer.attribute(x, return_patch_grid=True)
    assert isinstance(grid, Tensor) and grid.shape == (2, 1, 10, 10)
    for i in range(2):
        single = explainer.attribute(x[i : i + 1], return_patch_grid=True)
        assert isinstance(single, Tensor)
        torch.testing.assert_close(single, grid[i : i + 1], atol=1e-6, rtol=0)
    tup = explainer.attribute((x,), return_patch_grid=True)
    assert isinstance(tup, tuple) and torch.equal(tup[0], grid)
    res = explainer.analyze(x)
    torch.testing.assert_close(grid.flatten(1), res.patch_scores)
    assert hasattr(SiftInterrelation.attribute, "__wrapped__")
    with torch.no_grad():
        again = explainer.attribute(x, return_patch_grid=True)
    assert isinstance(again, Tensor) and torch.equal(again, grid)


def test_bad_inputs() -> None:
    model, size = make_model("hf_vit")
    with pytest.raises(ValueError, match="gamma"):
        SiftInterrelation(model, gamma=-1.0)
    with pytest.raises(TypeError, match="unnormalize"):
        SiftInterrelation(model, unnormalize="imagenet")  # type: ignore[arg-type]
    explainer = SiftInterrelation(model)
    x = torch.randn(2, 3, size, size)
    with pytest.raises(ValueError, match="images give keypoint counts"):
        explainer.analyze(x, images=np.zeros((1, size, size, 3), np.uint8))
    with pytest.raises(ValueError):
        explainer.analyze(x, images=np.zeros((2, size + 8, size + 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        explainer.keypoint_counts(torch.randn(2, 3, size, size) * 5)
    with pytest.raises(TypeError, match="uint8"):
        explainer.keypoint_counts(np.zeros((size, size, 3), np.int32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        explainer.analyze(torch.randn(3, size, size))


# ------------------------------------------------------------------ stages
def test_detect_stages_clear_and_robust_to_a_spike() -> None:
    gap = [0.0, 0.01, 0.0, 0.12, 0.2, 0.22, 0.18, 0.15, 0.03, 0.01]
    focus = [5.0, 5.0, 4.9, 4.0, 3.5, 3.4, 3.6, 3.8, 4.0, 4.2]
    s = detect_stages(gap, focus)
    assert (s.retrieval, s.capture, s.coach) == (range(0, 3), range(3, 8), range(8, 10))
    assert s.clear, s.reason
    spiky = list(gap)
    spiky[1] = 0.3  # one noisy layer does not become a capture stage
    s2 = detect_stages(spiky, focus)
    # the median filter may pull the spike's neighbour in, never the spike's own layer
    assert 1 not in s2.capture and s2.capture.stop == 8 and s2.clear
    assert s.as_dict() == {"retrieval": (0, 3), "capture": (3, 8), "coach": (8, 10)}


def test_detect_stages_not_clear() -> None:
    flat = detect_stages([0.001, -0.002, 0.003, 0.0], [4.0, 4.0, 4.0, 4.0])
    assert not flat.clear and len(flat.capture) == 0 and "never exceeds" in flat.reason
    early = detect_stages([0.3, 0.3, 0.3, 0.05, 0.0], [4.0, 4.0, 4.0, 4.0, 4.0])
    assert not early.clear and early.retrieval == range(0, 0) and "no retrieval" in early.reason
    no_focus = detect_stages([0.0, 0.0, 0.2, 0.2, 0.0, 0.0], [1.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    assert not no_focus.clear and "less focused" in no_focus.reason
    with pytest.raises(ValueError):
        detect_stages([0.1, 0.2], [1.0])


# ------------------------------------------------------------------ aggregation
def test_aggregate_equals_batch_summary() -> None:
    model, size = make_model("timm_deit_distilled")
    torch.manual_seed(2)
    x = torch.randn(5, 3, size, size)
    explainer = SiftInterrelation(model)
    loader = [(x[:2], torch.zeros(2)), (x[2:], torch.zeros(3))]
    agg = aggregate_interrelation(explainer, loader, show_progress=False)
    whole = explainer.analyze(x).summary()
    assert isinstance(agg, InterrelationSummary) and agg.num_images == 5
    for key in ("kk", "nk", "focus_index"):
        torch.testing.assert_close(getattr(agg, key), getattr(whole, key), equal_nan=True,
                                   atol=1e-6, rtol=1e-5)
    assert agg.head_spread("kk").shape == (2,)
    assert "| layer |" in agg.to_markdown()
    with pytest.raises(ValueError, match="no batches"):
        aggregate_interrelation(explainer, [], show_progress=False)


# ------------------------------------------------------------------ Mask-as-Prompt, plot
def test_mask_as_prompt_top_bottom_random() -> None:
    model, size = make_model("timm_vit")
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    adapter = adapt(model)
    scores = torch.rand(2, 100)
    scores[0, 5] = float("nan")
    preds = mask_as_prompt(model, x, scores, ratios=(0.1, 0.3), adapter=adapter,
                           generator=torch.Generator().manual_seed(0))
    assert preds["top"].shape == (2, 2) and preds["unmasked"].shape == (2,)
    keyed = torch.nan_to_num(scores, nan=-1.0)
    top = torch.zeros(2, 100, dtype=torch.bool).scatter_(1, keyed.topk(30, dim=1).indices, True)
    assert not top[0, 5]
    expected = masked_forward(adapter, x, top).argmax(-1)
    assert torch.equal(preds["top"][1], expected)
    keyed_b = torch.nan_to_num(scores, nan=2.0)
    bottom = torch.zeros(2, 100, dtype=torch.bool).scatter_(1, keyed_b.topk(10, dim=1, largest=False).indices, True)
    assert torch.equal(preds["bottom"][0], masked_forward(adapter, x, bottom).argmax(-1))
    again = mask_as_prompt(model, x, scores, ratios=(0.1, 0.3), adapter=adapter,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["random"], preds["random"])
    with pytest.raises(ValueError, match="ratio"):
        mask_as_prompt(model, x, scores, ratios=(0.0,))
    with pytest.raises(ValueError, match="strategies"):
        mask_as_prompt(model, x, scores, strategies=("middle",))
    with pytest.raises(ValueError, match="patch_scores"):
        mask_as_prompt(model, x, scores[:, :50])


def test_plot_interrelation() -> None:
    from matplotlib.figure import Figure

    from captum_vit.viz import plot_interrelation

    model, size = make_model("timm_registers")
    res = SiftInterrelation(model).analyze(torch.randn(2, 3, size, size))
    fig = plot_interrelation(res)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    heads = res.kk.shape[2]
    # per-head points: one scatter per head and curve on top, per-head focus below
    assert len(fig.axes[0].collections) == 2 * heads
    assert len(fig.axes[1].collections) == heads
    with pytest.raises(TypeError):
        plot_interrelation(res.kk)  # type: ignore[arg-type]
