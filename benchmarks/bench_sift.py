"""Cost of SiftInterrelation.analyze relative to a plain forward pass.

ViT-B/16 with random weights (timm ``vit_base_patch16_224``), a batch of random
images, CPU. Every measurement is repeated and interleaved with the others (plain
forward, analyze, and its parts) so that load from other processes hits all of them
alike; the table reports the minimum over repeats, its ratio to the plain forward,
and the median over repeats of the paired ratio (each measurement divided by the plain
forward of the same repeat, taken seconds apart), which is the steadier number on a
shared machine.

Run: ``python benchmarks/bench_sift.py`` (writes ``benchmarks/results/sift_bench.md``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sift_bench.md")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import timm

    from captum_vit import SiftInterrelation
    from captum_vit._sift import unnormalize_inputs
    from captum_vit.interrelation import interrelation_stats

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch_size, 3, 224, 224)
    explainer = SiftInterrelation(model)
    images = unnormalize_inputs(x)
    counts = explainer.keypoint_counts(images)

    def forward() -> None:
        model(x)

    def captured_forward() -> None:
        with explainer.adapter.capture(keep=False, on_attention=lambda layer, attn: None):
            model(x)

    layer_attn: list[torch.Tensor] = []

    def grab(layer: int, attn: torch.Tensor) -> None:
        if layer == 0:
            layer_attn.append(attn.detach()[..., 1:, 1:])

    with torch.no_grad(), explainer.adapter.capture(keep=False, on_attention=grab):
        model(x)
    one_layer = layer_attn[0]

    def stats_all_layers() -> None:
        for _ in range(explainer.adapter.num_layers):
            interrelation_stats(one_layer, counts)

    cases: dict[str, Callable[[], object]] = {
        "plain forward (fused attention)": forward,
        "analyze (SIFT + captured forward + statistics)": lambda: explainer.analyze(x),
        "  captured forward (unfused attention, hooks)": captured_forward,
        "  SIFT keypoint counting": lambda: explainer.keypoint_counts(images),
        "  interrelation statistics, all layers": stats_all_layers,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for fn in cases.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    fwd = times["plain forward (fused attention)"]
    base = min(fwd)

    def paired(name: str) -> float:
        return statistics.median(t / f for t, f in zip(times[name], fwd, strict=True))

    analyze_key = "analyze (SIFT + captured forward + statistics)"
    lines = [
        f"# SiftInterrelation cost: {args.model} (random weights), batch {args.batch_size}, CPU "
        f"({torch.get_num_threads()} threads), min of {args.repeats} interleaved repeats",
        "",
        f"Command: `python benchmarks/bench_sift.py --batch-size {args.batch_size} --repeats {args.repeats}`"
        f" (machine load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
        "",
        "| what | seconds (min) | ratio of minima | median paired ratio |",
        "|---|---|---|---|",
        *(f"| {name} | {min(t):.3f} | {min(t) / base:.2f} | {paired(name):.2f} |"
          for name, t in times.items()),
        "",
        f"Target: analyze <= 1.5x plain forward. Measured: {paired(analyze_key):.2f}x (median "
        f"paired ratio), {min(times[analyze_key]) / base:.2f}x (ratio of minima).",
        "",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
