"""PatchOcclusion: known answers, a plain per-window loop, batching, every family."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, make_model
from torch import Tensor, nn

from captum_vit import PatchOcclusion, adapt
from captum_vit._token_masking import masked_forward


class _UniformAttention(nn.Module):
    """'Attention' whose probabilities are uniform: every output token is the mean."""

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return torch.full((b, 1, n, n), 1.0 / n)


class _MeanViT(nn.Module):
    """score = head(mean of tokens), tokens = [cls, patch_emb_j + pos_j]: linear in tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.pos = nn.Parameter(torch.randn(1, 9, 4))  # 3x3 grid of patches (24x24 input)
        self.tokens = nn.Identity()
        self.attn = _UniformAttention()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = self.tokens(torch.cat([self.cls.expand(x.shape[0], -1, -1), p + self.pos], dim=1))
        a = self.attn(t)
        return self.head((a[:, 0] @ t)[:, 0])


def _mean_vit() -> tuple[_MeanViT, PatchOcclusion, PatchOcclusion]:
    model = _MeanViT().eval()
    adapter = adapt(model, attention_modules=[model.attn], num_prefix_tokens=1, patch_size=8,
                    patch_embed=model.patch_embed, token_module=model.tokens)
    return (model, PatchOcclusion(model, adapter=adapter),
            PatchOcclusion(model, replacement="drop", adapter=adapter))


def test_known_answer_zero_and_drop() -> None:
    model, zero, drop = _mean_vit()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        emb = model.patch_embed(x).flatten(2).transpose(1, 2)  # (2, 9, 4)
        tokens = torch.cat([model.cls.expand(2, -1, -1), emb + model.pos], dim=1)  # (2, 10, 4)
    w = model.head.weight[1]
    got = zero.attribute(x, target=1, return_patch_grid=True)
    assert got.shape == (2, 1, 3, 3)
    # zero: score drops by w . e_j / N with N = 10 tokens
    torch.testing.assert_close(got.view(2, 9), (emb @ w) / 10, atol=1e-5, rtol=1e-5)
    # drop: mean over the N - 1 remaining tokens
    s = tokens.sum(1)
    expected = (s @ w)[:, None] / 10 - ((s[:, None, :] - tokens[:, 1:]) @ w) / 9
    got = drop.attribute(x, target=1, return_patch_grid=True)
    torch.testing.assert_close(got.view(2, 9), expected, atol=1e-5, rtol=1e-5)


def _loop_reference(model: nn.Module, x: Tensor, target: Tensor, window: int, stride: int,
                    replacement: str) -> Tensor:
    """Plain loop: each window masked on its own, one sample at a time, averaged."""
    adapter = adapt(model)
    gh, gw = adapter.grid_size(x)
    out = torch.zeros(x.shape[0], gh, gw)
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        t = int(target[i])
        with torch.no_grad():
            base = adapter.forward(xi)[0, t]
        total = torch.zeros(gh, gw)
        count = torch.zeros(gh, gw)
        tops = sorted({*range(0, gh - window + 1, stride), gh - window})
        lefts = sorted({*range(0, gw - window + 1, stride), gw - window})
        for top in tops:
            for left in lefts:
                m = torch.zeros(gh, gw, dtype=torch.bool)
                m[top : top + window, left : left + window] = True
                with torch.no_grad():
                    score = masked_forward(adapter, xi, m.view(1, -1), replacement)[0, t]
                total[m] += float(base - score)
                count[m] += 1
        out[i] = total / count
    return out


@pytest.mark.parametrize(("window", "stride", "replacement"),
                         [(1, 1, "zero"), (2, 1, "mean"), (3, 2, "drop")])
def test_equals_plain_window_loop(window: int, stride: int, replacement: str) -> None:
    model, size = make_model("hf_vit")  # 4x4 grid
    torch.manual_seed(3)
    x = torch.randn(2, 3, size, size)
    target = torch.tensor([1, 4])
    occ = PatchOcclusion(model, replacement=replacement)
    got = occ.attribute(x, target=target, window=window, stride=stride, perturbations_per_eval=3,
                        return_patch_grid=True)
    expected = _loop_reference(model, x, target, window, stride, replacement)
    torch.testing.assert_close(got[:, 0], expected, atol=1e-5, rtol=1e-4)


