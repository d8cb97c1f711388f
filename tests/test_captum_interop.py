"""Captum's own tools take captum_vit's methods as they are."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
from captum.attr import NoiseTunnel
from captum.attr import visualization as viz
from captum.metrics import infidelity, sensitivity_max
from conftest import make_model
from torch import Tensor, nn

from captum_vit import AttentionRollout, GradientRollout, RawAttention

matplotlib.use("Agg")

METHODS: list[tuple[str, Callable[[nn.Module], Any]]] = [
    ("raw", lambda m: RawAttention(m)),
    ("rollout", lambda m: AttentionRollout(m, head_fusion="max", discard_ratio=0.5)),
    ("chefer", lambda m: GradientRollout(m)),
    ("grad_rollout", lambda m: GradientRollout(m, variant="rollout")),
]


@pytest.fixture(scope="module")
def model_and_x() -> tuple[nn.Module, Tensor]:
    model, size = make_model("timm_deit_distilled")
    torch.manual_seed(3)
    return model, torch.randn(2, 3, size, size)


def test_noise_tunnel_smoothgrad(model_and_x: tuple[nn.Module, Tensor]) -> None:
    model, x = model_and_x
    gr = GradientRollout(model)
    nt = NoiseTunnel(gr)
    out = nt.attribute(x, nt_type="smoothgrad", nt_samples=3, target=[1, 4])
    assert isinstance(out, Tensor) and out.shape == x.shape
    # with zero noise smoothgrad is the mean of identical maps: the plain attribution
    plain = gr.attribute(x, target=[1, 4])
    still = nt.attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.0, target=[1, 4])
    torch.testing.assert_close(still, plain, atol=1e-5, rtol=1e-4)
    # under no_grad, and with a tuple: tuple out
    with torch.no_grad():
        tup = nt.attribute((x,), nt_type="smoothgrad_sq", nt_samples=2, target=1)
    assert isinstance(tup, tuple) and len(tup) == 1 and tup[0].shape == x.shape
    # the noise does change the map
    assert not torch.allclose(out, plain)


def _perturb(inputs: Tensor) -> tuple[Tensor, Tensor]:
    noise = 0.05 * torch.randn_like(inputs)
    return noise, inputs - noise


@pytest.mark.parametrize(("label", "make"), METHODS)
def test_metrics_and_visualization(
    model_and_x: tuple[nn.Module, Tensor], label: str, make: Callable[[nn.Module], Any]
) -> None:
    model, x = model_and_x
    method = make(model)
    attr = method.attribute(x, target=2)
    assert attr.shape == x.shape and attr.is_contiguous()
    inf = infidelity(model, _perturb, x, attr, target=2, n_perturb_samples=2)
    assert inf.shape == (2,) and torch.isfinite(inf).all()
    sens = sensitivity_max(method.attribute, x, target=2, n_perturb_samples=2)
    assert sens.shape == (2,) and torch.isfinite(sens).all()
    heat = attr[0].permute(1, 2, 0).numpy()
    image = (x[0] - x[0].min()) / (x[0].max() - x[0].min())
    fig, _ = viz.visualize_image_attr(
        heat, image.permute(1, 2, 0).numpy(), method="blended_heat_map", sign="absolute_value", use_pyplot=False
    )
    assert fig is not None
    assert np.asarray(heat).shape == (x.shape[2], x.shape[3], 3)


@pytest.mark.parametrize(("label", "make"), METHODS)
def test_no_grad_and_tuple_in_tuple_out(
    model_and_x: tuple[nn.Module, Tensor], label: str, make: Callable[[nn.Module], Any]
) -> None:
    model, x = model_and_x
    method = make(model)
    plain = method.attribute(x, target=[0, 3])
    with torch.no_grad():
        quiet = method.attribute(x, target=[0, 3])
    torch.testing.assert_close(quiet, plain)
    tup = method.attribute((x,), target=[0, 3])
    assert isinstance(tup, tuple) and len(tup) == 1
    torch.testing.assert_close(tup[0], plain)
    grid = method.attribute((x,), target=[0, 3], return_patch_grid=True)
    assert isinstance(grid, tuple) and grid[0].shape == (2, 1, 4, 4)
    assert hasattr(type(method).attribute, "__wrapped__")  # Captum's log_usage
