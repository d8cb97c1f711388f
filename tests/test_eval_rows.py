"""Per-image rows on disk (torn lines), the seeded bootstrap and the table built from rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from captum_vit._eval_io import ShardWriter, bootstrap_ci, paired_bootstrap, read_shards, row_shard
from captum_vit.evaluation import ROW_COLUMNS, EvaluationTable


def _row(image: str, method: str, gap: float, pointing: float | None = None) -> dict[str, object]:
    return {"image_id": image, "index": 0, "method": method, "label": 1, "target": 1, "auc_positive": 0.1,
            "auc_negative": 0.1 + gap, "auc_gap": gap, "pointing": pointing, "seconds": 0.5,
            "forward_seconds": 0.25, "rank": 0}


def test_bootstrap_is_seeded_and_matches_a_plain_loop() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(size=57)
    a = bootstrap_ci(v, n_boot=500, seed=3)
    assert a == bootstrap_ci(v, n_boot=500, seed=3)  # reproducible, bit for bit
    assert a != bootstrap_ci(v, n_boot=500, seed=4)
    # independent reference: the same generator drawn resample by resample
    ref_rng = np.random.default_rng(3)
    means = [v[ref_rng.integers(0, v.size, size=v.size)].mean() for _ in range(500)]
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert a[0] == pytest.approx(v.mean())
    assert a[1] == pytest.approx(lo) and a[2] == pytest.approx(hi)
    assert a[1] < a[0] < a[2]


def test_bootstrap_known_answers() -> None:
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)  # no spread, no interval
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    # a paired difference that is constant has a zero-width interval even if each
    # method's values spread widely
    a = np.array([0.0, 10.0, 20.0, 30.0])
    d = paired_bootstrap(a + 1.5, a)
    assert d == pytest.approx((1.5, 1.5, 1.5))
    wide = bootstrap_ci(a + 1.5)
    assert wide[2] - wide[1] > 5
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.0)


def test_shard_writer_cuts_a_torn_line_and_readers_skip_it(tmp_path: Path) -> None:
    path = row_shard(tmp_path, 0)
    with ShardWriter(path, ROW_COLUMNS) as w:
        w.write([_row("a", "m", 0.25), _row("b", "m", 0.5)])
    with open(path, "ab") as fh:  # a process killed in the middle of a line
        fh.write(b"c,0,m,1,1,0.1,0.3")
    rows = read_shards(tmp_path)
    assert [r["image_id"] for r in rows] == ["a", "b"]
    with ShardWriter(path, ROW_COLUMNS) as w:  # reopening repairs the tail
        w.write([_row("c", "m", 0.75)])
    text = path.read_text()
    assert text.count("\n") == 4 and text.endswith("\n")
    frame = pd.read_csv(path)  # what a user does with the rows
    assert list(frame["image_id"]) == ["a", "b", "c"]
    assert frame["pointing"].isna().all()
    assert frame["auc_gap"].tolist() == [0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="columns"):
        ShardWriter(path, ("image_id", "other"))


def test_table_from_rows_dedupes_orders_and_compares(tmp_path: Path) -> None:
    rows = [_row("b", "x", 0.5, 1.0), _row("a", "x", 0.25, 0.0), _row("a", "y", 0.0, 1.0),
            _row("b", "y", 0.25, None), _row("a", "x", 0.9)]  # the last one repeats (a, x)
    t = EvaluationTable.from_rows(rows, ["x", "y"], [{"image_id": "z", "reason": "cannot read"}])
    assert t.value("x", "auc_gap") == pytest.approx(0.375)  # the first (a, x) row counts
    assert t.count("y", "pointing") == 1
    assert t.image_ids == ["a", "b"] and len(t.errors) == 1
    # rows in another order (another process count) give the same table
    t2 = EvaluationTable.from_rows(list(reversed(rows[:4])), ["x", "y"])
    assert t2.summary(seed=1) == t.summary(seed=1)
    cmp = {r["metric"]: r for r in t.compare("x", "y")}
    assert cmp["auc_gap"]["n"] == 2 and cmp["auc_gap"]["diff"] == pytest.approx(100 * 0.25)
    assert cmp["pointing"]["n"] == 1  # only images where both have a value
    md = t.to_markdown()
    assert "| x | 10.00 [" in md and "| 37.50 [" in md and md.count("\n") == 4
    assert md.rstrip().endswith("| 2 | 1 |")  # n_perturbation, n_masks of y
    with pytest.raises(ValueError, match="not in the table"):
        t.compare("x", "nope")
    t.to_csv(tmp_path / "s.csv")
    frame = pd.read_csv(tmp_path / "s.csv")
    assert set(frame.columns) == {"method", "metric", "n", "mean", "ci_low", "ci_high"}
