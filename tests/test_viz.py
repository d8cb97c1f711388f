"""captum_vit.viz: overlays, layer grids, most focused layers, statistics (known answers)."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from captum_vit.viz import (
    DIVERGING_CMAP,
    SEQUENTIAL_CMAP,
    attribution_to_map,
    choose_cmap,
    image_to_array,
    is_signed,
    layer_grid,
    layer_head_grid,
    most_focused_layers,
    normalize_map,
    overlay,
    overlay_array,
    plot_most_focused,
    rollout_statistics,
)

matplotlib.use("Agg")


def _png_size(fig: Figure, dpi: int = 50) -> tuple[int, int]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return Image.open(io.BytesIO(buf.getvalue())).size


def test_normalize_map_known_answers() -> None:
    v = np.array([[1.0, 3.0], [5.0, 9.0]])
    np.testing.assert_allclose(normalize_map(v), [[0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(normalize_map(np.full((2, 2), 4.0)), np.zeros((2, 2)))
    signed = np.array([-2.0, 0.0, 2.0])
    np.testing.assert_allclose(normalize_map(signed), [0, 0.5, 1])
    # percentile: one outlier is clipped to the 75th percentile before min-max
    w = np.array([0.0, 1.0, 2.0, 3.0, 100.0])
    hi = np.percentile(w, 75)  # 3.0
    np.testing.assert_allclose(normalize_map(w, "percentile", (0, 75)), np.clip(w, 0, hi) / hi)
    with pytest.raises(ValueError, match="normalize"):
        normalize_map(v, "zscore")
    with pytest.raises(ValueError, match="percentiles"):
        normalize_map(v, "percentile", (90, 10))


def test_attribution_and_image_conversion() -> None:
    grid = torch.arange(4.0).reshape(1, 1, 2, 2)
    np.testing.assert_array_equal(attribution_to_map(grid), [[0, 1], [2, 3]])
    np.testing.assert_array_equal(attribution_to_map((grid[0],)), [[0, 1], [2, 3]])
    three = torch.stack([torch.zeros(2, 2), torch.ones(2, 2), 2 * torch.ones(2, 2)])
    np.testing.assert_array_equal(attribution_to_map(three), np.ones((2, 2)))
    with pytest.raises(ValueError, match="batch of 2"):
        attribution_to_map(torch.zeros(2, 3, 4, 4))
    with pytest.raises(TypeError):
        attribution_to_map([[1.0]])
    u8 = np.full((3, 4, 3), 255, dtype=np.uint8)
    np.testing.assert_array_equal(image_to_array(u8), np.ones((3, 4, 3)))
    chw = torch.full((3, 5, 6), 0.5)
    assert image_to_array(chw).shape == (5, 6, 3)
    assert image_to_array(Image.new("L", (6, 5), 255)).shape == (5, 6, 3)
    with pytest.raises(ValueError, match="normalised"):
        image_to_array(torch.randn(3, 8, 8) * 3)


def test_overlay_array_blends_the_colormap() -> None:
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[..., 1] = 100
    attr = torch.tensor([[0.0, 1.0], [2.0, 4.0]])[None]  # (1, 2, 2) patch grid
    # alpha = 0: the image itself
    np.testing.assert_array_equal(overlay_array(image, attr, alpha=0.0), image)
    # alpha = 1, nearest upsampling: each 2x2 block is the colour of its normalised value
    out = overlay_array(image, attr, alpha=1.0, cmap="viridis", upsample="nearest")
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    cmap = colormaps["viridis"]
    for (r, c), value in {(0, 0): 0.0, (0, 3): 0.25, (3, 0): 0.5, (3, 3): 1.0}.items():
        expected = np.round(np.array(cmap(value)[:3]) * 255)
        np.testing.assert_allclose(out[r, c], expected, atol=1)
    # alpha = 0.5 mixes both
    half = overlay_array(image, attr, alpha=0.5, cmap="viridis", upsample="nearest")
    mix = 0.5 * np.array([0, 100, 0]) / 255 + 0.5 * np.array(cmap(1.0)[:3])
    np.testing.assert_allclose(half[3, 3], np.round(mix * 255), atol=1)
    with pytest.raises(ValueError, match="alpha"):
        overlay_array(image, attr, alpha=1.5)
    with pytest.raises(ValueError, match="upsample"):
        overlay_array(image, attr, upsample="area")
    with pytest.raises(ValueError, match="blur_sigma"):
        overlay_array(image, attr, blur_sigma=-1)


def test_overlay_blur_matches_scipy() -> None:
    from scipy.ndimage import gaussian_filter

    heat = np.zeros((16, 16))
    heat[8, 8] = 1.0
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    out = overlay_array(image, heat, alpha=1.0, blur_sigma=2.0, cmap="gray")
    expected = normalize_map(gaussian_filter(heat, 2.0, mode="nearest"))
    np.testing.assert_allclose(out[..., 0] / 255, expected, atol=1 / 255 + 1e-9)
    assert out[8, 8, 0] == 255 and 0 < out[8, 11, 0] < 255  # spread to the neighbourhood


def test_overlay_figure_and_no_pyplot_state() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    attr = torch.rand(3, 20, 40)
    fig = overlay(image, attr, blur_sigma=1.0, title="t")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2  # image + colour bar
    assert fig.axes[0].get_title() == "t"
    assert "raw" in fig.axes[1].get_ylabel()
    bar = fig.axes[1]
    ticks = [float(t.get_text().replace("−", "-")) for t in bar.get_yticklabels()]
    from scipy.ndimage import gaussian_filter

    shown_raw = gaussian_filter(attr.mean(0).double().numpy(), 1.0, mode="nearest")  # as drawn
    assert ticks[0] == pytest.approx(shown_raw.min(), rel=1e-2) and ticks[-1] == pytest.approx(shown_raw.max(), rel=1e-2)
    shown = fig.axes[0].get_images()[0].get_array()
    assert shown.shape == (20, 40, 3)
    w, h = _png_size(fig)
    assert w > h  # wide image -> wide figure
    no_bar = overlay(image, attr, colorbar=False)
    assert len(no_bar.axes) == 1
    # drawing on a given Axes returns its figure
    host = Figure()
    ax = host.add_subplot()
    assert overlay(image, attr, ax=ax, colorbar=False) is host
    assert plt.get_fignums() == before


def _maps(num_layers: int = 4, heads: int = 2, grid: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(num_layers, heads, grid, grid)


def test_layer_grids_panels() -> None:
    image = np.zeros((12, 12, 3), dtype=np.uint8)
    fig = layer_grid(image, _maps(12), layers=(0, 5, -1))
    assert [a.get_title() for a in fig.axes] == ["layer 0", "layer 5", "layer 11"]
    default = layer_grid(image, _maps(12)[None])  # a batch of one is accepted
    assert [a.get_title() for a in default.axes] == ["layer 0", "layer 5", "layer 11"]
    grid = layer_head_grid(image, _maps(3, 2))
    assert len(grid.axes) == 6
    assert grid.axes[0].get_title() == "head 0" and grid.axes[2].get_ylabel() == "layer 1"
    with pytest.raises(ValueError, match="out of range"):
        layer_grid(image, _maps(4), layers=(4,))
    with pytest.raises(ValueError, match="batch"):
        layer_grid(image, torch.rand(2, 4, 2, 3, 3))
    with pytest.raises(ValueError, match="maps must be"):
        layer_grid(image, torch.rand(3, 3))


def test_most_focused_layers_known_answers() -> None:
    maps = torch.ones(3, 2, 2, 2)  # layer 0: uniform
    maps[1] = 0.0
    maps[1, :, 0, 0] = 1.0  # layer 1: all mass on patch (0, 0)
    maps[2] = torch.tensor([[3.0, 1.0], [0.0, 0.0]])  # layer 2: 3/4 and 1/4
    top, scores = most_focused_layers(maps, k=3)
    # concentration 1 - H/log(4)
    h2 = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)) / np.log(4)
    np.testing.assert_allclose(scores.numpy(), [0.0, 1.0, 1 - h2], atol=1e-6)
    assert top.tolist() == [1, 2, 0]
    # with a mask on the right column (patch grid): mass 1/2, 0, 1/4
    mask = torch.tensor([[0, 1], [0, 1]])
    top, scores = most_focused_layers(maps, mask=mask, k=2)
    np.testing.assert_allclose(scores.numpy(), [0.5, 0.0, 0.25], atol=1e-6)
    assert top.tolist() == [0, 2]
    # an image-size mask is pooled to the grid: top-left patch 3/4 covered -> in (>= 0.5)
    pixel_mask = np.zeros((4, 4), dtype=bool)
    pixel_mask[0, 0:2] = True
    pixel_mask[1, 0] = True
    _, scores = most_focused_layers(maps, mask=pixel_mask, k=1)
    np.testing.assert_allclose(scores.numpy(), [0.25, 1.0, 0.75], atol=1e-6)
    with pytest.raises(ValueError, match="k must"):
        most_focused_layers(maps, k=4)
    fig = plot_most_focused(np.zeros((8, 8, 3), dtype=np.uint8), maps, k=2)
    assert fig.axes[0].get_title().startswith("layer 1\nconcentration 1.000")


def test_rollout_statistics_known_answer() -> None:
    attr = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]], [[[-1.0, 0.0], [0.0, 1.0]]]])
    stats = rollout_statistics((attr,))
    assert stats["max"].tolist() == [6.0, 1.0]
    assert stats["min"].tolist() == [1.0, -1.0]
    assert stats["mean"].tolist() == [3.0, 0.0]
    with pytest.raises(TypeError):
        rollout_statistics(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="batched"):
        rollout_statistics(torch.zeros(3))


def test_plot_masking_sweep_draws_actual_ratios() -> None:
    from captum_vit import MaskingSweepResult
    from captum_vit.viz import plot_masking_sweep

    result = MaskingSweepResult(
        strategies=["random", "center"],
        ratios=[0.3, 0.6],
        actual_ratio=torch.tensor([[0.3, 0.6], [0.25, 0.5625]]),
        agreement=torch.tensor([[0.9, 0.5], [0.8, 0.4]]),
        accuracy=None,
        clean_accuracy=None,
        num_images=4,
        replacement="zero",
    )
    fig = plot_masking_sweep(result)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["random", "center"]
    np.testing.assert_allclose(lines[1].get_xdata(), [0.25, 0.5625])
    np.testing.assert_allclose(lines[1].get_ydata(), [0.8, 0.4])
    with pytest.raises(ValueError, match="labels"):
        plot_masking_sweep(result, "accuracy")
    with pytest.raises(ValueError, match="metric"):
        plot_masking_sweep(result, "auc")


def test_colormap_choice_signed_and_non_negative() -> None:
    signed = np.array([[-1.0, 0.0], [0.5, 2.0]])
    positive = np.array([[0.0, 1.0], [2.0, 3.0]])
    assert is_signed(signed) and not is_signed(positive)
    assert not is_signed(np.array([-1e-9, 1.0]))  # numerical noise is not a sign
    assert not is_signed(np.zeros(3))
    assert choose_cmap(signed) == (DIVERGING_CMAP, True)
    assert choose_cmap(positive) == (SEQUENTIAL_CMAP, False)
    assert choose_cmap(signed, "viridis") == ("viridis", True)  # override keeps the centring
    assert choose_cmap(signed, signed=False) == (SEQUENTIAL_CMAP, False)
    with pytest.raises(ValueError, match="colormap"):
        choose_cmap(positive, "no-such-map")


def test_signed_scaling_is_centred_at_zero() -> None:
    v = np.array([-1.0, 0.0, 0.5, 2.0])
    # zero -> 0.5 (white of the diverging map), ±max|v| -> 0 / 1
    np.testing.assert_allclose(normalize_map(v, signed=True), [0.25, 0.5, 0.625, 1.0])
    w = np.array([-4.0, -1.0, 0.0, 1.0, 2.0])
    hi = np.percentile(np.abs(w), 75)  # 2.0
    np.testing.assert_allclose(normalize_map(w, "percentile", (0, 75), signed=True), 0.5 + 0.5 * np.clip(w / hi, -1, 1))
    # rank keeps the sign: |v| ranks 0, 1/4, 2/4, 3/4, 1 for 0, 1, 1, 2, 4 (ties averaged)
    np.testing.assert_allclose(normalize_map(w, "rank", signed=True), [0.0, 0.5 - 0.5 * 0.375, 0.5, 0.5 + 0.5 * 0.375, 0.5 + 0.5 * 0.75])
    np.testing.assert_array_equal(normalize_map(np.zeros(3), signed=True), [0.5, 0.5, 0.5])
    # the overlay of a signed map: zero gets the diverging map's centre colour
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    out = overlay_array(image, np.array([[-1.0, 0.0], [1.0, 1.0]]), alpha=1.0, upsample="nearest")
    centre = np.round(np.array(colormaps[DIVERGING_CMAP](0.5)[:3]) * 255)
    np.testing.assert_allclose(out[0, 1], centre, atol=1)
    np.testing.assert_allclose(out[0, 0], np.round(np.array(colormaps[DIVERGING_CMAP](0.0)[:3]) * 255), atol=1)


def test_rank_and_auto_scaling() -> None:
    v = np.array([1.0, 3.0, 2.0, 10.0])
    np.testing.assert_allclose(normalize_map(v, "rank"), [0.0, 2 / 3, 1 / 3, 1.0])
    # scores crowded near the top (as SIFT's): min-max puts the median at 0.9 -> auto = rank
    crowded = np.array([0.0, 0.9, 0.92, 0.95, 1.0])
    np.testing.assert_allclose(normalize_map(crowded, "auto"), normalize_map(crowded, "rank"))
    # a peaked map (as rollout's): the median sits low -> auto = min-max
    peaked = np.array([0.0, 0.05, 0.1, 0.1, 1.0])
    np.testing.assert_allclose(normalize_map(peaked, "auto"), normalize_map(peaked, "minmax"))
    # signed maps: auto = symmetric min-max
    np.testing.assert_allclose(normalize_map(np.array([-2.0, 1.0]), "auto", signed=True), [0.0, 0.75])


def test_colour_bar_ticks_in_raw_units() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    signed = np.array([[-2.0, 0.0], [1.0, 0.5]])
    fig = overlay(image, signed, upsample="nearest")
    labels = [t.get_text().replace("−", "-") for t in fig.axes[1].get_yticklabels()]
    assert labels == ["-2", "-1", "0", "1", "2"]  # symmetric about zero
    assert "0 centred" in fig.axes[1].get_ylabel()
    crowded = np.array([[0.0, 0.9], [0.95, 1.0]])
    fig = overlay(image, crowded, upsample="nearest")
    assert "rank" in fig.axes[1].get_ylabel()
    labels = [float(t.get_text()) for t in fig.axes[1].get_yticklabels()]
    np.testing.assert_allclose(labels, np.quantile(crowded, [0, 0.25, 0.5, 0.75, 1.0]), rtol=1e-2)


def test_bilinear_upsampling_is_smooth_nearest_keeps_patches() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    grid = np.array([[0.0, 1.0], [0.0, 1.0]])
    nearest = overlay_array(image, grid, alpha=1.0, cmap="gray", upsample="nearest")[..., 0]
    smooth = overlay_array(image, grid, alpha=1.0, cmap="gray", upsample="bilinear")[..., 0]
    assert len(np.unique(nearest[0])) == 2  # two flat patches
    assert len(np.unique(smooth[0])) > 2 and np.all(np.diff(smooth[0].astype(int)) >= 0)  # a ramp
