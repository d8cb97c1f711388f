"""Speed of token-level occlusion vs Captum's pixel ``Occlusion``, and of dropping tokens.

Model: timm ViT-B/16 with random weights, one 224x224 image, under ``torch.no_grad``.

1. One-patch-window occlusion: :class:`captum_vit.PatchOcclusion` (``window=1``,
   zeroed patch embeddings) vs Captum's ``Occlusion`` with 16x16 pixel windows,
   stride 16 (the same 196 windows), at the same ``perturbations_per_eval``. To stay
   affordable on a busy machine both are stopped after the same number of perturbed
   forward passes (``--perturbations``, plus the unmasked pass each method makes);
   the per-perturbation cost is what a full 196-window map multiplies.
2. ``replacement="drop"`` with 50 % of the patch tokens masked vs an unmasked
   forward pass of the same batch (and ``"zero"`` for reference).

Methods are interleaved and repeated; the table reports median seconds and ratios
from this one run (absolute times depend on machine load, ratios much less).
Writes ``benchmarks/results/occlusion_benchmark.md``. Run from the repository root::

    python benchmarks/bench_occlusion.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from captum.attr import Occlusion
from torch import nn

from captum_vit import PatchOcclusion, adapt
from captum_vit._token_masking import masked_forward
from captum_vit.masking import random_mask

ROOT = Path(__file__).resolve().parents[1]


class _Stop(Exception):
    """Raised by the counting hook once the wanted number of forward passes ran."""


def _timed_until(fn: Callable[[], object], model: nn.Module, passes: int) -> float:
    """Seconds for ``fn`` until the model has run ``passes`` forward passes."""
    calls = [0]

    def hook(_m: nn.Module, _args: object) -> None:
        calls[0] += 1
        if calls[0] > passes:
            raise _Stop

    handle = model.register_forward_pre_hook(hook)
    start = time.perf_counter()
    try:
        fn()
    except _Stop:
        pass
    finally:
        handle.remove()
    elapsed = time.perf_counter() - start
    if calls[0] < passes:
        raise RuntimeError(f"only {calls[0]} forward passes ran, expected {passes}")
    return elapsed


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--perturbations", type=int, default=28, help="perturbations timed per method (196 = full map)")
    parser.add_argument("--ppe", type=int, nargs="+", default=[1, 7], help="perturbations_per_eval values")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--drop-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "occlusion_benchmark.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    ours = PatchOcclusion(model, replacement="zero")
    theirs = Occlusion(model)
    with torch.no_grad():
        model(x)  # warm-up

    lines = [
        f"# Occlusion speed: {args.model} (random weights), 224x224, CPU, torch threads: {torch.get_num_threads()}",
        "",
        f"Produced by `python benchmarks/bench_occlusion.py --perturbations {args.perturbations} "
        f"--ppe {' '.join(map(str, args.ppe))} --repeats {args.repeats} --drop-batch {args.drop_batch}"
        f"{f' --threads {args.threads}' if args.threads else ''}`. "
        f"Median of {args.repeats} interleaved repeats; each method timed over the unmasked pass "
        f"+ the first {args.perturbations} of the 196 one-patch windows.",
        "",
        "| perturbations_per_eval | PatchOcclusion (s) | Captum Occlusion 16x16 px (s) | speed-up (Captum / ours) |",
        "|---|---|---|---|",
    ]
    for ppe in args.ppe:
        passes = 1 + -(-args.perturbations // ppe)
        t_ours: list[float] = []
        t_captum: list[float] = []
        for _ in range(args.repeats):
            t_ours.append(_timed_until(
                lambda ppe=ppe: ours.attribute(x, target=0, perturbations_per_eval=ppe), model, passes))
            t_captum.append(_timed_until(
                lambda ppe=ppe: theirs.attribute(
                    x, target=0, sliding_window_shapes=(3, 16, 16), strides=(3, 16, 16),
                    perturbations_per_eval=ppe),
                model, passes))
        a, b = statistics.median(t_ours), statistics.median(t_captum)
        lines.append(f"| {ppe} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
        print(lines[-1], flush=True)

    adapter = adapt(model)
    xb = torch.randn(args.drop_batch, 3, 224, 224)
    mask = random_mask(args.drop_batch, 196, 0.5, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"unmasked": [], "drop": [], "zero": []}
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            times["unmasked"].append(_timed(lambda: adapter.forward(xb)))
            times["drop"].append(_timed(lambda: masked_forward(adapter, xb, mask, "drop")))
            times["zero"].append(_timed(lambda: masked_forward(adapter, xb, mask, "zero")))
    base = statistics.median(times["unmasked"])
    lines += [
        "",
        f"Token masking at 50 % (98 of 196 patches, batch of {args.drop_batch}), median of "
        f"{args.repeats + 1} interleaved repeats:",
        "",
        "| forward | seconds | cost vs unmasked |",
        "|---|---|---|",
    ]
    for name in ("unmasked", "drop", "zero"):
        t = statistics.median(times[name])
        lines.append(f"| {name} | {t:.2f} | {t / base:.2f}x |")
        print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
