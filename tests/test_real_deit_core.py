"""The core methods on the real ImageNet DeiT-Tiny and skimage's chelsea (a cat).

The cat mask is a polygon drawn by hand around the cat in the original 451x300
chelsea image (vertices below, in original pixels): everything right of the cat's
cheek and ear (the blurred room) and the top-left corner are background. The image
is resized whole to 224x224 (aspect not kept) rather than centre-cropped, because
timm's centre crop keeps almost nothing but cat.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image, ImageDraw
from skimage import data
from torch import Tensor, nn

from captum_vit import AttentionRollout, GradientRollout, RawAttention

pytestmark = pytest.mark.real_model

CAT_POLYGON = [(30, 0), (395, 0), (372, 60), (366, 140), (348, 210), (322, 262), (300, 300), (0, 300), (0, 150), (18, 100)]
EGYPTIAN_CAT, TABBY, BULL_MASTIFF = 285, 281, 243


@pytest.fixture(scope="module")
def chelsea_whole(real_deit: nn.Module) -> tuple[Tensor, Tensor]:
    """(1, 3, 224, 224) normalised image and its (224, 224) bool cat mask."""
    img = Image.fromarray(data.chelsea())
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).polygon(CAT_POLYGON, fill=1)
    cfg = timm.data.resolve_data_config({}, model=real_deit)
    mean = torch.tensor(cfg["mean"])[:, None, None]
    std = torch.tensor(cfg["std"])[:, None, None]
    pixels = torch.from_numpy(np.array(img.resize((224, 224), Image.BICUBIC))).permute(2, 0, 1)
    x = ((pixels.float() / 255 - mean) / std)[None]
    cat = torch.from_numpy(np.array(mask.resize((224, 224), Image.NEAREST))).bool()
    return x, cat


def _density_ratio(attr: Tensor, cat: Tensor) -> float:
    """Mean attribution per cat pixel / mean per background pixel."""
    a = attr[0, 0]
    return float(a[cat].mean() / a[~cat].mean())


def test_mask_and_prediction(real_deit: nn.Module, chelsea_whole: tuple[Tensor, Tensor]) -> None:
    x, cat = chelsea_whole
    assert 0.6 < float(cat.float().mean()) < 0.9
    with torch.no_grad():
        assert int(real_deit(x).argmax()) == EGYPTIAN_CAT


def test_rollout_puts_more_mass_on_the_cat(real_deit: nn.Module, chelsea_whole: tuple[Tensor, Tensor]) -> None:
    x, cat = chelsea_whole
    # jacobgil's usual setting (max fusion, 90% discarded): measured ratio 1.27
    rollout = AttentionRollout(real_deit, head_fusion="max", discard_ratio=0.9).attribute(x)
    assert _density_ratio(rollout, cat) > 1.15
    # skipping the first layers (whose attention is mostly local) also favours the cat: 1.11
    late = AttentionRollout(real_deit, start_layer=4).attribute(x)
    assert _density_ratio(late, cat) > 1.05
    # class-specific Chefer relevance: 1.34
    chefer = GradientRollout(real_deit).attribute(x, target=EGYPTIAN_CAT)
    assert _density_ratio(chefer, cat) > 1.15


def test_chefer_maps_differ_between_targets(real_deit: nn.Module, chelsea_batch: Tensor) -> None:
    gr = GradientRollout(real_deit)
    maps = gr.attribute(chelsea_batch.expand(3, -1, -1, -1), target=[EGYPTIAN_CAT, TABBY, BULL_MASTIFF], return_patch_grid=True)
    assert isinstance(maps, Tensor)
    flat = maps.flatten(1)
    corr = torch.corrcoef(flat)
    assert corr[0, 1] < 0.95 and corr[0, 2] < 0.95
    assert (flat[0] - flat[1]).abs().max() > 0.1 * flat[0].abs().max()
    # a class-agnostic method gives the same map whatever the target
    raw = RawAttention(real_deit)
    torch.testing.assert_close(raw.attribute(chelsea_batch, target=EGYPTIAN_CAT), raw.attribute(chelsea_batch, target=TABBY))
