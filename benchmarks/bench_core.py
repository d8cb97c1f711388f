"""Speed and memory of the core methods against plain forward / backward passes.

Runs everything in one process on the CPU, on a randomly initialised timm
``vit_base_patch16_224`` (ViT-B/16) with a batch of 8 images, and prints (and writes
to ``benchmarks/results/core_speed.md``) a table of time ratios:

* ``AttentionRollout.attribute`` / plain forward (timm's fused attention, no grad);
* ``RawAttention.attribute`` (last layer) and ``RawAttention(layer=0)`` / plain forward;
* ``GradientRollout.attribute`` (both variants) / plain forward + backward, where the
  baseline backward is ``torch.autograd.grad`` of the target-logit sum w.r.t. the input.

Each timed function is run once to warm up and then ``--reps`` times, the methods
interleaved within each repetition so that contention from other processes hits them
alike; the table reports medians.

Memory: the extra peak memory of rollout must not grow with depth. It is measured by
counting the bytes of tensor storages alive: a ``TorchDispatchMode`` sees every tensor
that an ATen operator returns and adds its storage's size to a running total when the
storage is first seen; a ``weakref.finalize`` on the storage subtracts it when the
storage is freed. The peak of that total during a call is the call's peak working
memory (parameters and the input, allocated beforehand, are not counted). This is exact
and deterministic, unlike ``resource.getrusage`` (whose max RSS moves in
allocator-sized steps and never goes down) or ``tracemalloc`` (blind to torch's C++
allocations). For depths 6, 12 and 24 (ViT-B width) it reports the peak of a plain
fused forward, of ``AttentionRollout.attribute`` and, for contrast, of a forward that
keeps every layer's attention; "extra" is the peak minus the plain forward's peak.

Usage::

    python benchmarks/bench_core.py                 # defaults: batch 8, 5 repetitions
    python benchmarks/bench_core.py --reps 3 --depths 6 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from captum_vit import AttentionRollout, GradientRollout, RawAttention, adapt

RESULTS = Path(__file__).resolve().parent / "results" / "core_speed.md"


def _model(depth: int = 12) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, depth=depth).eval()


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside the mode that are alive."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()
        self._exclude = exclude

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key == 0 or key in self._seen or key in self._exclude:
                    continue
                nbytes = storage.nbytes()
                self._seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, nbytes)
        return out


def _storages(*tensors: Tensor) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def _peak_bytes(fn: Callable[[], Any], exclude: set[int]) -> int:
    """Peak bytes of live storages created by ``fn`` (views of ``exclude`` not counted)."""
    with _LiveBytes(exclude) as tracker:
        result = fn()
        del result
    return tracker.peak


def _time(
    fns: dict[str, Callable[[], Any]], reps: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall-clock and process-CPU seconds of each function, interleaved."""
    for fn in fns.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    med = statistics.median
    return {k: med(v) for k, v in wall.items()}, {k: med(v) for k, v in cpu.items()}


def _keep_all_forward(model: nn.Module, x: Tensor) -> Callable[[], Any]:
    adapter = adapt(model)

    def run() -> Any:
        with torch.no_grad(), adapter.capture(keep=True, validate=False) as rec:
            adapter.forward(x)
        return rec.attentions

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = _model()
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.no_grad():
        target = model(x).argmax(1)

    rollout = AttentionRollout(model)
    raw_last = RawAttention(model)
    raw_first = RawAttention(model, layer=0)
    chefer = GradientRollout(model, variant="chefer")
    grad_rollout = GradientRollout(model, variant="rollout")

    def plain_forward() -> Tensor:
        with torch.no_grad():
            return model(x)

    def plain_forward_backward() -> Tensor:
        xg = x.detach().requires_grad_(True)
        score = model(xg).gather(1, target[:, None]).sum()
        return torch.autograd.grad(score, xg)[0]

    fns: dict[str, Callable[[], Any]] = {
        "forward": plain_forward,
        "AttentionRollout": lambda: rollout.attribute(x),
        "RawAttention(layer=-1)": lambda: raw_last.attribute(x),
        "RawAttention(layer=0)": lambda: raw_first.attribute(x),
        "forward+backward": plain_forward_backward,
        "GradientRollout(chefer)": lambda: chefer.attribute(x, target=target),
        "GradientRollout(rollout)": lambda: grad_rollout.attribute(x, target=target),
    }
    wall, cpu = _time(fns, args.reps)
    speed_rows = [
        ("AttentionRollout", "forward", 1.15),
        ("RawAttention(layer=-1)", "forward", None),
        ("RawAttention(layer=0)", "forward", None),
        ("GradientRollout(chefer)", "forward+backward", 1.3),
        ("GradientRollout(rollout)", "forward+backward", 1.3),
    ]

    mem_rows: list[tuple[int, int, int, int]] = []
    for depth in args.depths:
        m = _model(depth)
        ro = AttentionRollout(m)
        keep_all = _keep_all_forward(m, x)

        def fwd_only(m: nn.Module = m) -> Tensor:
            with torch.no_grad():
                return m(x)

        exclude = _storages(x, *m.parameters(), *m.buffers())
        mem_rows.append(
            (
                depth,
                _peak_bytes(fwd_only, exclude),
                _peak_bytes(lambda ro=ro: ro.attribute(x), exclude),
                _peak_bytes(keep_all, exclude),
            )
        )
        del m, ro, keep_all

    mib = 2.0**20
    lines = [
        "# Core methods: speed and memory",
        "",
        f"timm `vit_base_patch16_224` (random weights), batch {args.batch}, CPU, "
        f"{torch.get_num_threads()} torch threads, median of {args.reps} interleaved "
        "repetitions after one warm-up, all in one run. Produced by "
        f"`python benchmarks/bench_core.py {' '.join(sys.argv[1:])}`.".replace(" `.", "`."),
        "",
        "## Time",
        "",
        "Wall = wall-clock seconds; CPU = process CPU seconds (all threads), which other "
        "processes sharing the cores inflate less. Ratios are method / baseline.",
        "",
        "| method | baseline | method wall s | baseline wall s | wall ratio "
        "| method CPU s | baseline CPU s | CPU ratio | limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, base, limit in speed_rows:
        rw, rc = wall[name] / wall[base], cpu[name] / cpu[base]
        ok = "" if limit is None else f"<= {limit}: {'ok' if max(rw, rc) <= limit else 'MISSED'}"
        lines.append(
            f"| {name} | {base} | {wall[name]:.3f} | {wall[base]:.3f} | {rw:.3f} "
            f"| {cpu[name]:.3f} | {cpu[base]:.3f} | {rc:.3f} | {ok} |"
        )
    lines += [
        "",
        "## Peak memory (bytes of live tensor storages during the call)",
        "",
        "Counted with a `TorchDispatchMode` that adds each new output storage's size and "
        "subtracts it when the storage is freed (weakref finalizer); parameters and input "
        "are allocated beforehand and not counted. `extra` = peak minus the plain fused "
        "forward's peak.",
        "",
        "| depth | forward MiB | rollout MiB | rollout extra MiB | keep-all-layers MiB | keep-all extra MiB |",
        "|---|---|---|---|---|---|",
    ]
    for depth, f, r, k in mem_rows:
        lines.append(
            f"| {depth} | {f / mib:.1f} | {r / mib:.1f} | {(r - f) / mib:.1f} | {k / mib:.1f} | {(k - f) / mib:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
