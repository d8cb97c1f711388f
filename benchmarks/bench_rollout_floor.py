"""Where AttentionRollout's time goes: bundled DeiT-Tiny at batch 1, or ViT-B/16 at batch 8.

Paired, interleaved timings (order alternating per round; ratios are medians of
per-round ratios to a plain fused forward pass, so load from other processes largely
cancels) of:

* ``forward (fused)``: ``model(x)`` under ``torch.no_grad``, timm's fused attention;
* ``unfused forward, stopped``: the same model with ``fused_attn`` off, ended by a
  hook right after the last block's attention softmax (what any rollout must run:
  the probabilities are needed, the last MLP and the head are not);
* ``capture only``: :func:`captum_vit.attr._common._run_attention_only` with a
  callback that does nothing (validation, hooks, the last layer's query rows);
* ``AttentionRollout.attribute``: the method (patch grid).

and, timed alone, the ``L - 2`` matmuls ``(N x N)·(N x N)`` that any product
multiplied as the forward pass goes must do (the first layer starts the product and
the last layer multiplies only its query row). Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/bench_rollout_floor.py --rounds 60
    OMP_NUM_THREADS=1 python benchmarks/bench_rollout_floor.py --model vit_b16 --batch 8 --rounds 5

Writes ``benchmarks/results/rollout_floor.md`` (``rollout_floor_vit_b16_b8.md``). Also
times the unfused forward run to the end (what a rollout that does not stop early,
e.g. torchxai's, pays).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from captum_vit import AttentionRollout, adapt
from captum_vit.attr._common import _run_attention_only
from captum_vit.models import load_default

ROOT = Path(__file__).resolve().parents[1]


class _Stop(Exception):
    pass


def _entries(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    blocks: list[nn.Module] = list(model.blocks)  # type: ignore[arg-type]
    adapter = adapt(model)
    rollout = AttentionRollout(model, adapter=adapter)

    def forward() -> object:
        with torch.no_grad():
            return model(x)

    def stop(_m: nn.Module, _a: object, _o: object) -> None:
        raise _Stop

    def unfused_stopped() -> object:
        for b in blocks:
            b.attn.fused_attn = False  # type: ignore[union-attr]
        handle = blocks[-1].attn.attn_drop.register_forward_hook(stop)  # type: ignore[union-attr]
        try:
            with torch.no_grad():
                model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
            for b in blocks:
                b.attn.fused_attn = True  # type: ignore[union-attr]
        return None

    def capture_only() -> object:
        return _run_attention_only(adapter, x, (), on_attention=lambda _l, _a: None, query_rows=True)

    def attribute() -> object:
        return rollout.attribute(x, return_patch_grid=True)

    def unfused_full() -> object:
        for b in blocks:
            b.attn.fused_attn = False  # type: ignore[union-attr]
        try:
            with torch.no_grad():
                return model(x)
        finally:
            for b in blocks:
                b.attn.fused_attn = True  # type: ignore[union-attr]

    return {
        "forward (fused, no grad)": forward,
        "unfused forward, to the end": unfused_full,
        "unfused forward, stopped after the last softmax": unfused_stopped,
        "capture only (no product)": capture_only,
        "AttentionRollout.attribute": attribute,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--model", choices=("deit_tiny", "vit_b16"), default="deit_tiny")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model == "deit_tiny":
        model, label = load_default()[0], "bundled DeiT-Tiny"
    else:
        import timm

        torch.manual_seed(0)
        model, label = timm.create_model("vit_base_patch16_224", pretrained=False), "timm ViT-B/16 (random weights)"
    model.eval()
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    entries = _entries(model, x)
    names = list(entries)
    for fn in entries.values():
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            entries[n]()
            times[n].append(time.perf_counter() - t0)
    load_after = os.getloadavg()[0]
    base = times[names[0]]
    n_tok, layers = 197, len(list(model.blocks))  # type: ignore[arg-type]
    a = torch.rand(args.batch, n_tok, n_tok)
    m = torch.rand(args.batch, n_tok, -(-(n_tok + 1) // 16) * 16)

    def products() -> None:
        for _ in range(layers - 2):
            torch.bmm(a, m)

    products()
    prod_s = statistics.median(
        [(lambda t0: (products(), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(50)]
    )
    fwd_s = statistics.median(base)
    lines = [
        f"# AttentionRollout on {label}, batch {args.batch}: where the time goes",
        "",
        f"Produced by `OMP_NUM_THREADS=1 python benchmarks/bench_rollout_floor.py --model {args.model} "
        f"--batch {args.batch} --rounds {args.rounds}`; "
        f"{label}, {args.batch} x 224x224 input, CPU, 1 torch thread, 1-minute load average "
        f"{load_before:.1f} before and {load_after:.1f} after on {os.cpu_count()} cores. Ratio = median over rounds of (entry / fused forward), paired.",
        "",
        "| entry | median s | cost in fused forwards (median paired ratio) |",
        "|---|---|---|",
    ]
    for n in names:
        ratio = statistics.median([t / b for t, b in zip(times[n], base, strict=True)])
        lines.append(f"| {n} | {statistics.median(times[n]):.4f} | {ratio:.3f} |")
    lines += [
        f"| {layers - 2} product matmuls (N x N)·(N x N+pad) alone | {prod_s:.4f} | "
        f"{prod_s / fwd_s:.3f} (of the median forward) |",
        "",
        "Any rollout that multiplies the product as the forward pass goes (DESIGN.md) costs "
        "at least the stopped unfused forward plus those matmuls; the rest of the method's "
        "cost is the per-layer head fusion / scaling passes and the capture.",
        "",
    ]
    stem = "rollout_floor" if args.model == "deit_tiny" and args.batch == 1 else f"rollout_floor_{args.model}_b{args.batch}"
    out = ROOT / "benchmarks" / "results" / f"{stem}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
