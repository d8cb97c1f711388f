"""The evaluation suite: registry, per-image values equal to the metric functions, bench_main.

The distributed and resume tests of the same machinery are in test_eval_cli.py."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DEIT_WEIGHTS, make_model, register_counting_method
from torch import Tensor, nn

from captum_vit import AttentionRollout
from captum_vit._eval_cli import bench_main
from captum_vit.evaluation import (
    METRICS,
    EvaluationTable,
    available_methods,
    evaluate,
    register_method,
)
from captum_vit.metrics import foreground_fraction, perturbation_curve, segmentation_scores

_FAMILY = "timm_deit_distilled"  # 64x64 inputs, 4x4 grid, 2 prefix tokens, 7 classes
_FAST = ["rollout_mean", "grad_rollout_chefer", "random"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(size: int, n_batches: int = 3, batch: int = 3) -> list[dict[str, Tensor]]:
    """Synthetic batches: images, labels (some unknown = -1), masks with an ignore band."""
    g = torch.Generator().manual_seed(0)
    data = []
    for b in range(n_batches):
        x = torch.randn(batch, 3, size, size, generator=g)
        m = (torch.rand(batch, size // 16, size // 16, generator=g) > 0.5).long() * 3
        m = m.repeat_interleave(16, 1).repeat_interleave(16, 2)  # whole 16x16 patches
        m[:, :, :2] = 255
        labels = torch.tensor([(b + i) % 7 if i != 1 else -1 for i in range(batch)])
        data.append({"image": x, "label": labels, "mask": m})
    return data


def _values(table: EvaluationTable) -> dict[tuple[str, str], tuple[float, int]]:
    return {
        (m, k): (table.value(m, k), table.count(m, k))
        for m in table.methods
        for k in METRICS
        if k != "seconds"
    }


def test_registry_lists_every_landed_method() -> None:
    names = available_methods()
    for n in ("raw_attention", "rollout_mean", "rollout_max", "rollout_min", "grad_rollout_chefer",
              "grad_rollout", "random"):
        assert n in names
    import captum_vit.attr as attr

    for cls, n in (("PatchOcclusion", "patch_occlusion"), ("SiftInterrelation", "sift"),
                   ("ViTGradCam", "vit_gradcam"), ("AttentionFlow", "attention_flow")):
        assert (n in names) == hasattr(attr, cls)
    with pytest.raises(ValueError, match="already registered"):
        register_method("random", lambda m, a, o: lambda x, t, i: x)


def test_table_equals_direct_metric_calls() -> None:
    """The suite's means are the plain metric functions averaged over samples."""
    model, size = make_model(_FAMILY)
    data = _dataset(size)
    table = evaluate(model, data, ["rollout_mean"], show_progress=False)
    x = torch.cat([d["image"] for d in data])
    labels = torch.cat([d["label"] for d in data])
    masks = torch.cat([d["mask"] for d in data])
    with torch.no_grad():
        pred = model(x).argmax(1)
    ref = torch.where(labels >= 0, labels, pred)
    grid = AttentionRollout(model).attribute(x, return_patch_grid=True)
    assert isinstance(grid, Tensor)
    _, pos = perturbation_curve(model, x, grid, pred, order="positive", labels=ref)
    _, neg = perturbation_curve(model, x, grid, pred, order="negative", labels=ref)
    assert table.value("rollout_mean", "auc_positive") == pytest.approx(pos.mean().item(), abs=1e-6)
    assert table.value("rollout_mean", "auc_negative") == pytest.approx(neg.mean().item(), abs=1e-6)
    assert table.value("rollout_mean", "auc_gap") == pytest.approx((neg - pos).mean().item(), abs=1e-6)
    up = torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    seg = segmentation_scores(up, masks)
    for k in ("pixel_accuracy", "miou", "map"):
        assert table.value("rollout_mean", k) == pytest.approx(seg[k].mean().item(), abs=1e-6)
    faf, _baf = foreground_fraction(grid, masks)
    assert table.value("rollout_mean", "faf") == pytest.approx(faf.mean().item(), abs=1e-6)
    assert table.count("rollout_mean", "auc_positive") == 9
    assert table.count("rollout_mean", "seconds") == 9
    assert len(table.image_ids) == 9
    # per image, not only on average
    gaps = table.values("rollout_mean", "auc_gap")
    order = sorted(range(9), key=str)  # rows are ordered by image id ("0", "1", ..., "8")
    assert np.allclose(gaps, (neg - pos)[order].numpy(), atol=1e-6)


