"""Parquet rows of the evaluation suite: the same rows as the CSV journal with proper
dtypes, whole parts after a killed run and its resume, one part per rank, and a clear
error up front without pyarrow (library ValueError / ImportError, CLI exit 2)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_model, register_counting_method
from PIL import Image
from torch import Tensor, nn

import captum_vit.evaluation as evaluation
from captum_vit._eval_io import parquet_files, parquet_part, read_shards, row_shard
from captum_vit.cli import main
from captum_vit.evaluation import METRICS, ROW_COLUMNS, EvaluationTable, evaluate, register_method

pytest.importorskip("pyarrow")

_FAMILY = "timm_deit_distilled"  # 64x64 inputs, 4x4 grid, 2 prefix tokens, 7 classes
_METHODS = ["rollout_mean", "random"]
_INTS = ["index", "label", "target", "rank"]
_FLOATS = [*METRICS, "forward_seconds"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(size: int, n_batches: int = 3, batch: int = 3) -> list[dict[str, Any]]:
    """Dict batches with zero-padded ids (a CSV reader takes "0003" for the number 3),
    unknown labels, one image per batch without a mask (NaN scores) and one skipped
    image in the first batch."""
    g = torch.Generator().manual_seed(0)
    data = []
    for b in range(n_batches):
        x = torch.randn(batch, 3, size, size, generator=g)
        m = (torch.rand(batch, size // 16, size // 16, generator=g) > 0.5).long() * 3
        m = m.repeat_interleave(16, 1).repeat_interleave(16, 2)
        data.append({
            "image": x, "label": torch.tensor([(b + i) % 7 if i != 1 else -1 for i in range(batch)]),
            "mask": m, "has_mask": torch.tensor([i != 2 for i in range(batch)]),
            "index": torch.arange(b * batch, (b + 1) * batch),
            "id": [f"{b * batch + i:04d}" for i in range(batch)],
            "errors": [("9999", "cannot read 9999.png")] if b == 0 else [],
        })
    return data


def _csv_rows(out: Path) -> pd.DataFrame:
    """Every CSV shard read with the column types spelled out (as a careful user would)."""
    dtypes = {"image_id": str, "method": str, **dict.fromkeys(_INTS, "int64"), **dict.fromkeys(_FLOATS, "float64")}
    return pd.concat([pd.read_csv(p, dtype=dtypes) for p in sorted(out.glob("rows-*.csv"))], ignore_index=True)


def _values(table: EvaluationTable) -> dict[tuple[str, str, str], float]:
    """Mean and count of every method and metric but the timing."""
    out = {}
    for m in table.methods:
        for k in METRICS:
            if k != "seconds":
                out[m, k, "mean"] = table.value(m, k)
                out[m, k, "n"] = float(table.count(m, k))
    return out


def _exact(d: dict[tuple[str, str, str], float]) -> Any:
    return pytest.approx(d, rel=0, abs=0, nan_ok=True)


def _no_timing(frame: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in frame.columns if c not in ("seconds", "forward_seconds")]
    return frame[keep].sort_values(["image_id", "method"]).reset_index(drop=True)


# ---------------------------------------------------------------------- same rows, proper dtypes
def test_parquet_rows_equal_the_csv_rows_with_proper_dtypes(tmp_path: Path) -> None:
    model, size = make_model(_FAMILY)
    out = tmp_path / "run"
    table = evaluate(model, _dataset(size), _METHODS, out=out, row_format="parquet", show_progress=False)
    assert [p.name for p in parquet_files(out)] == ["part-00000.parquet"]
    assert [p.name for p in parquet_files(out, "errors")] == ["part-00000.parquet"]
    assert not list(out.glob("**/.*"))  # no temporary file left behind
    rows = pd.read_parquet(out / "rows.parquet")
    assert list(rows.columns) == list(ROW_COLUMNS) and len(rows) == 9 * len(_METHODS)
    for c in _INTS:
        assert rows[c].dtype == np.int64, c
    for c in _FLOATS:
        assert rows[c].dtype == np.float64, c
    for c in ("image_id", "method"):
        assert pd.api.types.is_string_dtype(rows[c]), c
    assert sorted(set(rows["image_id"])) == [f"{i:04d}" for i in range(9)]  # strings, zeros kept
    assert pd.read_csv(row_shard(out, 0))["image_id"].dtype == np.int64  # what the CSV reader guesses
    # missing values: NaN in pandas (images without a mask), every other metric present
    no_mask = rows["image_id"].isin(["0002", "0005", "0008"])
    for k in ("pixel_accuracy", "miou", "map", "pointing", "faf", "baf"):
        assert rows.loc[no_mask, k].isna().all() and rows.loc[~no_mask, k].notna().all(), k
    assert rows[["auc_positive", "auc_negative", "auc_gap", "seconds"]].notna().all().all()
    assert (rows.loc[rows["image_id"] == "0001", "label"] == -1).all()
    # value for value, bit for bit, the CSV journal's rows, in the same order
    pd.testing.assert_frame_equal(rows, _csv_rows(out), check_dtype=False, check_exact=True)
    errors = pd.read_parquet(out / "errors.parquet")
    assert errors.to_dict("records") == [{"image_id": "9999", "reason": "cannot read 9999.png"}]
    # the table from the Parquet parts alone equals the table from the CSV journal
    only = tmp_path / "copied"
    only.mkdir()
    for kind in ("rows", "errors"):
        shutil.copytree(out / f"{kind}.parquet", only / f"{kind}.parquet")
    back = EvaluationTable.load(only)
    assert _values(back) == _exact(_values(table))
    assert back.summary(n_boot=200) == EvaluationTable.load(out).summary(n_boot=200)
    assert back.errors == table.errors == [{"image_id": "9999", "reason": "cannot read 9999.png"}]
    assert back.image_ids == table.image_ids


# ---------------------------------------------------------------------- kill, resume, atomic parts
def test_killed_run_then_resume_gives_every_row_exactly_once(tmp_path: Path) -> None:
    model, size = make_model(_FAMILY)
    data = _dataset(size)
    full = evaluate(model, data, _METHODS, show_progress=False)
    batches: list[int] = []

    def dies_on_third_batch(m: nn.Module, a: Any, o: Any) -> Any:
        def run(x: Tensor, t: Tensor, idx: Tensor) -> Tensor:
            batches.append(int(idx[0]))
            if len(batches) == 3:
                raise KeyboardInterrupt  # the job is killed while explaining batch 3
            return torch.ones(x.shape[0], 1, size // 16, size // 16)

        return run

    register_method("_test_dies", dies_on_third_batch, overwrite=True)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, data, [*_METHODS, "_test_dies"], out=out, row_format="parquet", show_progress=False)
    assert not parquet_files(out)  # killed before its part was done: only the journal ...
    assert len({r["image_id"] for r in read_shards(out)}) == 6  # ... which kept both finished batches
    with open(row_shard(out, 0), "ab") as fh:  # a batch written twice, then a torn line
        fh.write(row_shard(out, 0).read_bytes().splitlines(keepends=True)[1])
        fh.write(b"0007,7,random,1,3,0.5")
    register_method("_test_dies", lambda m, a, o: lambda x, t, i: torch.ones(x.shape[0], 1, 4, 4), overwrite=True)
    # a resume that finishes (here over the first batch alone, already done) writes the
    # part; from then on a CSV-only resume is refused (the part would fall behind)
    evaluate(model, data[:1], [*_METHODS, "_test_dies"], out=out, resume=True, row_format="parquet",
             show_progress=False)
    with pytest.raises(ValueError, match="row_format='parquet'"):
        evaluate(model, data, [*_METHODS, "_test_dies"], out=out, resume=True, show_progress=False)
    resumed = evaluate(model, data, [*_METHODS, "_test_dies"], out=out, resume=True, row_format="parquet",
                       show_progress=False)
    rows = pd.read_parquet(out / "rows.parquet")
    assert len(rows) == 9 * 3 and not rows.duplicated(["image_id", "method"]).any()
    assert sorted(set(rows["image_id"])) == [f"{i:04d}" for i in range(9)]
    csv_rows = _csv_rows(out)
    assert len(csv_rows) == 9 * 3 + 1  # the journal holds the duplicate, the Parquet part does not
    pd.testing.assert_frame_equal(rows, csv_rows.drop_duplicates(["image_id", "method"]).reset_index(drop=True),
                                  check_dtype=False, check_exact=True)
    assert len(pd.read_parquet(out / "errors.parquet")) == 1
    # the same numbers as the uninterrupted run
    mine = rows[rows["method"].isin(_METHODS)]
    ref = pd.DataFrame(full.records)[list(ROW_COLUMNS)]
    pd.testing.assert_frame_equal(_no_timing(mine), _no_timing(ref), check_dtype=False, check_exact=True)
    assert _values(EvaluationTable.from_rows(resumed.records, _METHODS)) == _exact(_values(full))


def test_a_failed_part_write_keeps_the_old_part_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    model, size = make_model(_FAMILY)
    data = _dataset(size)
    out = tmp_path / "run"
    evaluate(model, data[:1], ["random"], out=out, row_format="parquet", show_progress=False)
    before = parquet_part(out, 0).read_bytes()

    def disk_full(table: Any, where: Any, **kw: Any) -> None:
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full)
    with pytest.raises(OSError, match="No space"):
        evaluate(model, data, ["random"], out=out, resume=True, row_format="parquet", show_progress=False)
    assert parquet_part(out, 0).read_bytes() == before  # the last finished run's part, intact
    assert not list(out.glob("**/.*"))
    assert len(pd.read_parquet(out / "rows.parquet")) == 3
    monkeypatch.undo()
    evaluate(model, data, ["random"], out=out, resume=True, row_format="parquet", show_progress=False)
    assert len(pd.read_parquet(out / "rows.parquet")) == 9  # the next resume rewrites it


# ---------------------------------------------------------------------- one part per rank
def test_each_rank_writes_its_part_and_fewer_ranks_rewrite_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks (the process group simulated: rank and world size patched) write
    part-00000 and part-00001 from their shards; a resume with one process rewrites
    both, also the part of the rank it no longer has."""
    model, size = make_model(_FAMILY)
    data = _dataset(size)
    single = tmp_path / "single"
    evaluate(model, data, _METHODS, out=single, row_format="parquet", show_progress=False)
    two = tmp_path / "two"
    monkeypatch.setattr(evaluation, "_barrier", lambda: None)
    for rank in (0, 1):
        monkeypatch.setattr(evaluation, "_dist_info", lambda r=rank: (r, 2))
        evaluate(model, data, _METHODS, out=two, resume=rank == 1, row_format="parquet", show_progress=False)
    assert [p.name for p in parquet_files(two)] == ["part-00000.parquet", "part-00001.parquet"]
    for rank, images in ((0, 6), (1, 3)):  # batches 0 and 2, batch 1
        part = pd.read_parquet(parquet_part(two, rank))
        assert (part["rank"] == rank).all() and len(part) == images * len(_METHODS)
    assert len(pd.read_parquet(parquet_part(two, 0, "errors"))) == 1  # batch 0's skipped image
    assert len(pd.read_parquet(parquet_part(two, 1, "errors"))) == 0
    rows = pd.read_parquet(two / "rows.parquet")
    pd.testing.assert_frame_equal(_no_timing(rows.drop(columns="rank")),
                                  _no_timing(pd.read_parquet(single / "rows.parquet").drop(columns="rank")),
                                  check_exact=True)
    # rank 1 was killed before its part was written; the resume runs with one process
    parquet_part(two, 1).unlink()
    monkeypatch.setattr(evaluation, "_dist_info", lambda: (0, 1))
    evaluate(model, data, _METHODS, out=two, resume=True, row_format="parquet", show_progress=False)
    assert [p.name for p in parquet_files(two)] == ["part-00000.parquet", "part-00001.parquet"]
    assert len(pd.read_parquet(two / "rows.parquet")) == 9 * len(_METHODS)


