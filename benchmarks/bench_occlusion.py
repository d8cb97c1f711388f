"""Speed of token-level occlusion vs Captum's pixel ``Occlusion``, and of dropping tokens.

Model: timm ViT-B/16 with random weights, one 224x224 image, under ``torch.no_grad``.

1. One-patch-window occlusion: :class:`captum_vit.PatchOcclusion` (``window=1``,
   zeroed patch embeddings) vs Captum's ``Occlusion`` with 16x16 pixel windows,
   stride 16 (the same 196 windows), at the same ``perturbations_per_eval``, and vs
   the floor of any exact occlusion: the same number of plain forward passes of
   the same batch sizes, with no masking and no bookkeeping. ``--perturbations 196``
   times the full map; fewer stops each method after that many perturbed passes
   (plus the unmasked pass each makes), to stay affordable on a busy machine.
2. ``replacement="drop"`` with 50 % of the patch tokens masked vs an unmasked
   forward pass of the same batch (and ``"zero"`` for reference).
3. The exact-sharing bound: the fraction of a forward pass's FLOPs (counted with
   ``torch.utils.flop_counter``, attention unfused so that its matmuls count) that a
   one-patch-window map could skip without changing a value: the patch embedding,
   the first block's LayerNorm/QKV of the unchanged tokens, the first block's
   attention (a rank-1 update of the changed key/value), and in the last block
   everything but the pooled token's row (its keys and values are still needed).
   Every other operation sees inputs that differ from the unmasked pass, because the
   first block's attention mixes the changed token into every token. The bound is
   ``1 / (1 - skippable fraction)``, the most any exact method can gain over one
   full forward pass per window.

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
from torch.utils.flop_counter import FlopCounterMode

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


def _plain_forwards(model: nn.Module, x: torch.Tensor, windows: int, ppe: int) -> None:
    """The floor of an exact occlusion map: one unmasked pass, then one plain pass per
    chunk of ``ppe`` windows on the same batch sizes, nothing else."""
    with torch.no_grad():
        model(x)
        for start in range(0, windows, ppe):
            k = min(ppe, windows - start)
            model(x.repeat(k, 1, 1, 1) if k > 1 else x)


def _exact_sharing_bound(model: nn.Module, x: torch.Tensor) -> tuple[float, float, list[str]]:
    """(total GFLOP, skippable GFLOP, table lines) of one forward pass; see the
    module docstring, item 3. Assumes a timm VisionTransformer with one pooled token."""
    blocks = list(model.blocks)  # type: ignore[union-attr]
    saved_flags = [b.attn.fused_attn for b in blocks]
    try:
        for b in blocks:
            b.attn.fused_attn = False  # count the attention matmuls
        with torch.no_grad(), FlopCounterMode(display=False, depth=None) as counter:
            model(x)
    finally:
        for b, flag in zip(blocks, saved_flags, strict=True):
            b.attn.fused_attn = flag
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    total = float(counter.get_total_flops())
    last = len(blocks) - 1
    n = int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)  # type: ignore[union-attr]
    other = (n - 1) / n  # share of the rows that belong to the other tokens

    def f(name: str) -> float:
        return float(flops.get(f"VisionTransformer.{name}", 0.0))

    attn0 = f("blocks.0.attn") - f("blocks.0.attn.qkv") - f("blocks.0.attn.proj")
    attn_last = f(f"blocks.{last}.attn") - f(f"blocks.{last}.attn.qkv") - f(f"blocks.{last}.attn.proj")
    parts = [
        ("patch embedding", f("patch_embed")),
        ("block 0 QKV of the unchanged tokens", f("blocks.0.attn.qkv") * other),
        ("block 0 attention (rank-1 update)", attn0 * other),
        (f"block {last} queries of the other tokens", f(f"blocks.{last}.attn.qkv") / 3 * other),
        (f"block {last} attention rows of the other tokens", attn_last * other),
        (f"block {last} projection + MLP of the other tokens",
         (f(f"blocks.{last}.attn.proj") + f(f"blocks.{last}.mlp")) * other),
    ]
    saved = sum(v for _, v in parts)
    lines = [f"| {name} | {v / 1e9:.3f} | {100 * v / total:.1f} % |" for name, v in parts]
    return total / 1e9, saved / 1e9, lines


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
        "| perturbations_per_eval | PatchOcclusion (s) | Captum Occlusion 16x16 px (s) | plain forwards, same count (s) | speed-up (Captum / ours) | Captum / plain | ours / plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for ppe in args.ppe:
        passes = 1 + -(-args.perturbations // ppe)
        t_ours: list[float] = []
        t_captum: list[float] = []
        t_plain: list[float] = []
        for _ in range(args.repeats):
            t_plain.append(_timed_until(
                lambda ppe=ppe: _plain_forwards(model, x, 196, ppe), model, passes))
            t_ours.append(_timed_until(
                lambda ppe=ppe: ours.attribute(x, target=0, perturbations_per_eval=ppe), model, passes))
            t_captum.append(_timed_until(
                lambda ppe=ppe: theirs.attribute(
                    x, target=0, sliding_window_shapes=(3, 16, 16), strides=(3, 16, 16),
                    perturbations_per_eval=ppe),
                model, passes))
        a, b, c = statistics.median(t_ours), statistics.median(t_captum), statistics.median(t_plain)
        lines.append(f"| {ppe} | {a:.2f} | {b:.2f} | {c:.2f} | {b / a:.2f}x | {b / c:.2f}x | {a / c:.2f}x |")
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
    total, saved, parts = _exact_sharing_bound(model, x)
    lines += [
        "",
        f"Exact-sharing bound for a one-patch-window map (one forward pass: {total:.2f} GFLOP, "
        "attention matmuls included); what an exact method could skip per window:",
        "",
        "| skippable part | GFLOP | share of a forward |",
        "|---|---|---|",
        *parts,
        f"| **total** | {saved:.3f} | {100 * saved / total:.1f} % |",
        "",
        f"Largest possible speed-up of an exact occlusion map over one full forward pass per "
        f"window: **{total / (total - saved):.2f}x** (FLOP bound; measured time also pays the "
        "Python and memory overheads that do not shrink).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
