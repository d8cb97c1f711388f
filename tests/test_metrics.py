"""Known-answer tests of captum_vit.metrics on hand-made maps and masks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model
from torch import Tensor

from captum_vit import adapt
from captum_vit._token_masking import masked_forward
from captum_vit.metrics import (
    DEFAULT_FRACTIONS,
    align_mask,
    foreground_fraction,
    perturbation_curve,
    pointing_game,
    removal_masks,
    segmentation_scores,
    trapezoid_auc,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- FAF / BAF
def test_foreground_fraction_hand_computed() -> None:
    grid = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, :2, :] = 7  # top row of patches is foreground (label 7)
    faf, baf = foreground_fraction(grid, mask)
    assert faf.item() == pytest.approx(3 / 10)
    assert baf.item() == pytest.approx(7 / 10)


def test_foreground_fraction_threshold_and_ignore() -> None:
    grid = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2)
    mask = torch.zeros(1, 4, 4, dtype=torch.uint8)
    mask[0, 0, 0:2] = 1  # top-left patch: 2 of 4 pixels foreground
    mask[0, 0:2, 2:4] = 255  # top-right patch: all ignored -> background
    mask[0, 2, 0] = 1  # bottom-left: 1 of 4
    mask[0, 3, 2:4] = 255
    mask[0, 2, 2] = 1  # bottom-right: 1 fg of 2 valid pixels -> 0.5
    faf, _ = foreground_fraction(grid, mask, threshold=0.5)
    assert faf.item() == pytest.approx((1 + 4) / 10)
    faf, _ = foreground_fraction(grid, mask, threshold=0.75)
    assert faf.item() == pytest.approx(0.0)
    faf, _ = foreground_fraction(grid, mask, threshold=0.25)
    assert faf.item() == pytest.approx((1 + 3 + 4) / 10)


def test_foreground_fraction_pixel_maps_and_negatives() -> None:
    grid = torch.tensor([[[1.0, -5.0], [3.0, 4.0]]])
    pixels = grid.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand(-1, 3, -1, -1)
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    mask[..., :8, :] = True
    faf, baf = foreground_fraction(pixels, mask, patch_size=8)
    assert faf.item() == pytest.approx(1 / 8)  # negative attribution counts as 0
    assert baf.item() == pytest.approx(7 / 8)
    faf0, _ = foreground_fraction(torch.zeros(1, 2, 2), mask)
    assert math.isnan(faf0.item())


def test_foreground_fraction_batch_equals_single() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 1, 7, 7, generator=g)
    masks = torch.rand(3, 50, 60, generator=g) > 0.6
    faf, baf = foreground_fraction(maps, masks)
    for i in range(3):
        f1, b1 = foreground_fraction(maps[i : i + 1], masks[i : i + 1])
        assert torch.allclose(faf[i : i + 1], f1) and torch.allclose(baf[i : i + 1], b1)


def test_foreground_fraction_refuses_pixel_maps_without_patch_size() -> None:
    """A pixel-level map is never silently taken for a patch grid (one pixel = one patch)."""
    grid = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    mask = torch.zeros(1, 16, 16, dtype=torch.long)
    mask[0, :8, :] = 1  # top row of patches
    mask[0, 8, :] = 1  # plus one pixel row: bottom patches are 1/8 foreground
    pixels = grid.repeat_interleave(8, 2).repeat_interleave(8, 3)  # (1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"3 channels.*return_patch_grid=True.*patch_size="):
        foreground_fraction(pixels.expand(-1, 3, -1, -1), mask)
    with pytest.raises(ValueError, match=r"masks' resolution.*return_patch_grid=True.*patch_size="):
        foreground_fraction(pixels, mask)
    with pytest.raises(ValueError, match="masks' resolution"):
        foreground_fraction(pixels[:, 0], mask[:, None])
    faf, _ = foreground_fraction(grid, mask)
    assert faf.item() == pytest.approx(3 / 10)
    for a in (pixels, pixels.expand(-1, 3, -1, -1), pixels[:, 0]):
        f, _ = foreground_fraction(a, mask, patch_size=8)
        assert f.item() == pytest.approx(3 / 10)
    # patch_size=1: every value is a patch (a grid whose masks are at grid resolution)
    f1, _ = foreground_fraction(pixels, mask, patch_size=1)
    assert f1.item() == pytest.approx((8 * 8 * 1 + 8 * 8 * 2 + 8 * 3 + 8 * 4) / (64 * 10))


def test_foreground_fraction_of_a_method_map_needs_the_grid_or_patch_size() -> None:
    """The audit's case: a rollout map at the input size gives the grid's FAF only with
    patch_size; without it, one clear error (it gave a per-pixel FAF before)."""
    from captum_vit import AttentionRollout

    model, size = make_model("hf_vit")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    method = AttentionRollout(model)
    grid = method.attribute(x, return_patch_grid=True)
    pixels = method.attribute(x)
    assert isinstance(grid, Tensor) and isinstance(pixels, Tensor)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = ((yy - size / 3) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).expand(2, -1, -1)
    faf_grid, _ = foreground_fraction(grid, masks)
    patch = adapt(model).patch_size
    faf_px, _ = foreground_fraction(pixels, masks, patch_size=patch)
    torch.testing.assert_close(faf_px, faf_grid)
    with pytest.raises(ValueError, match="return_patch_grid=True"):
        foreground_fraction(pixels, masks)
    with pytest.raises(ValueError, match="return_patch_grid=True"):
        foreground_fraction(pixels[:, :1], masks)


# ---------------------------------------------------------------------- segmentation
def _disk_mask(size: int = 32) -> Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((yy - 12) ** 2 + (xx - 18) ** 2) < 60).unsqueeze(0)


def test_segmentation_perfect_worst_and_chance() -> None:
    mask = _disk_mask()
    rate = mask.float().mean().item()
    perfect = segmentation_scores(mask.float()[:, None] * 3 + 1, mask)
    for key in ("pixel_accuracy", "miou", "map"):
        assert perfect[key].item() == pytest.approx(1.0)
    worst = segmentation_scores((~mask).float(), mask)
    assert worst["pixel_accuracy"].item() == pytest.approx(0.0)
    assert worst["miou"].item() == pytest.approx(0.0)
    assert worst["map"].item() == pytest.approx(rate)  # every positive ranked last, tied
    const = segmentation_scores(torch.full((1, 32, 32), 0.3), mask)
    assert const["map"].item() == pytest.approx(rate)  # chance
    assert const["pixel_accuracy"].item() == pytest.approx(1 - rate)  # all background
    assert const["miou"].item() == pytest.approx((0 + (1 - rate)) / 2)


def test_segmentation_hand_computed_ap_iou_and_ignore() -> None:
    # four valid pixels: scores 0.9, 0.8, 0.7, 0.6 with labels 1, 0, 1, 0; one ignored
    attr = torch.tensor([[[0.9, 0.8, 0.7, 0.6, 5.0]]])
    mask = torch.tensor([[[1, 0, 1, 0, 255]]])
    s = segmentation_scores(attr, mask)
    assert s["map"].item() == pytest.approx((1.0 + 2 / 3) / 2)
    # threshold at the mean of the valid (normalised) scores: 0.9 and 0.8 are foreground
    assert s["pixel_accuracy"].item() == pytest.approx(0.5)
    # fg: pred {0,1} gt {0,2}: I=1, U=3; bg: pred {2,3} gt {1,3}: I=1, U=3
    assert s["miou"].item() == pytest.approx(1 / 3)


def test_segmentation_resizes_masks_and_batches() -> None:
    g = torch.Generator().manual_seed(1)
    attr = torch.rand(3, 3, 16, 16, generator=g)
    masks = (torch.rand(3, 8, 8, generator=g) > 0.5).long()
    big = masks.repeat_interleave(4, 1).repeat_interleave(4, 2)  # 32x32, same geometry
    a = segmentation_scores(attr, masks)
    b = segmentation_scores(attr, big)
    for key in a:
        assert torch.allclose(a[key], b[key])
        single = segmentation_scores(attr[1:2], masks[1:2])[key]
        assert torch.allclose(a[key][1:2], single)


# ---------------------------------------------------------------------- pointing game
def test_pointing_game_hits_misses_ties() -> None:
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 0, 0] = True
    attr = torch.zeros(2, 1, 4, 4)
    attr[0, 0, 0, 0] = 1.0  # hit
    attr[1, 0, 3, 3] = 1.0  # miss
    assert pointing_game(attr, mask).tolist() == [1.0, 0.0]
    assert pointing_game(attr, mask, tolerance=3).tolist() == [1.0, 1.0]
    const = pointing_game(torch.ones(1, 4, 4), mask[:1])
    assert const.item() == pytest.approx(1 / 16)  # chance: the foreground fraction


# ---------------------------------------------------------------------- mask alignment
def test_align_mask_matches_pil_pipeline() -> None:
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    m = (np.random.RandomState(0).rand(97, 130) * 21).astype(np.uint8)
    cfg = {"input_size": (3, 48, 48), "crop_pct": 0.9, "crop_mode": "center"}
    pil = TF.center_crop(
        TF.resize(Image.fromarray(m), math.floor(48 / 0.9), interpolation=InterpolationMode.NEAREST),
        [48, 48],
    )
    out = align_mask(torch.from_numpy(m), cfg)
    assert out.dtype == torch.uint8 and out.shape == (48, 48)
    assert torch.equal(out, torch.from_numpy(np.array(pil)))
    batch = align_mask(torch.from_numpy(m)[None, None].repeat(2, 1, 1, 1), 48, crop_pct=0.9)
    assert batch.shape == (2, 1, 48, 48) and torch.equal(batch[1, 0], out)


# ---------------------------------------------------------------------- AUC and orders
def test_trapezoid_auc_hand_computed() -> None:
    curve = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.5, 0.5, 0.5]])
    auc = trapezoid_auc(curve, [0.0, 0.1, 0.2, 0.3])
    assert auc.tolist() == pytest.approx([0.15, 0.075 + 0.05 + 0.05])


def test_removal_masks_orders() -> None:
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2, 0.0, 0.5, 0.9, 0.8, 0.7, 0.6]])
    pos = removal_masks(scores, [0.0, 0.2, 0.5], "positive")
    neg = removal_masks(scores, [0.0, 0.2, 0.5], "negative")
    assert not pos[0].any() and not neg[0].any()
    assert torch.nonzero(pos[1][0]).flatten().tolist() == [6, 7]
    assert torch.nonzero(neg[1][0]).flatten().tolist() == [0, 4]
    assert torch.nonzero(pos[2][0]).flatten().tolist() == [5, 6, 7, 8, 9]


def _reference_curve(adapter, x, grid_scores, order, fractions, replacement, metric):  # type: ignore[no-untyped-def]
    """Independent, one sample and one fraction at a time, Python sorting."""
    b, p = grid_scores.shape
    curves = torch.zeros(b, len(fractions))
    with torch.no_grad():
        for i in range(b):
            clean = adapter.forward(x[i : i + 1])
            t = int(clean.argmax())
            vals = grid_scores[i].tolist()
            idx = sorted(range(p), key=lambda j: (-vals[j] if order == "positive" else vals[j], j))
            for k, f in enumerate(fractions):
                mask = torch.zeros(1, p, dtype=torch.bool)
                mask[0, idx[: math.floor(f * p + 0.5)]] = True  # round half up, as mask_count
                out = masked_forward(adapter, x[i : i + 1], mask, replacement)
                if metric == "accuracy":
                    curves[i, k] = float(int(out.argmax()) == t)
                else:
                    curves[i, k] = out.softmax(-1)[0, t]
    return curves


@pytest.mark.parametrize(
    ("replacement", "metric", "order"),
    [("zero", "probability", "positive"), ("drop", "accuracy", "negative"), ("mean", "probability", "negative")],
)
def test_perturbation_curve_matches_reference(replacement: str, metric: str, order: str) -> None:
    model, size = make_model("timm_deit_distilled")
    adapter = adapt(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, size, size, generator=g)
    grid = torch.rand(3, 1, 4, 4, generator=g)
    curve, auc = perturbation_curve(
        model, x, grid, order=order, replacement=replacement, metric=metric, adapter=adapter, max_batch=7
    )
    ref = _reference_curve(adapter, x, grid.flatten(1), order, DEFAULT_FRACTIONS, replacement, metric)
    assert curve.shape == (3, 10) and auc.shape == (3,)
    assert torch.allclose(curve, ref, atol=1e-5)
    assert torch.allclose(auc, trapezoid_auc(ref, DEFAULT_FRACTIONS), atol=1e-5)
    # batch result i == single sample i; input-shaped maps give the same as grids
    pixels = grid.repeat_interleave(16, 2).repeat_interleave(16, 3).expand(-1, 3, -1, -1)
    c1, _ = perturbation_curve(model, x[1:2], pixels[1:2], order=order, replacement=replacement, metric=metric)
    assert torch.allclose(curve[1:2], c1, atol=1e-5)


def test_perturbation_curve_labels_and_known_answer() -> None:
    model, size = make_model("timm_vit")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    grid = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(4))
    curve, _ = perturbation_curve(model, x, grid, fractions=[0.0, 0.5])
    assert curve[:, 0].tolist() == [1.0, 1.0]  # nothing removed: the prediction itself
    with torch.no_grad():
        pred = model(x).argmax(1)
    wrong = (pred + 1) % 1000
    curve, _auc = perturbation_curve(model, x, grid, fractions=[0.0, 0.5], labels=wrong.tolist())
    assert curve[:, 0].tolist() == [0.0, 0.0]
    # a map whose ordering equals the model's own patch-removal effect is better than
    # its reverse: positive order of the map == negative order of the negated map
    cp, _ = perturbation_curve(model, x, grid, order="positive")
    cn, _ = perturbation_curve(model, x, -grid, order="negative")
    assert torch.equal(cp, cn)


def test_perturbation_curve_numpy_images_targets_and_labels_equal_tensors() -> None:
    model, size = make_model("timm_vit")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    grid = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        pred = model(x).argmax(1)
    labels = torch.tensor([int(pred[0]), (int(pred[1]) + 1) % 1000])
    for metric in ("accuracy", "probability"):
        ref, ref_auc = perturbation_curve(model, x, grid, pred, labels=labels, metric=metric)
        got, got_auc = perturbation_curve(model, x.double().numpy(), grid, pred.numpy(),
                                          labels=labels.numpy().reshape(2, 1), metric=metric)
        assert torch.equal(got, ref) and torch.equal(got_auc, ref_auc)
    with pytest.raises(TypeError, match="integers"):
        perturbation_curve(model, x, grid, labels=labels.numpy().astype(np.float32))


def test_metric_errors() -> None:
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="2 masks for 3"):
        segmentation_scores(torch.rand(3, 8, 8), mask)
    with pytest.raises(ValueError, match="shape"):
        foreground_fraction(torch.rand(2, 8), mask)
    with pytest.raises(ValueError, match="threshold"):
        foreground_fraction(torch.rand(2, 2, 2), mask, threshold=0.0)
    with pytest.raises(ValueError, match="NaN"):
        pointing_game(torch.full((2, 8, 8), float("nan")), mask)
    with pytest.raises(ValueError, match="divisible"):
        foreground_fraction(torch.rand(2, 3, 10, 10), mask, patch_size=4)
    with pytest.raises(TypeError):
        segmentation_scores([1, 2], mask)  # type: ignore[arg-type]
    model, size = make_model("timm_vit")
    x = torch.randn(1, 3, size, size)
    with pytest.raises(ValueError, match="order"):
        perturbation_curve(model, x, torch.rand(1, 1, 10, 10), order="up")
    with pytest.raises(ValueError, match="fractions"):
        perturbation_curve(model, x, torch.rand(1, 1, 10, 10), fractions=[0.5, 0.2])
    with pytest.raises(ValueError, match="replacement"):
        perturbation_curve(model, x, torch.rand(1, 1, 10, 10), replacement="blur")
    with pytest.raises(ValueError, match="2 attribution maps for 1"):
        perturbation_curve(model, x, torch.rand(2, 1, 10, 10))
    with pytest.raises(ValueError, match="metric"):
        perturbation_curve(model, x, torch.rand(1, 1, 10, 10), metric="loss")


# ---------------------------------------------------------------------- Mask R-CNN helper
def test_maskrcnn_foreground_masks_shapes_on_random_weights(tmp_path: Path) -> None:
    """Output shapes only (random local weights; no COCO checkpoint is downloaded)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    from captum_vit._maskrcnn import foreground_masks, load_maskrcnn

    torch.manual_seed(0)
    # torchvision's Mask R-CNN with a tiny random backbone (ResNet-50 would take 20 s to
    # initialise); foreground_masks only relies on the detector's output format.
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU())
    backbone.out_channels = 8  # type: ignore[assignment]
    detector = MaskRCNN(
        backbone, num_classes=3, min_size=64, max_size=64, box_score_thresh=0.0,
        box_detections_per_img=5,
        rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
    ).eval()
    images = torch.rand(2, 3, 48, 64)
    fg = foreground_masks(detector, images, score_threshold=0.0)
    assert fg.shape == (2, 48, 64) and fg.dtype == torch.bool
    none = foreground_masks(detector, images, score_threshold=1.0)
    assert not none.any()
    faf, _ = foreground_fraction(torch.rand(2, 1, 3, 4), fg | True)
    assert torch.allclose(faf, torch.ones(2))
    with pytest.raises(ValueError, match="different sizes"):
        foreground_masks(detector, [images[0], images[1, :, :32]])
    with pytest.raises(ValueError, match="eval mode"):
        foreground_masks(detector.train(), images)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_maskrcnn(tmp_path / "missing.pth")
