"""AttnLRP vs Chefer relevance on subsets of the committed rows: where the issue's
+0.05 goal came from, and the correctly classified images.

Reads ``results/lrp_tuning.csv`` (held-out 50) and ``results/lrp_eval.csv`` (reported
450), written by ``bench_lrp.py``; runs no model. Pixel-zero gap = negative minus positive
AUC; Δ = paired difference to Chefer with a 95% bootstrap CI (``bench_lrp._bootstrap``).

* the prototype's 40 images: its Chefer score (0.443, ../shared/FIELD-NOTES.md) is
  compared with Chefer on the first 40 held-out images (indices 0, 10, ..., 390) and
  on the sample's first 40 (indices 0..39, from both splits);
* the images DeiT-Tiny classifies correctly (prediction = label) among the 450.

Run: ``python benchmarks/lrp_subsets.py`` -> ``results/lrp_subsets.md``.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lrp import RESULTS, _bootstrap, _read_rows

Row = dict[str, Any]


def _gaps(rows: list[Row], method: str, keep: Callable[[Row], bool]) -> dict[int, float]:
    return {r["index"]: r["pix_neg"] - r["pix_pos"] for r in rows if r["method"] == method and keep(r)}


def _line(name: str, rows: list[Row], lrp: str, keep: Callable[[Row], bool]) -> str:
    a, c = _gaps(rows, lrp, keep), _gaps(rows, "chefer", keep)
    idx = sorted(a)
    d = [a[i] - c[i] for i in idx]
    lo, hi = _bootstrap(d)
    return (
        f"| {name} | {len(idx)} | {statistics.fmean(a[i] for i in idx):.3f} | "
        f"{statistics.fmean(c[i] for i in idx):.3f} | {statistics.fmean(d):+.3f} [{lo:+.3f}, {hi:+.3f}] |"
    )


def main() -> int:
    tune = _read_rows(RESULTS / "lrp_tuning.csv")
    ev = _read_rows(RESULTS / "lrp_eval.csv")
    both = [{**r, "method": "attn_lrp" if r["method"] == "cp_g0.1_0.05" else r["method"]} for r in tune] + ev
    lines = [
        "# AttnLRP (defaults) vs Chefer relevance on subsets (pixel-zero)",
        "",
        "Rows of `lrp_tuning.csv` / `lrp_eval.csv`; Δ = AttnLRP − Chefer, paired 95% bootstrap CI. "
        "The prototype (../shared/FIELD-NOTES.md) reported Chefer 0.443 and its recipe 0.558 on 40 images. "
        "Command: `python benchmarks/lrp_subsets.py`.",
        "",
        "| images | n | AttnLRP | Chefer | Δ |",
        "|---|---|---|---|---|",
        _line("first 40 held-out (0, 10, ..., 390)", tune, "cp_g0.1_0.05", lambda r: r["index"] < 400),
        _line("... the prototype's recipe (`cp_g0.25_0.05`) there", tune, "cp_g0.25_0.05", lambda r: r["index"] < 400),
        _line("first 40 of the sample (0..39)", both, "attn_lrp", lambda r: r["index"] < 40),
        _line("all 50 held-out", tune, "cp_g0.1_0.05", lambda r: True),
        _line("450 reported", ev, "attn_lrp", lambda r: True),
        _line("450 reported, correctly classified", ev, "attn_lrp", lambda r: r["pred"] == r["label"]),
        "",
    ]
    text = "\n".join(lines)
    (RESULTS / "lrp_subsets.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
