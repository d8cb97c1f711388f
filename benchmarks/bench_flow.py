"""Attention flow: captum_vit's AttentionFlow vs the published networkx recipe.

The published implementation (Abnar & Zuidema 2020, ``attention_graph_util.py``) builds
a networkx graph of every token at every layer (capacities = residual-mixed,
row-normalised attention) and calls ``nx.maximum_flow_value(G, u, v,
flow_func=edmonds_karp)`` once per input token. That is far too slow to run for all
196 patches of an image here, so networkx is timed on image 0 as follows and
extrapolated to all patches:

* networkx's fastest solver, ``preflow_push`` (its default): ``--nx-sources`` source
  patches spread over the grid, ``t_graph + 196 * mean(t_source)``;
* the published ``edmonds_karp``: one source under a time limit (``--ek-limit``); when
  it does not finish, ``t_graph + 196 * limit`` is reported as a lower bound.

Where networkx finished, its flows are compared with AttentionFlow's (max |difference|).

Run: ``python benchmarks/bench_flow.py`` (real DeiT-Tiny from ../shared/assets, or
``--random`` for a randomly initialised one). Writes
``benchmarks/results/bench_flow.{csv,md}``.
"""

from __future__ import annotations

import argparse
import csv
import signal
import time
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import timm
import torch
from networkx.algorithms.flow import edmonds_karp, preflow_push
from torch import nn

from captum_vit import AttentionFlow, AttentionRollout
from captum_vit.models import load_default

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _load_model(random: bool) -> nn.Module:
    if random:
        return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    model, _, _ = load_default()
    return model


def _images(model: nn.Module, count: int) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    pics = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    return torch.stack([transform(Image.fromarray(pics[i % len(pics)])) for i in range(count)])


def _networkx_graph(caps: np.ndarray) -> nx.DiGraph:
    """Abnar & Zuidema's graph: all (layer, token) nodes, float capacities."""
    k_layers, n, _ = caps.shape
    g = nx.DiGraph()
    for k in range(k_layers):
        for i in range(n):
            for j in range(n):
                g.add_edge((k, j), (k + 1, i), capacity=float(caps[k, i, j]))
    return g


def _ratio(value: float, prefix: str = "") -> str:
    return f"{prefix}{value:.3g}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="images timed for AttentionFlow")
    parser.add_argument("--nx-sources", type=int, default=2, help="source patches timed with preflow_push")
    parser.add_argument(
        "--ek-limit", type=int, default=300,
        help="seconds allowed for one edmonds_karp source (the published solver)",
    )
    parser.add_argument("--random", action="store_true", help="random DeiT-Tiny weights")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = _load_model(args.random)
    x = _images(model, args.images)
    flow = AttentionFlow(model)
    rollout = AttentionRollout(model)

    rollout.attribute(x[:1])  # warm-up
    t0 = time.perf_counter()
    for i in range(args.images):
        rollout.attribute(x[i : i + 1])
    t_rollout = (time.perf_counter() - t0) / args.images

    t0 = time.perf_counter()
    ours = [flow.attribute(x[i : i + 1], return_patch_grid=True) for i in range(args.images)]
    t_ours = (time.perf_counter() - t0) / args.images
    print(f"rollout {t_rollout:.3f} s/image, AttentionFlow {t_ours:.3f} s/image", flush=True)

    # networkx on image 0, a fixed subset of sources spread over the grid
    caps = flow.capacities(x[:1])[0].double().numpy()
    t0 = time.perf_counter()
    graph = _networkx_graph(caps)
    t_graph = time.perf_counter() - t0
    print(f"networkx graph built in {t_graph:.2f} s", flush=True)
    n_tokens = caps.shape[-1]
    patches = n_tokens - 1
    sink = (caps.shape[0], 0)  # CLS at the last layer
    ours0 = ours[0].flatten()

    # networkx's fastest solver (preflow_push, its default): a few sources, extrapolated
    sources = np.linspace(0, patches - 1, args.nx_sources).round().astype(int)
    diffs = []
    t0 = time.perf_counter()
    for p in sources:
        value = nx.maximum_flow_value(graph, (0, int(p) + 1), sink, flow_func=preflow_push)
        diffs.append(abs(value - float(ours0[p])))
        print(f"preflow_push source {p}: {time.perf_counter() - t0:.1f} s cumulative", flush=True)
    t_pp = t_graph + patches * (time.perf_counter() - t0) / len(sources)

    # the published recipe (edmonds_karp): one source under a time limit
    def _alarm(_sig: int, _frame: Any) -> None:
        raise TimeoutError

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.ek_limit)
    t0 = time.perf_counter()
    try:
        value = nx.maximum_flow_value(graph, (0, int(sources[0]) + 1), sink, flow_func=edmonds_karp)
        signal.alarm(0)
        t_source = time.perf_counter() - t0
        diffs.append(abs(value - float(ours0[sources[0]])))
        ek_how = f"graph {t_graph:.2f} s + {patches} x {t_source:.1f} s/source (1 source timed)"
        bound = ""
    except TimeoutError:
        t_source = time.perf_counter() - t0
        ek_how = (
            f"one source did not finish in {t_source:.0f} s: lower bound "
            f"graph {t_graph:.2f} s + {patches} x {t_source:.0f} s"
        )
        bound = ">= "
    t_ek = t_graph + patches * t_source
    print(f"edmonds_karp: {ek_how}", flush=True)

    rows = [
        ("AttentionRollout (context)", f"{t_rollout:.3f}", "measured", t_pp / t_rollout, t_ek / t_rollout),
        ("AttentionFlow (captum_vit, scipy Dinic)", f"{t_ours:.3f}", "measured", t_pp / t_ours, t_ek / t_ours),
        (
            "networkx preflow_push (its default)",
            f"{t_pp:.1f}",
            f"graph {t_graph:.2f} s + {patches} x mean of {len(sources)} sources",
            1.0,
            t_ek / t_pp,
        ),
        ("networkx edmonds_karp (published recipe)", f"{bound}{t_ek:.0f}", ek_how, t_pp / t_ek, 1.0),
    ]
    weights = "random" if args.random else "real (ImageNet)"
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "bench_flow.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "seconds_per_image", "how", "preflow_push_over_method", "edmonds_karp_over_method"])
        for name, secs, how, r_pp, r_ek in rows:
            w.writerow([
                name, secs, how, _ratio(r_pp, "<= " if bound and r_ek == 1.0 else ""),
                _ratio(r_ek, bound if r_ek != 1.0 else ""),
            ])
    lines = [
        f"# Attention flow speed: DeiT-Tiny ({weights} weights), 224x224, 197 tokens, "
        f"12 layers, CPU, {args.threads} torch thread(s)",
        "",
        "| method | s / image | how | networkx preflow_push time / method time "
        "| networkx edmonds_karp time / method time |",
        "|---|---|---|---|---|",
        *[
            f"| {n} | {s} | {h} | {_ratio(a, '<= ' if bound and b == 1.0 else '')} "
            f"| {_ratio(b, bound if b != 1.0 else '')} |"
            for n, s, h, a, b in rows
        ],
        "",
        f"Speed-up of AttentionFlow: **{t_pp / t_ours:.0f}x** over networkx's fastest solver, "
        f"**{bound}{t_ek / t_ours:.0f}x** over the published edmonds_karp recipe. "
        f"Max |flow difference| vs networkx on the sources it solved: {max(diffs):.2e}.",
        "Command: `python benchmarks/bench_flow.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "random"
        )
        + (" --random" if args.random else "")
        + "`",
        "",
    ]
    (RESULTS / "bench_flow.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