def test_oracle_method_scores_perfectly_and_random_is_chance() -> None:
    """A method that returns the ground-truth mask itself gets perfect localisation."""
    model, size = make_model(_FAMILY)
    data = _dataset(size)
    masks_by_index = torch.cat([d["mask"] for d in data])

    def oracle(m: nn.Module, a: Any, o: Any) -> Any:
        def run(x: Tensor, t: Tensor, idx: Tensor) -> Tensor:
            fg = (masks_by_index[idx] == 3).float()[:, None]
            return torch.nn.functional.avg_pool2d(fg, 16)  # the 4x4 patch grid

        return run

    register_method("_test_oracle", oracle, overwrite=True)
    table = evaluate(model, data, ["_test_oracle", "random"], perturbation=False, show_progress=False)
    assert table.value("_test_oracle", "faf") == pytest.approx(1.0)
    assert table.value("_test_oracle", "baf") == pytest.approx(0.0)
    assert table.value("_test_oracle", "pointing") == pytest.approx(1.0)
    # bilinear upsampling blurs the patch edges, so pixel scores are high, not perfect
    assert table.value("_test_oracle", "map") > 0.8
    assert table.count("random", "auc_positive") == 0  # perturbation off
    assert math.isnan(table.value("random", "auc_positive"))
    rows = {(r["method"], r["metric"]): r for r in table.summary()}
    assert rows["_test_oracle", "faf"]["mean"] == pytest.approx(1.0)
    assert rows["_test_oracle", "pointing"]["mean"] == pytest.approx(100.0)  # percent in the summary
    assert rows["_test_oracle", "pointing"]["ci_low"] == pytest.approx(100.0)
    md = table.to_markdown()
    assert md.count("\n") == 2 + 2 and "| _test_oracle |" in md


def test_random_baseline_is_reproducible_per_sample() -> None:
    model, size = make_model(_FAMILY)
    data = _dataset(size)
    a = evaluate(model, data, ["random"], show_progress=False)
    # a different batching of the same samples gives the same totals
    x = torch.cat([d["image"] for d in data])
    labels = torch.cat([d["label"] for d in data])
    masks = torch.cat([d["mask"] for d in data])
    rebatched = [{"image": x[i : i + 2], "label": labels[i : i + 2], "mask": masks[i : i + 2]} for i in range(0, 9, 2)]
    b = evaluate(model, rebatched, ["random"], show_progress=False)
    for key, (s, n) in _values(a).items():
        assert _values(b)[key][1] == n and _values(b)[key][0] == pytest.approx(s, abs=1e-9)