# ---------------------------------------------------------------------- bad input, no pyarrow
def _hide_pyarrow(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # `import pyarrow` raises ImportError


def test_library_refuses_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, size = make_model(_FAMILY)
    data = _dataset(size, n_batches=1)
    with pytest.raises(ValueError, match="row_format must be one of csv, parquet, got 'xlsx'"):
        evaluate(model, data, ["random"], out=tmp_path / "a", row_format="xlsx", show_progress=False)
    with pytest.raises(ValueError, match="needs out="):
        evaluate(model, data, ["random"], row_format="parquet", show_progress=False)
    pq_only = tmp_path / "pq"
    evaluate(model, data, ["random"], out=tmp_path / "a", row_format="parquet", show_progress=False)
    shutil.copytree(tmp_path / "a" / "rows.parquet", pq_only / "rows.parquet")
    calls = register_counting_method("_test_calls", size // 16)
    _hide_pyarrow(monkeypatch)
    with pytest.raises(ImportError, match=r"row_format='parquet' needs pyarrow, which is not installed: pip install 'captum-vit\[parquet\]'"):
        evaluate(model, data, ["_test_calls"], out=tmp_path / "b", row_format="parquet", show_progress=False)
    assert not calls and not (tmp_path / "b").exists()  # nothing ran, nothing written
    with pytest.raises(ImportError, match="reading Parquet rows needs pyarrow"):
        EvaluationTable.load(pq_only)
    # CSV rows need no pyarrow, nor does reading a folder that has the CSV journal
    table = evaluate(model, data, ["_test_calls"], out=tmp_path / "c", show_progress=False)
    assert calls == [3] and table.count("_test_calls", "auc_gap") == 3
    assert EvaluationTable.load(tmp_path / "a").count("random", "auc_gap") == 3


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """timm's tiny ``test_vit`` as a local weights file and a labels.csv folder of 5 images."""
    import safetensors.torch
    import timm

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("pq")
    weights = root / "test_vit.safetensors"
    safetensors.torch.save_file(timm.create_model("test_vit").state_dict(), str(weights))
    data = root / "data"
    data.mkdir()
    rng = np.random.RandomState(0)
    for i in range(5):
        Image.fromarray(rng.randint(0, 255, (100, 120, 3), dtype=np.uint8)).save(data / f"{i:03d}.png")
    (data / "labels.csv").write_text("file,class_index\n" + "".join(f"{i:03d}.png,{3 * i}\n" for i in range(5)))
    return weights, data


def _run(*args: str) -> int:
    return main(["eval", "--no-progress", "--threads", "1", "--n-boot", "200", *args])


def test_cli_format_parquet_resume_and_errors(
    tmp_path: Path, timm_run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    weights, data = timm_run
    base = ["--model", "timm:test_vit", "--weights", str(weights), "--data", str(data), "--methods", *_METHODS,
            "--batch-size", "2"]
    out = tmp_path / "out"
    assert _run(*base, "--out", str(out), "--limit", "3", "--format", "parquet") == 0
    assert "Parquet: " in capsys.readouterr().out
    rows = pd.read_parquet(out / "rows.parquet")
    assert len(rows) == 3 * len(_METHODS) and rows["label"].dtype == np.int64
    pd.testing.assert_frame_equal(rows, _csv_rows(out), check_dtype=False, check_exact=True)
    assert dict(zip(rows["image_id"], rows["label"], strict=True)) == {"000.png": 0, "001.png": 3, "002.png": 6}
    assert rows["pointing"].isna().all() and rows["auc_gap"].notna().all()
    # resuming needs --format parquet again; with it, the part holds every row once
    capsys.readouterr()
    assert _run(*base, "--out", str(out), "--limit", "3", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("captum-vit eval: error:") and "--format parquet" in err
    assert _run(*base, "--out", str(out), "--resume", "--format", "parquet", "--limit", "3") == 0
    assert len(pd.read_parquet(out / "rows.parquet")) == 3 * len(_METHODS)
    # bad --format value and no pyarrow: one line, exit 2, before any work
    for args, needle in (
        ([*base, "--out", str(tmp_path / "x"), "--format", "xlsx"], "invalid choice: 'xlsx'"),
        ([*base, "--out", str(tmp_path / "y"), "--format", "parquet"], "--format parquet needs pyarrow"),
    ):
        if needle.startswith("--format"):
            _hide_pyarrow(monkeypatch)
        capsys.readouterr()
        assert _run(*args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("captum-vit eval: error:") and needle in err, err
        assert "pip install 'captum-vit[parquet]'" in err or needle.startswith("invalid")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # a CSV run in the same folder layout still needs no pyarrow
    assert _run(*base, "--out", str(tmp_path / "z"), "--limit", "1") == 0
    assert not parquet_files(tmp_path / "z")
