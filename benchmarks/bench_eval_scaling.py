"""Throughput and resume cost of ``captum-vit eval`` on the bundled DeiT-Tiny.

1. Images/s per method: ``captum-vit eval --nproc N --threads T`` on the first
   ``--images`` images of the shared ImageNet sample, one run per method (the
   perturbation AUCs included, as in a real evaluation). Seconds are those rank 0
   records in ``OUT/invocations.jsonl`` (model loading and process start excluded);
   the wall time of the whole command is given too.
2. Resume: the same job uninterrupted, then killed with SIGKILL once about half of
   the images have rows, then resumed with ``--resume``; the tables (timings aside)
   must be equal.

Example (the committed numbers)::

    python benchmarks/bench_eval_scaling.py --images 40 --resume-images 32 \
        --out benchmarks/results/eval_scaling.md
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "assets" / "imagenet-sample"


def _cmd(out: Path, methods: list[str], images: int, nproc: int, threads: int, batch: int, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "captum_vit", "eval", "--data", str(DATA), "--limit", str(images),
           "--methods", *methods, "--out", str(out), "--batch-size", str(batch), "--threads", str(threads),
           "--no-progress"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    return cmd + (["--resume"] if resume else [])


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=_env(), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _last_invocation(out: Path) -> dict[str, float]:
    lines = (out / "invocations.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def _table(out: Path) -> pd.DataFrame:
    frame = pd.read_csv(out / "summary.csv")
    return frame[frame["metric"] != "seconds"].reset_index(drop=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (the elastic launcher starts each rank in
    its own session, so a process-group kill would miss them)."""
    import psutil

    root = psutil.Process(pid)
    for p in [*root.children(recursive=True), root]:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _rows(out: Path) -> int:
    return sum(max(0, p.read_text().count("\n") - 1) for p in out.glob("rows-*.csv"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="raw_attention,rollout_mean,grad_rollout_chefer,random")
    p.add_argument("--images", type=int, default=40, help="images per throughput run")
    p.add_argument("--resume-images", type=int, default=32, help="images of the resume test")
    p.add_argument("--resume-methods", default="rollout_mean,grad_rollout_chefer,random")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/eval_scaling.md")
    args = p.parse_args(argv)
    command = "python benchmarks/bench_eval_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load0 = os.getloadavg()[0]
    lines = [
        "# `captum-vit eval`: throughput and resume cost (bundled DeiT-Tiny, CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"{args.nproc} processes x {args.threads} thread(s), batch size {args.batch_size}, the first images of "
        "the shared ImageNet sample, perturbation AUCs included (2 x 9 perturbed forward passes per image "
        f"and method). Load average at the start: {load0:.2f} on {os.cpu_count()} cores (other jobs share "
        "the machine).",
        "",
        "## Images/s per method",
        "",
        "| method | images | seconds (rank 0, evaluation) | images/s | wall of the command (s) |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.methods.split(","):
            out = Path(tmp) / m
            wall = _run(_cmd(out, [m], args.images, args.nproc, args.threads, args.batch_size))
            inv = _last_invocation(out)
            lines.append(f"| {m} | {inv['images_after']} | {inv['seconds']:.1f} | "
                         f"{inv['images_after'] / inv['seconds']:.2f} | {wall:.1f} |")
            print(lines[-1], flush=True)
        methods = args.resume_methods.split(",")
        n = args.resume_images
        full = Path(tmp) / "full"
        wall_full = _run(_cmd(full, methods, n, args.nproc, args.threads, args.batch_size))
        killed = Path(tmp) / "killed"
        proc = subprocess.Popen(_cmd(killed, methods, n, args.nproc, args.threads, args.batch_size), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.perf_counter()
        while proc.poll() is None and _rows(killed) < n * len(methods) // 2:
            time.sleep(0.05)
        t_kill = time.perf_counter() - t0
        _kill_tree(proc.pid)
        proc.wait()
        rows_at_kill = _rows(killed)
        wall_resume = _run(_cmd(killed, methods, n, args.nproc, args.threads, args.batch_size, resume=True))
        equal = _table(full).equals(_table(killed))
        inv_full = _last_invocation(full)
        inv_res = _last_invocation(killed)
    lines += [
        "",
        f"## Resume after SIGKILL ({n} images x {len(methods)} methods: {', '.join(methods)})",
        "",
        "| run | wall of the command (s) | evaluation seconds (rank 0) | rows |",
        "|---|---|---|---|",
        f"| uninterrupted | {wall_full:.1f} | {inv_full['seconds']:.1f} | {n * len(methods)} |",
        f"| killed (SIGKILL to the launcher and every rank) | {t_kill:.1f} | – | {rows_at_kill} when killed |",
        f"| resumed with --resume | {wall_resume:.1f} | {inv_res['seconds']:.1f} | "
        f"{n * len(methods) - rows_at_kill} new |",
        "",
        f"Killed + resumed wall: {t_kill + wall_resume:.1f} s against {wall_full:.1f} s uninterrupted "
        f"(the difference is the second start-up and the batches in flight at the kill). "
        f"Resumed table equal to the uninterrupted one (every metric, mean and CI, timings aside): **{equal}**.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
