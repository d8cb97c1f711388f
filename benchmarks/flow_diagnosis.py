"""Why AttentionFlow scores below the random map in the perturbation test.

On the bundled DeiT-Tiny, AttentionFlow's negative-minus-positive perturbation AUC is
below the random map's (``eval_deit_tiny_flow.md``). Two explanations are tested here
on a fixed subset of the shared ImageNet sample (every ``--stride``-th image):

1. **Ties.** Many patches saturate at the query's capacity (flow 1.0); the
   perturbation test breaks ties in patch (raster) order. If ties decide the result,
   breaking them randomly or in reverse raster order changes the AUCs a lot.
2. **The minimum cut sits at the source.** Patch ``j``'s flow can never exceed its
   out-capacity into the first layer, ``c_j = Σ_i Ã_0[i, j]`` (how much attention the
   patch *receives* in the first layer, plus the residual), nor the query's capacity
   1, so ``flow_j ≤ min(c_j, 1)``. If equality holds for most patches, the map is
   "first-layer attention received, capped at 1": a property of max-flow on this
   model, not of the implementation (which matches networkx to 1e-6 in the tests).
   Then ``min(c_j, 1)`` alone must reproduce flow's AUCs.

For each image it records the fraction of saturated patches, the fraction where
``flow = min(c, 1)`` (to 1e-5), Spearman correlations of the flow map with ``c``,
rollout and Chefer's map, and positive / negative perturbation AUCs (token zeroing,
top-1 accuracy against the label, as ``captum-vit bench --eval``) for: flow with the
suite's raster tie-break, flow with random and with reverse-raster tie-breaks,
``min(c, 1)`` (random tie-break), rollout (mean) and the random map. With ``--voc``
it also scores the same maps on the VOC images with ground-truth masks: foreground
attention fraction (FAF, Das & Huddar) and the pointing game, as the suite does.
Writes ``benchmarks/results/flow_diagnosis.md``. Run from the repository root::

    python benchmarks/flow_diagnosis.py --stride 25 --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from captum_vit import AttentionFlow, AttentionRollout, GradientRollout, adapt
from captum_vit.evaluation import ImageFolderWithLabels, MaskedImages
from captum_vit.metrics import foreground_fraction, perturbation_curve, pointing_game
from captum_vit.models import load_default

ROOT = Path(__file__).resolve().parents[1]
SATURATED = 1e-6
CUT_TOL = 1e-5


def _tie_break(scores: Tensor, perm: Tensor) -> Tensor:
    """Ranks (as float scores, higher = more relevant) ordering ``scores`` (B, P)
    by value, ties broken by the order of patches in ``perm`` (B, P): among equal
    scores, the patch earlier in ``perm`` ranks as more relevant."""
    shuffled = scores.gather(1, perm)
    order = torch.argsort(-shuffled, dim=1, stable=True)  # most relevant first
    patches = perm.gather(1, order)
    ranks = torch.empty_like(scores)
    p = scores.shape[1]
    ranks.scatter_(1, patches, torch.arange(p, 0, -1, dtype=scores.dtype).expand_as(scores).contiguous())
    return ranks


def _source_bound(flow_m: AttentionFlow, x: Tensor, patches: int) -> tuple[Tensor, Tensor]:
    """``(c, min(c, 1))``, both ``(B, P)``: each patch's out-capacity into the first
    layer (column sum of ``Ã_0`` over all tokens) and the flow bound it gives."""
    caps = flow_m.capacities(x)  # (B, L, N, N)
    received = caps[:, 0, :, caps.shape[-1] - patches :].sum(1)
    return received, received.clamp(max=1.0)


def _spearman(a: Tensor, b: Tensor) -> Tensor:
    """Per-row Spearman correlation of (B, P) tensors (average ranks not needed for
    continuous maps; ties get their positional rank)."""
    ra = torch.argsort(torch.argsort(a, dim=1), dim=1).double()
    rb = torch.argsort(torch.argsort(b, dim=1), dim=1).double()
    ra -= ra.mean(1, keepdim=True)
    rb -= rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagenet", type=Path, default=ROOT.parent / "shared" / "assets" / "imagenet-sample")
    parser.add_argument("--stride", type=int, default=25, help="every k-th image of the 500 (25: 20 images)")
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--voc", type=Path, default=None, help="VOC folder with index.csv (e.g. ../shared/assets/voc2012-samples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "flow_diagnosis.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, transform, _ = load_default()
    adapter = adapt(model)
    flow_m = AttentionFlow(model, adapter=adapter)
    rollout_m = AttentionRollout(model, adapter=adapter)
    chefer_m = GradientRollout(model, variant="chefer", adapter=adapter)
    data = ImageFolderWithLabels(args.imagenet, transform, stride=args.stride)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    gen = torch.Generator().manual_seed(args.seed)
    stats: dict[str, list[Tensor]] = defaultdict(list)
    aucs: dict[str, dict[str, list[Tensor]]] = defaultdict(lambda: defaultdict(list))
    t0 = time.perf_counter()
    for batch in loader:
        x, labels = batch["image"], batch["label"]
        b = x.shape[0]
        with torch.no_grad():
            pred = adapter.forward(x).argmax(1)
        flow = flow_m.attribute(x, return_patch_grid=True).flatten(1).double()  # (B, P)
        received, bound = (t.double() for t in _source_bound(flow_m, x, flow.shape[1]))
        rollout = rollout_m.attribute(x, return_patch_grid=True).flatten(1).double()
        chefer = chefer_m.attribute(x, target=pred, return_patch_grid=True).flatten(1).double()
        stats["saturated"].append((flow >= 1.0 - SATURATED).double().mean(1))
        stats["tied_with_max"].append((flow >= flow.max(1, keepdim=True).values - SATURATED).double().mean(1))
        stats["flow_eq_min_c_1"].append(((flow - bound).abs() <= CUT_TOL).double().mean(1))
        stats["flow_le_min_c_1"].append((flow <= bound + CUT_TOL).double().mean(1))
        stats["spearman_flow_c"].append(_spearman(flow, received))
        stats["spearman_flow_rollout"].append(_spearman(flow, rollout))
        stats["spearman_flow_chefer"].append(_spearman(flow, chefer))
        p = flow.shape[1]
        raster = torch.arange(p).expand(b, p)
        random_perm = torch.stack([torch.randperm(p, generator=gen) for _ in range(b)])
        maps = {
            "flow (raster tie-break, as the suite)": flow,
            "flow (random tie-break)": _tie_break(flow, random_perm),
            "flow (reverse-raster tie-break)": _tie_break(flow, raster.flip(1)),
            "min(c, 1) (random tie-break)": _tie_break(bound, random_perm),
            "rollout mean": rollout,
            "random map": torch.rand(b, p, generator=gen, dtype=torch.float64),
        }
        for name, m in maps.items():
            grid = m.float().view(b, 1, *adapter.grid_size(x))
            for order in ("positive", "negative"):
                _, auc = perturbation_curve(model, x, grid, pred, order=order, labels=labels, adapter=adapter)
                aucs[name][order].append(auc)
        print(f"{len(torch.cat(stats['saturated']))} images, {time.perf_counter() - t0:.0f} s", flush=True)

    n = len(torch.cat(stats["saturated"]))
    lines = [
        "# AttentionFlow below the random map: ties or a property?",
        "",
        f"Produced by `python benchmarks/flow_diagnosis.py --stride {args.stride} --batch-size {args.batch_size}"
        f"{f' --threads {args.threads}' if args.threads else ''}{f' --voc {args.voc}' if args.voc else ''}` on {n} shared ImageNet images "
        f"(every {args.stride}th), bundled DeiT-Tiny, AttentionFlow defaults (mean fusion, residual 0.5), "
        f"{time.perf_counter() - t0:.0f} s. `c_j` = patch j's out-capacity into the first layer "
        "(first-layer attention it receives, with the residual), the bound `flow_j <= min(c_j, 1)`.",
        "",
        "| statistic (mean over images) | value |",
        "|---|---|",
    ]
    for k, v in stats.items():
        lines.append(f"| {k} | {torch.cat(v).mean().item():.3f} |")
    lines += [
        "",
        "Perturbation AUCs (token zeroing, top-1 accuracy vs label, x100):",
        "",
        "| map | positive | negative | neg - pos |",
        "|---|---|---|---|",
    ]
    for name, d in aucs.items():
        pos, neg = torch.cat(d["positive"]).mean().item() * 100, torch.cat(d["negative"]).mean().item() * 100
        lines.append(f"| {name} | {pos:.2f} | {neg:.2f} | {neg - pos:.2f} |")
    if args.voc is not None:
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        voc = torch.utils.data.DataLoader(MaskedImages(args.voc, transform, cfg), batch_size=args.batch_size)
        scores: dict[str, dict[str, list[Tensor]]] = defaultdict(lambda: defaultdict(list))
        count = 0
        for batch in voc:
            x, mask = batch["image"], batch["mask"]
            b = x.shape[0]
            count += b
            flow = flow_m.attribute(x, return_patch_grid=True)
            bound = _source_bound(flow_m, x, flow[0].numel())[1].view_as(flow)
            maps = {
                "flow": flow,
                "min(c, 1)": bound,
                "rollout mean": rollout_m.attribute(x, return_patch_grid=True),
                "random map": torch.rand(flow.shape, generator=gen),
            }
            for name, m in maps.items():
                up = torch.nn.functional.interpolate(m, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
                faf, _ = foreground_fraction(m, mask, 0.5, ignore_index=255)
                scores[name]["faf"].append(faf)
                scores[name]["pointing"].append(pointing_game(up, mask, ignore_index=255))
        lines += [
            "",
            f"On the {count} VOC images with ground-truth masks (`--voc {args.voc}`): foreground "
            "attention fraction and pointing game (%), as in `captum-vit bench --eval`:",
            "",
            "| map | FAF | pointing |",
            "|---|---|---|",
        ]
        for name, d in scores.items():
            faf_v = torch.cat(d["faf"]).double().nanmean().item()
            pt = torch.cat(d["pointing"]).double().nanmean().item() * 100
            lines.append(f"| {name} | {faf_v:.3f} | {pt:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