def test_batch_equals_single_per_sample_targets_and_ppe() -> None:
    model, size = make_model("timm_deit_distilled")
    torch.manual_seed(4)
    x = torch.randn(3, 3, size, size)
    occ = PatchOcclusion(model)
    targets = [0, 5, 2]
    batch = occ.attribute(x, target=targets, return_patch_grid=True)
    for i in range(3):
        single = occ.attribute(x[i : i + 1], target=targets[i], return_patch_grid=True)
        torch.testing.assert_close(batch[i : i + 1], single, atol=1e-5, rtol=1e-4)
    for ppe in (7, 100):  # 16 windows: uneven chunks, then one chunk
        torch.testing.assert_close(
            occ.attribute(x, target=targets, perturbations_per_eval=ppe, return_patch_grid=True),
            batch, atol=1e-5, rtol=1e-4,
        )
    # target=None: each sample's predicted class
    with torch.no_grad():
        pred = occ.adapter.forward(x).argmax(1)
    torch.testing.assert_close(occ.attribute(x, return_patch_grid=True),
                               occ.attribute(x, target=pred, return_patch_grid=True))


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_every_family(name: str) -> None:
    model, size = make_model(name)
    torch.manual_seed(5)
    x = torch.randn(2, 3, size, size)
    replacement = "zero" if name == "timm_eva" else "drop"
    win = 5 if name == "timm_vit" else 2  # 4 windows on every grid (10x10 or 4x4)
    ph, pw = adapt(model).patch_size
    for rep in ("zero", replacement):
        occ = PatchOcclusion(model, replacement=rep)
        out = occ.attribute(x, window=win, stride=win, perturbations_per_eval=4)
        assert isinstance(out, Tensor) and out.shape == x.shape and out.is_contiguous()
        assert torch.isfinite(out).all()
        single = occ.attribute(x[:1], window=win, stride=win, perturbations_per_eval=3,
                               return_patch_grid=True)
        assert isinstance(single, Tensor)
        torch.testing.assert_close(single[:, 0], out[:1, 0, ::ph, ::pw], atol=1e-5, rtol=1e-4)


def test_output_forms_and_captum_conventions() -> None:
    model, size = make_model("timm_vit")
    occ = PatchOcclusion(model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = occ.attribute((x,), target=0, window=5, stride=5)
    assert isinstance(out, tuple) and out[0].shape == x.shape
    grid = occ.attribute(x, target=0, window=5, stride=5, return_patch_grid=True)
    assert isinstance(grid, Tensor) and grid.shape == (1, 1, 10, 10)
    # each pixel carries its patch's value in every channel
    torch.testing.assert_close(out[0][0, 2, 16 * 3 + 5, 16 * 7 + 1], grid[0, 0, 3, 7])
    assert hasattr(PatchOcclusion.attribute, "__wrapped__")
    logits = occ.forward_masked(x, torch.ones(100, dtype=torch.bool))
    assert logits.shape == (1, 1000) and not logits.requires_grad


def test_bad_inputs() -> None:
    model, size = make_model("hf_vit")
    x = torch.randn(1, 3, size, size)
    with pytest.raises(ValueError, match="replacement"):
        PatchOcclusion(model, replacement="blur")
    occ = PatchOcclusion(model)
    with pytest.raises(ValueError, match="larger than"):
        occ.attribute(x, window=5)
    with pytest.raises(ValueError, match="perturbations_per_eval"):
        occ.attribute(x, perturbations_per_eval=0)
    with pytest.raises(ValueError, match=">= 1"):
        occ.attribute(x, stride=0)
    with pytest.raises(TypeError, match="window"):
        occ.attribute(x, window=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        occ.attribute(x, target=99)
    with pytest.raises(ValueError, match="rotary"):
        eva, s = make_model("timm_eva")
        PatchOcclusion(eva, replacement="drop").attribute(torch.randn(1, 3, s, s))
