"""The Quantus bridge: explain_func inside real Quantus metrics on a tiny model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient
from conftest import make_model

import captum_vit
import captum_vit.attr
from captum_vit import AttentionRollout, AttnLRP, GradientRollout
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


# Captum's InputXGradient warns that it switched requires_grad on for its input
@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_attnlrp_class_gives_the_relevance_summed_over_channels(
    batch: tuple[torch.nn.Module, np.ndarray, np.ndarray],
) -> None:
    """Per-pixel-and-channel relevance: all three channels count (channel 0 alone
    dropped two thirds of it)."""
    model, x, y = batch
    a = explain_func(AttnLRP)(model, x, y)
    assert isinstance(a, np.ndarray) and a.shape == (4, 1, 64, 64) and a.dtype == np.float32
    ref = AttnLRP(model).attribute(torch.from_numpy(x), target=torch.from_numpy(y))
    assert isinstance(ref, torch.Tensor)
    np.testing.assert_allclose(a, ref.sum(1, keepdim=True).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(a, ref[:, :1].numpy(), rtol=1e-3, atol=1e-6)
    # Captum's own per-channel classes are summed the same way
    b = explain_func(InputXGradient)(model, x, y)
    ref_b = InputXGradient(model).attribute(torch.from_numpy(x), target=torch.from_numpy(y))
    np.testing.assert_allclose(b, ref_b.detach().sum(1, keepdim=True).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(set(captum_vit.attr.__all__) - {"AttnLRP"}))
def test_map_method_class_gives_its_single_channel(
    name: str, batch: tuple[torch.nn.Module, np.ndarray, np.ndarray],
) -> None:
    """Every other captum_vit class repeats one map in every channel (checked here, so a
    new class that does not fails): that channel comes back, not a 3x sum."""
    model, x, y = batch
    cls = getattr(captum_vit, name)
    a = explain_func(cls)(model, x[:2], y[:2])
    assert isinstance(a, np.ndarray) and a.shape == (2, 1, 64, 64) and a.dtype == np.float32
    ref = cls(model).attribute(torch.from_numpy(x[:2]), target=torch.from_numpy(y[:2]))
    assert isinstance(ref, torch.Tensor) and ref.shape == (2, 3, 64, 64)
    assert torch.equal(ref, ref[:, :1].expand_as(ref))
    np.testing.assert_allclose(a, ref[:, :1].numpy(), rtol=1e-5, atol=1e-7)


def test_class_whose_output_is_not_input_shaped_is_refused(
    batch: tuple[torch.nn.Module, np.ndarray, np.ndarray],
) -> None:
    model, x, y = batch

    class GridOnly:
        def __init__(self, model: torch.nn.Module) -> None:
            self.method = GradientRollout(model)

        def attribute(self, inputs: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
            out = self.method.attribute(inputs, target=target, return_patch_grid=True)
            assert isinstance(out, torch.Tensor)
            return out

    with pytest.raises(ValueError, match=r"GridOnly.attribute returned shape \(2, 1, 4, 4\).*input-shaped"):
        explain_func(GridOnly)(model, x[:2], y[:2])
