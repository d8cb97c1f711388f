"""The Quantus bridge: explain_func inside real Quantus metrics on a tiny model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import make_model

from captum_vit import AttentionRollout, GradientRollout
from captum_vit.integrations.quantus import explain_func

quantus = pytest.importorskip("quantus")

_FAMILY = "timm_deit_distilled"  # 64x64 inputs, 4x4 grid of 16 px patches


@pytest.fixture(scope="module")
def batch() -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    model, size = make_model(_FAMILY)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x.numpy(), y.numpy()


def test_numpy_in_numpy_out_equals_the_method(batch: tuple[torch.nn.Module, np.ndarray, np.ndarray]) -> None:
    model, x, y = batch
    a = explain_func("grad_rollout_chefer")(model, x, y)
    assert isinstance(a, np.ndarray) and a.shape == (4, 1, 64, 64) and a.dtype == np.float32
    ref = GradientRollout(model, variant="chefer").attribute(torch.from_numpy(x), target=torch.from_numpy(y))
    assert isinstance(ref, torch.Tensor)
    np.testing.assert_allclose(a, ref[:, :1].numpy(), rtol=1e-5, atol=1e-7)
    b = explain_func(AttentionRollout, head_fusion="max")(model, x, y)
    ref_b = AttentionRollout(model, head_fusion="max").attribute(torch.from_numpy(x))
    assert isinstance(ref_b, torch.Tensor)
    np.testing.assert_allclose(b, ref_b[:, :1].numpy(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="unknown method"):
        explain_func("no_such_method")
    with pytest.raises(ValueError, match="targets"):
        explain_func("random")(model, x, y[:2])


def test_region_perturbation_and_max_sensitivity(batch: tuple[torch.nn.Module, np.ndarray, np.ndarray]) -> None:
    model, x, y = batch
    f = explain_func("grad_rollout_chefer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rp = quantus.RegionPerturbation(patch_size=16, regions_evaluation=4, disable_warnings=True,
                                        display_progressbar=False)
        curves = rp(model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=f, device="cpu")
        ms = quantus.MaxSensitivity(nr_samples=3, disable_warnings=True, display_progressbar=False)
        sens = ms(model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=f, device="cpu")
    assert len(curves) == 4 and all(np.isfinite(c).all() and len(c) == 4 for c in curves)
    assert len(sens) == 4 and all(np.isfinite(s) and s >= 0 for s in sens)


def test_mprt_explains_the_randomised_model_it_is_given(batch: tuple[torch.nn.Module, np.ndarray, np.ndarray]) -> None:
    """MPRT passes randomised copies: the maps must change (a closure over the original
    model would give correlation 1 at every layer)."""
    model, x, y = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mprt = quantus.MPRT(disable_warnings=True, display_progressbar=False, seed=0)
        scores = mprt(model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func("grad_rollout_chefer"),
                      device="cpu")
    assert scores.pop("original") == pytest.approx([1.0] * 4)
    assert any(np.mean(v) < 0.99 for v in scores.values())
    # the original model is untouched
    with torch.no_grad():
        assert torch.equal(model(torch.from_numpy(x)).argmax(1), torch.from_numpy(y))
