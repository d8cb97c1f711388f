"""Time ``captum-vit demo`` end to end (process start, model load, every method, report).

    python benchmarks/demo_time.py                 # runs `python -m captum_vit demo --out demo/`
    python benchmarks/demo_time.py --out /tmp/demo --repeats 2

Prints and writes benchmarks/results/demo_time.md: wall seconds, CPU seconds of the
process (user + sys; on an otherwise idle machine the wall time is at most this), the
share of a CPU the run got (contention from other processes shows up here), the
seconds per method that the demo records in demo.json, and their ratio to raw
attention (one plain forward pass per image; the ``random`` baseline costs nothing and
is not a useful unit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo", help="demo output directory (default: demo/)")
    parser.add_argument("--repeats", type=int, default=1, help="runs (default: 1)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "demo_time.md"))
    args = parser.parse_args(argv)
    rows = []
    per_method: dict[str, float] = {}
    for _ in range(args.repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "captum_vit", "demo", "--out", args.out, "--no-progress"],
            check=True, env={**os.environ, "MPLBACKEND": "Agg"},
        )
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        rows.append((wall, cpu))
        report = json.loads((Path(args.out) / "demo.json").read_text())
        per_method = report["seconds_per_method"]
    images = len(report["images"])
    unit = per_method.get("raw_attention") or max(per_method.values())
    lines = [
        "# `captum-vit demo` wall time",
        "",
        f"Command: `python benchmarks/demo_time.py --out {args.out} --repeats {args.repeats}` "
        f"(runs `python -m captum_vit demo --out {args.out}`: bundled DeiT-Tiny, {images} images, "
        f"{len(per_method)} methods, HTML report). "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, shared with other jobs.",
        "",
        "| run | wall s | CPU s (user+sys) | CPU share |",
        "|---|---|---|---|",
    ]
    for i, (wall, cpu) in enumerate(rows):
        lines.append(f"| {i} | {wall:.1f} | {cpu:.1f} | {cpu / wall:.2f} |")
    lines += ["", f"Seconds per method in the last run (all {images} images), and ratio to raw attention:",
              "", "| method | s | x raw_attention |", "|---|---|---|"]
    for name, sec in per_method.items():
        lines.append(f"| {name} | {sec:.2f} | {sec / unit:.1f} |")
    text = "\n".join(lines) + "\n"
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
