"""SIFT-guided MAE masks and the beta curriculum."""

from __future__ import annotations

import itertools

import pytest
import torch

from captum_vit.masking import sift_curriculum, sift_guided_mask


def _counts() -> torch.Tensor:
    # 3 samples over 20 patches: 8, 3 and 19 keypoint patches
    c = torch.zeros(3, 20, dtype=torch.long)
    c[0, :8] = torch.arange(1, 9)
    c[1, [2, 7, 11]] = 5
    c[2, 1:] = 2
    return c


def test_exact_count_and_beta_fraction() -> None:
    counts = _counts()[:1]
    g = torch.Generator().manual_seed(0)
    mask = sift_guided_mask(counts, ratio=0.5, beta=0.4, generator=g)
    assert mask.dtype == torch.bool and mask.shape == (1, 20)
    assert mask.sum().item() == 10  # round(0.5 * 20)
    kp = counts > 0
    assert (mask & kp).sum().item() == 4  # round(0.4 * 10) keypoint patches
    assert (mask & ~kp).sum().item() == 6


def test_fallback_keeps_exact_count() -> None:
    counts = _counts()
    g = torch.Generator().manual_seed(1)
    mask = sift_guided_mask(counts, ratio=0.5, beta=0.5, generator=g)
    assert mask.sum(1).tolist() == [10, 10, 10]
    kp = counts > 0
    # sample 0 (8 kp): 5 kp + 5 non-kp as asked
    assert (mask[0] & kp[0]).sum().item() == 5
    # sample 1 has only 3 keypoint patches: all masked, the rest from non-keypoint ones
    assert (mask[1] & kp[1]).sum().item() == 3
    # sample 2 has a single non-keypoint patch: it is masked, the rest are keypoint patches
    assert (mask[2] & ~kp[2]).sum().item() == 1 and (mask[2] & kp[2]).sum().item() == 9


def test_seeded_and_uniform() -> None:
    counts = _counts()
    a = sift_guided_mask(counts, 0.3, 0.2, generator=torch.Generator().manual_seed(7))
    b = sift_guided_mask(counts, 0.3, 0.2, generator=torch.Generator().manual_seed(7))
    c = sift_guided_mask(counts, 0.3, 0.2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every keypoint patch of sample 0 is equally likely: 2000 draws of 1 of 8
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(20)
    for _ in range(400):
        hits += sift_guided_mask(counts[:1].expand(5, -1), 0.1, 0.5, generator=g).sum(0)
    kp_hits = hits[:8]
    assert kp_hits.sum().item() == 2000  # 1 of the 2 masked patches is a keypoint patch
    assert (kp_hits / 250 - 1).abs().max() < 0.25
    assert hits[8:].sum().item() == 2000


def test_extremes() -> None:
    counts = _counts()
    assert not sift_guided_mask(counts, 0.0, 0.5).any()
    assert sift_guided_mask(counts, 1.0, 0.5).all()
    only_kp = sift_guided_mask(counts[:1], 0.4, 1.0)
    assert only_kp.sum().item() == 8 and only_kp[0, :8].all()
    no_kp = sift_guided_mask(counts[:1], 0.4, 0.0)
    assert no_kp.sum().item() == 8 and not no_kp[0, :8].any()


def test_bad_inputs() -> None:
    counts = _counts()
    with pytest.raises(ValueError, match="ratio"):
        sift_guided_mask(counts, 1.5, 0.2)
    with pytest.raises(ValueError, match="beta"):
        sift_guided_mask(counts, 0.5, -0.1)
    with pytest.raises(ValueError, match=r"\(B, P\)"):
        sift_guided_mask(counts[0], 0.5, 0.1)
    with pytest.raises(ValueError, match="non-negative"):
        sift_guided_mask(-counts, 0.5, 0.1)


def test_curriculum_steps_up() -> None:
    betas = [sift_curriculum(s, 100) for s in range(100)]
    assert betas[0] == 0.1 and betas[-1] == 0.5
    assert sorted(set(betas)) == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(betas))
    assert [betas.count(v) for v in (0.1, 0.2, 0.3, 0.4, 0.5)] == [20] * 5
    assert sift_curriculum(150, 100) == 0.5
    assert sift_curriculum(3, 10, start=0.2, end=0.6, num_levels=3) == 0.2
    assert sift_curriculum(5, 10, start=0.2, end=0.6, num_levels=3) == 0.4
    assert sift_curriculum(0, 10, num_levels=1) == 0.5
    with pytest.raises(ValueError):
        sift_curriculum(-1, 10)
    with pytest.raises(TypeError):
        sift_curriculum(1.5, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sift_curriculum(0, 10, start=1.5)
