"""Soak test: many mixed calls on one shared model from several threads.

A tiny random timm ViT (DeiT-distilled layout: 2 prefix tokens, 2 layers, 64 px,
16 px patches) is shared by ``--threads`` threads that make ``--calls`` calls in all,
cycling through every method and helper of captum_vit (raw attention, rollout,
gradient rollout in both variants, Grad-CAM, patch occlusion, attention flow, SIFT
interrelation, head importance by ablation and by gradient, head ablation, region
probe, pooling comparison, masking sweep) plus plain ``model(x)`` calls. Each call's
result is compared with the same call made alone before the soak (bitwise).

Every ``--every`` calls (and at the end) it records:

* forward / pre / backward hooks on the model's modules,
* Python objects held by the model: entries of every module's ``__dict__``, hook
  dictionaries, parameters and buffers (a leak of instance patches, flags or hooks
  shows here), and captum_vit's shared-patch slots in use,
* ``gc`` objects in the whole process (after ``gc.collect()``),
* resident memory (VmRSS of /proc/self/status).

The first checkpoint after a warm-up (``--warmup`` calls) is the baseline; the report
gives each figure at every checkpoint and its growth from the baseline.

Run: ``OMP_NUM_THREADS=1 python benchmarks/soak.py`` (writes
``benchmarks/results/soak.md``).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _held_by_model(model: nn.Module) -> int:
    """Python objects the model holds directly (instance attributes, hooks, tensors)."""
    total = 0
    for m in model.modules():
        total += len(m.__dict__)
        total += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        total += len(m._parameters) + len(m._buffers) + len(m._modules)
    return total


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(m._backward_pre_hooks) for m in model.modules()
    )


def _calls(model: nn.Module, x: Tensor) -> list[tuple[str, Callable[[], Any]]]:
    from captum_vit import (
        AttentionFlow,
        AttentionRollout,
        GradientRollout,
        PatchOcclusion,
        RawAttention,
        SiftInterrelation,
        ViTGradCam,
        ablate_heads,
        adapt,
        compare_pooling,
        head_importance,
        masking_sweep,
        region_probe,
    )
    from captum_vit._capture import _to_output_tensor

    adapter = adapt(model)
    gh, gw = adapter.grid_size(x)
    region = torch.zeros(x.shape[0], gh * gw, dtype=torch.bool)
    region[:, : gw] = True
    heads = torch.zeros(adapter.num_layers, 3, dtype=torch.bool)
    heads[0, 1] = True
    t = torch.tensor([1, 4])

    def plain() -> Tensor:
        with torch.no_grad():
            return _to_output_tensor(model(x))

    return [
        ("plain forward", plain),
        ("RawAttention", lambda: RawAttention(model).attribute(x)),
        ("RawAttention layer 0", lambda: RawAttention(model, layer=0).attribute(x)),
        ("AttentionRollout", lambda: AttentionRollout(model, discard_ratio=0.5).attribute(x)),
        ("GradientRollout chefer", lambda: GradientRollout(model).attribute(x, target=t)),
        ("GradientRollout rollout", lambda: GradientRollout(model, variant="rollout").attribute(x, target=t)),
        ("ViTGradCam", lambda: ViTGradCam(model).attribute(x, target=t)),
        ("PatchOcclusion", lambda: PatchOcclusion(model).attribute(x, target=t, perturbations_per_eval=8)),
        ("AttentionFlow", lambda: AttentionFlow(model).attribute(x)),
        ("SiftInterrelation", lambda: SiftInterrelation(model).attribute(x)),
        ("head_importance ablation", lambda: head_importance(model, x, target=t)),
        ("head_importance gradient", lambda: head_importance(model, x, target=t, method="gradient")),
        ("ablate_heads", lambda: ablate_heads(model, x, heads)),
        ("region_probe", lambda: region_probe(model, x, region, target=t, replacement="zero").attention_shift),
        ("compare_pooling", lambda: compare_pooling(model, x)["cls"]),
        ("masking_sweep", lambda: masking_sweep(
            model, x, strategies=("random", "rollout_most"), ratios=(0.25, 0.5), show_progress=False
        ).agreement),
    ]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(p, q) for p, q in zip(a, b, strict=True))
    return bool(a == b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--every", type=int, default=250, help="calls between checkpoints")
    parser.add_argument("--warmup", type=int, default=250, help="calls before the baseline checkpoint")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.md")
    args = parser.parse_args(argv)

    import timm

    from captum_vit._capture import _slots_in_use

    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, depth=2, img_size=64, num_classes=7
    ).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g)
    calls = _calls(model, x)
    expected = {name: fn() for name, fn in calls}  # each call alone, before the soak

    lock = threading.Lock()
    counter = {"next": 0, "done": 0}
    mismatches: dict[str, int] = {}
    errors: list[str] = []
    per_method: dict[str, int] = {}
    checkpoints: list[dict[str, float]] = []
    checkpoint_due = threading.Event()
    resume = threading.Event()
    resume.set()

    def checkpoint(done: int) -> None:
        gc.collect()
        checkpoints.append({
            "calls": done, "hooks": _hooks(model), "held": _held_by_model(model),
            "slots": _slots_in_use(), "gc_objects": len(gc.get_objects()), "rss_mib": _rss_mib(),
            "time_s": time.perf_counter() - start,
        })

    def worker() -> None:
        while True:
            resume.wait()
            with lock:
                i = counter["next"]
                if i >= args.calls:
                    return
                counter["next"] = i + 1
            name, fn = calls[i % len(calls)]
            try:
                out = fn()
                if not _same(out, expected[name]):
                    with lock:
                        mismatches[name] = mismatches.get(name, 0) + 1
            except BaseException as err:  # StopForward must be reported too
                with lock:
                    errors.append(f"{name}: {err.__class__.__name__}: {err}")
            with lock:
                per_method[name] = per_method.get(name, 0) + 1
                counter["done"] += 1
                done = counter["done"]
                if done >= args.warmup and (done - args.warmup) % args.every == 0:
                    resume.clear()  # pause the others to measure a quiet model
                    checkpoint_due.set()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"soak-{k}") for k in range(args.threads)]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        if checkpoint_due.wait(0.2):
            checkpoint_due.clear()
            # wait until every call in flight has finished
            while True:
                with lock:
                    in_flight = counter["next"] - counter["done"]
                if in_flight == 0:
                    break
                time.sleep(0.01)
            with lock:
                done = counter["done"]
            checkpoint(done)
            resume.set()
    for th in threads:
        th.join()
    if not checkpoints or checkpoints[-1]["calls"] != counter["done"]:
        checkpoint(counter["done"])
    elapsed = time.perf_counter() - start

    base, last = checkpoints[0], checkpoints[-1]
    half = next(c for c in checkpoints if c["calls"] >= counter["done"] // 2)
    lines = [
        "# Soak test: one shared model, mixed calls from several threads",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python benchmarks/soak.py"
        + (f" {' '.join(argv if argv is not None else sys.argv[1:])}" if (argv or sys.argv[1:]) else "") + "`",
        "",
        f"{counter['done']} calls from {args.threads} threads in {elapsed:.1f} s on one tiny random "
        "timm DeiT-distilled ViT (2 layers, 3 heads, 64 px, 16 px patches, batch of 2); "
        f"{len(calls)} kinds of call in rotation ({', '.join(n for n, _ in calls)}), "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"torch threads {torch.get_num_threads()}.",
        "",
        f"- errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""),
        f"- results different from the same call made alone: {sum(mismatches.values())}"
        + (f" ({mismatches})" if mismatches else ""),
        f"- calls per kind: {min(per_method.values())}..{max(per_method.values())}",
        "",
        "| calls | hooks on the model | objects held by the model | shared slots in use | gc objects | RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for c in checkpoints:
        lines.append(
            f"| {c['calls']} | {c['hooks']} | {c['held']} | {c['slots']} | {c['gc_objects']} | {c['rss_mib']:.1f} |"
        )
    lines += [
        "",
        f"Growth from the baseline (after {base['calls']} calls) to the end ({last['calls']} calls): "
        f"hooks {last['hooks'] - base['hooks']:+d}, objects held by the model "
        f"{last['held'] - base['held']:+d}, shared slots {last['slots'] - base['slots']:+d}, "
        f"gc objects {last['gc_objects'] - base['gc_objects']:+d}, "
        f"RSS {last['rss_mib'] - base['rss_mib']:+.1f} MiB "
        f"(range over checkpoints {min(c['rss_mib'] for c in checkpoints):.1f}.."
        f"{max(c['rss_mib'] for c in checkpoints):.1f} MiB).",
        "",
        f"Over the second half (from {half['calls']} calls to the end): hooks "
        f"{last['hooks'] - half['hooks']:+d}, objects held by the model {last['held'] - half['held']:+d}, "
        f"gc objects {last['gc_objects'] - half['gc_objects']:+d}, RSS "
        f"{last['rss_mib'] - half['rss_mib']:+.1f} MiB.",
        "",
        "Checkpoints are taken with the other threads paused and no call in flight, after "
        "`gc.collect()`; `hooks` counts forward, forward-pre, backward and backward-pre hooks "
        "of every module; `objects held by the model` counts every module's `__dict__` "
        "entries, hooks, parameters, buffers and children.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if not errors and not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