def test_library_resume_skips_done_images_and_gives_the_same_table(tmp_path: Path) -> None:
    model, size = make_model(_FAMILY)
    data = _dataset(size, n_batches=3)
    full = evaluate(model, data, _FAST, show_progress=False)
    calls = register_counting_method("_test_counting", size // 16)
    out = tmp_path / "rows"
    evaluate(model, data[:2], [*_FAST, "_test_counting"], out=out, show_progress=False)  # "killed" after 2 batches
    with pytest.raises(ValueError, match="resume=True"):
        evaluate(model, data, _FAST, out=out, show_progress=False)
    calls.clear()
    resumed = evaluate(model, data, [*_FAST, "_test_counting"], out=out, resume=True, show_progress=False)
    assert calls == [3]  # only the third batch was explained again
    assert _values(EvaluationTable.from_rows(resumed.records, _FAST)) == _values(full)
    assert resumed.summary(seed=2)[0] == EvaluationTable.load(out).summary(seed=2)[0]


def test_batches_keyword_and_deprecated_data_alias() -> None:
    """DESIGN's ``evaluate(model, batches, methods=...)``: ``batches=`` works, ``data=`` warns once
    and gives the same rows, both or neither is one TypeError."""
    import warnings

    model, size = make_model(_FAMILY)
    data = _dataset(size, n_batches=2, batch=2)
    positional = evaluate(model, data, ["rollout_mean", "random"], show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        keyword = evaluate(model, batches=data, methods=["rollout_mean", "random"], show_progress=False)
    with pytest.warns(DeprecationWarning, match=r"evaluate\(data=\.\.\.\) is deprecated, use batches=") as caught:
        old = evaluate(model, data=data, methods=["rollout_mean", "random"], show_progress=False)
    assert len([w for w in caught if issubclass(w.category, DeprecationWarning)]) == 1
    assert caught[0].filename == __file__  # points at the caller
    def rows(table: EvaluationTable) -> list[dict[str, Any]]:  # every untimed value, NaN as None
        return [
            {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()
             if k not in ("seconds", "forward_seconds")}
            for r in table.records
        ]

    for table in (keyword, old):
        assert rows(table) == rows(positional) and len(rows(table)) == 2 * 4
    with pytest.raises(TypeError, match="both 'batches' and its deprecated alias 'data'"):
        evaluate(model, data, ["random"], data=data, show_progress=False)
    with pytest.raises(TypeError, match="missing required argument 'batches'"):
        evaluate(model, methods=["random"], show_progress=False)


def test_bad_inputs() -> None:
    model, size = make_model(_FAMILY)
    with pytest.raises(ValueError, match="unknown or unavailable"):
        evaluate(model, _dataset(size), ["no_such_method"], show_progress=False)
    with pytest.raises(TypeError, match="each batch"):
        evaluate(model, ["not a batch"], ["random"], show_progress=False)
    with pytest.raises(ValueError, match="no methods"):
        evaluate(model, _dataset(size), [], show_progress=False)
    with pytest.raises(SystemExit):
        bench_main(["--eval", "--speed"])


@pytest.mark.real_model
@pytest.mark.skipif(not DEIT_WEIGHTS.exists(), reason="real DeiT-Tiny weights not available")
def test_bench_main_eval_on_small_folders(tmp_path: Path) -> None:
    """The CLI entry point end to end on two generated images and one mask."""
    from PIL import Image

    rng = np.random.RandomState(0)
    inet = tmp_path / "inet"
    voc = tmp_path / "voc"
    inet.mkdir()
    voc.mkdir()
    for i in range(2):
        Image.fromarray(rng.randint(0, 255, (260, 300, 3), dtype=np.uint8)).save(inet / f"{i}.png")
    (inet / "labels.csv").write_text("file,class_index,synset\n0.png,3,x\n1.png,5,y\n")
    Image.fromarray(rng.randint(0, 255, (200, 240, 3), dtype=np.uint8)).save(voc / "a_image.png")
    mask = np.zeros((200, 240), dtype=np.uint8)
    mask[50:150, 60:180] = 12
    mask[48:50, 60:180] = 255
    Image.fromarray(mask).save(voc / "a_mask.png")
    (voc / "index.csv").write_text("id,image,mask,classes\n0,a_image.png,a_mask.png,dog\n")
    out = tmp_path / "out"
    rc = bench_main([
        "--eval", "--imagenet", str(inet), "--voc", str(voc), "--methods", "rollout_mean,random",
        "--out", str(out), "--name", "t", "--no-progress", "--threads", "1", "--format", "parquet",
    ])
    assert rc == 0
    rows = list(csv.DictReader((out / "t.csv").open()))
    assert [r["method"] for r in rows if r["metric"] == "auc_positive"] == ["rollout_mean", "random"]
    n = {(r["method"], r["metric"]): r["n"] for r in rows}
    assert n["rollout_mean", "auc_positive"] == "2" and n["rollout_mean", "pointing"] == "1"
    assert ("rollout_mean", "faf") in n
    text = (out / "t.md").read_text()
    assert "captum-vit bench --eval" in text and "| rollout_mean |" in text
    shards = list(csv.DictReader((out / "t_rows" / "rows-00000.csv").open()))
    assert sorted({r["image_id"] for r in shards}) == ["imagenet/0.png", "imagenet/1.png", "voc/a_image.png"]
    # --format parquet: the part holds both folders' rows (written after each, the last one complete)
    frame = pd.read_parquet(out / "t_rows" / "rows.parquet")
    assert len(frame) == len(shards) == 3 * 2
    assert sorted(set(frame["image_id"])) == ["imagenet/0.png", "imagenet/1.png", "voc/a_image.png"]
