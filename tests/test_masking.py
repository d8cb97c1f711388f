"""captum_vit.masking: random, centre and score-guided patch masks."""

from __future__ import annotations

import pytest
import torch

from captum_vit.masking import center_mask, mask_count, random_mask, score_mask


def test_mask_count_rounds_half_up() -> None:
    assert mask_count(196, 0.3) == 59  # 58.8
    assert mask_count(4, 0.375) == 2  # 1.5 -> 2
    assert mask_count(10, 0.25) == 3  # 2.5 -> 3
    assert mask_count(7, 0.0) == 0 and mask_count(7, 1.0) == 7


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_random_mask_exact_count(ratio: float) -> None:
    mask = random_mask(6, 196, ratio, generator=torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (6, 196)
    assert (mask.sum(1) == mask_count(196, ratio)).all()


def test_random_mask_seeded_and_uniform() -> None:
    a = random_mask(4, 50, 0.4, generator=torch.Generator().manual_seed(7))
    b = random_mask(4, 50, 0.4, generator=torch.Generator().manual_seed(7))
    c = random_mask(4, 50, 0.4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # samples drawn independently
    freq = random_mask(4000, 10, 0.3, generator=torch.Generator().manual_seed(0)).float().mean(0)
    assert (freq - 0.3).abs().max() < 0.04  # every patch equally likely


def test_center_mask_known_answers() -> None:
    mask, actual = center_mask((14, 14), 0.3, return_ratio=True)
    expected = torch.zeros(14, 14, dtype=torch.bool)
    expected[3:11, 3:11] = True  # 8x8 = 64 patches, nearest square to 58.8
    assert torch.equal(mask, expected.flatten())
    assert actual == pytest.approx(64 / 196)
    m4 = center_mask(4, 0.25)
    e4 = torch.zeros(4, 4, dtype=torch.bool)
    e4[1:3, 1:3] = True
    assert torch.equal(m4, e4.flatten())
    # 13x13 on 14x14 for 0.9 (169/196 = 0.862 beats 196/196 = 1.0); odd margin: up-left
    m9, r9 = center_mask(14, 0.9, return_ratio=True)
    e9 = torch.zeros(14, 14, dtype=torch.bool)
    e9[0:13, 0:13] = True
    assert torch.equal(m9, e9.flatten()) and r9 == pytest.approx(169 / 196)
    assert not center_mask(14, 0.0).any()
    assert center_mask(14, 1.0).all()


@pytest.mark.parametrize("grid", [(14, 14), (3, 5), (7, 4), (1, 9)])
@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5, 0.77])
def test_center_mask_is_nearest_square(grid: tuple[int, int], ratio: float) -> None:
    mask, actual = center_mask(grid, ratio, return_ratio=True)
    total = grid[0] * grid[1]
    errors = [abs(s * s / total - ratio) for s in range(min(grid) + 1)]
    best = min(errors)
    assert abs(actual - ratio) == pytest.approx(best)
    m = mask.view(*grid)
    rows = torch.nonzero(m.any(1)).flatten()
    cols = torch.nonzero(m.any(0)).flatten()
    if len(rows):
        # contiguous square block, nothing outside it
        assert len(rows) == len(cols) and int(m.sum()) == len(rows) ** 2
        assert m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
    assert int(mask.sum()) / total == pytest.approx(actual)


def test_score_mask_known_answers() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, -1.0, 4.0]])
    most = score_mask(scores, 0.5)
    assert most.tolist() == [[True, False, True, False], [False, True, False, True]]
    least = score_mask(scores, 0.5, largest=False)
    assert least.tolist() == [[False, True, False, True], [True, False, True, False]]
    ties = score_mask(torch.zeros(1, 5), 0.4)
    assert ties.tolist() == [[True, True, False, False, False]]  # ties: lower index first
    grid = scores.view(2, 1, 2, 2)
    assert torch.equal(score_mask(grid, 0.5), most)
    assert torch.equal(score_mask(scores.view(2, 2, 2), 0.5), most)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="ratio"):
        random_mask(1, 10, 1.5)
    with pytest.raises(ValueError, match="ratio"):
        center_mask(14, -0.1)
    with pytest.raises(TypeError, match="ratio"):
        score_mask(torch.zeros(1, 4), "0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch"):
        random_mask(0, 10, 0.5)
    with pytest.raises(ValueError, match="num_patches"):
        random_mask(1, 0, 0.5)
    with pytest.raises(ValueError, match="scores must be"):
        score_mask(torch.zeros(2, 3, 4, 4), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        score_mask(torch.tensor([[float("nan"), 1.0]]), 0.5)
    with pytest.raises(ValueError, match="grid"):
        center_mask((0, 4), 0.5)
