"""Speed benchmark behind ``captum-vit bench --speed`` and ``benchmarks/bench_speed.py``.

Times every method of the registry (:mod:`captum_vit.registry`), Captum's own
perturbation methods where they overlap (``Occlusion`` with patch-sized windows,
``FeatureAblation`` with a patch feature mask) and installed peers (pytorch-grad-cam,
torchxai-explain, daam-timm-vit; each skipped with the reason when it is missing or
fails) on the bundled DeiT-Tiny, all in one run. Calls are interleaved round-robin
over ``--repeats`` rounds (after one warm-up call each) and the median is kept, so
that load from other processes affects every entry alike; the table reports ratios
to a plain forward pass and, for peers, to the comparable captum_vit method. Where
both produce a map, the Pearson correlation of the peer's map (pooled to the patch
grid) with captum_vit's says whether they compute the same thing.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._capture import adapt
from .models import load_default
from .registry import METHODS, available_methods

__all__: list[str] = []


def _chelsea(transform: Callable[[Any], Tensor], batch: int) -> Tensor:
    from PIL import Image
    from skimage import data

    x = transform(Image.fromarray(data.chelsea())).unsqueeze(0)
    return x.repeat(batch, 1, 1, 1)


def _to_grid(m: Any, grid: tuple[int, int]) -> Tensor:
    t = torch.as_tensor(m).detach().float().cpu()
    while t.ndim < 4:
        t = t.unsqueeze(0)
    t = t.mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(t, grid)[:, 0]


def _corr(a: Tensor, b: Tensor) -> float:
    x, y = a.flatten().double(), b.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    den = (x.norm() * y.norm()).item()
    return float((x @ y).item() / den) if den > 0 else float("nan")


def _bind(explain: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, t: Tensor, idx: Tensor) -> Callable[[], Tensor]:
    return lambda: explain(x, t, idx)


class _Entry:
    def __init__(self, name: str, group: str, fn: Callable[[], Any], compare: str | None = None) -> None:
        self.name, self.group, self.fn, self.compare = name, group, fn, compare
        self.times: list[float] = []
        self.output: Any = None
        self.error: str | None = None


def _peer_entries(model: nn.Module, x: Tensor, target: int, wanted: set[str] | None, skipped: list[str]) -> list[_Entry]:
    """Entries for the pip-installable peers that import and run here."""
    entries: list[_Entry] = []

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    if want("grad-cam"):
        try:
            from pytorch_grad_cam import GradCAM
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            prefix = int(getattr(model, "num_prefix_tokens", 1))

            def reshape(t: Tensor) -> Tensor:
                p = t[:, prefix:, :]
                side = int(p.shape[1] ** 0.5)
                return p.reshape(p.shape[0], side, side, p.shape[2]).permute(0, 3, 1, 2)

            blocks: Any = model.blocks
            targets = [ClassifierOutputTarget(target)] * x.shape[0]

            def run_gradcam() -> Any:
                # hooks are released on exit: they must not slow down the other entries
                with GradCAM(model=model, target_layers=[blocks[-1].norm1], reshape_transform=reshape) as cam:
                    return cam(input_tensor=x, targets=targets)

            entries.append(_Entry("grad-cam GradCAM (reshape_transform)", "peer", run_gradcam, "vit_gradcam"))
        except Exception as exc:
            skipped.append(f"grad-cam: {type(exc).__name__}: {exc}")
    if want("torchxai-explain"):
        try:
            from torchxai.methods.attention_rollout import AttentionRollout as TxRollout
            from torchxai.methods.transformer_attribution import TransformerAttribution

            if x.shape[0] != 1:
                raise ValueError("torchxai explains one image per call (batch 1 only)")
            roll = TxRollout(model, head_fusion="mean", discard_ratio=0.0)
            ta = TransformerAttribution(model)
            entries.append(_Entry("torchxai AttentionRollout (mean, no discard)", "peer",
                                  lambda: roll(x, target_class=target), "rollout_mean"))
            entries.append(_Entry("torchxai TransformerAttribution", "peer",
                                  lambda: ta(x, target_class=target), "grad_rollout_chefer"))
        except Exception as exc:
            skipped.append(f"torchxai-explain: {type(exc).__name__}: {exc}")
    if want("daam-timm-vit"):
        try:
            from daam import DAAM

            def run_daam() -> Tensor:
                # DAAM keeps fused attention off and its hooks on until closed
                with DAAM(model) as daam:
                    return daam(x, target=target).maps[:, -1]

            entries.append(_Entry("daam-timm-vit DAAM", "peer", run_daam, "grad_rollout_chefer"))
        except Exception as exc:
            skipped.append(f"daam-timm-vit: {type(exc).__name__}: {exc}")
    return entries


def speed_benchmark(args: argparse.Namespace) -> str:
    """Run the speed benchmark; write ``<out>/<name>.csv``; return a Markdown report."""
    from captum.attr import FeatureAblation, Occlusion


    if args.threads:
        torch.set_num_threads(args.threads)
    model, transform, _ = load_default()
    model = model.to(args.device).eval()
    x = _chelsea(transform, args.speed_batch).to(args.device)
    with torch.no_grad():
        target = int(model(x[:1]).argmax())
    t = torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
    idx = torch.arange(x.shape[0])
    adapter = adapt(model)
    grid = adapter.grid_size(x)
    ph, pw = adapter.patch_size

    entries: list[_Entry] = []

    def forward() -> Tensor:
        with torch.no_grad():
            return model(x)

    entries.append(_Entry("forward", "baseline", forward))
    names = args.methods.split(",") if args.methods else available_methods()
    for n in names:
        options: dict[str, Any] = {"occlusion_window": 1, "occlusion_replacement": "zero"}
        explain = METHODS[n].build(model, adapter, options)
        entries.append(_Entry(n, "captum_vit", _bind(explain, x, t, idx)))
        if n == "patch_occlusion":
            drop = METHODS[n].build(model, adapter, {"occlusion_window": 1, "occlusion_replacement": "drop"})
            entries.append(_Entry("patch_occlusion (drop)", "captum_vit", _bind(drop, x, t, idx)))
    occ = Occlusion(model)
    fab = FeatureAblation(model)
    patch_ids = torch.arange(grid[0] * grid[1], device=x.device).reshape(1, 1, *grid)
    feature_mask = patch_ids.repeat_interleave(ph, 2).repeat_interleave(pw, 3)
    compare_occ = "patch_occlusion" if "patch_occlusion" in names else None

    def captum_occlusion() -> Tensor:
        with torch.no_grad():
            return occ.attribute(x, sliding_window_shapes=(3, ph, pw), strides=(3, ph, pw),
                                 baselines=0.0, target=t, perturbations_per_eval=16)

    def captum_ablation() -> Tensor:
        with torch.no_grad():
            return fab.attribute(x, baselines=0.0, target=t, feature_mask=feature_mask,
                                 perturbations_per_eval=16)

    entries.append(_Entry("captum Occlusion (16x16 windows)", "captum", captum_occlusion, compare_occ))
    entries.append(_Entry("captum FeatureAblation (patch mask)", "captum", captum_ablation, compare_occ))
    skipped: list[str] = []
    if args.peers != "none":
        wanted = None if args.peers == "all" else set(args.peers.split(","))
        entries += _peer_entries(model, x, target, wanted, skipped)

    for rnd in range(args.repeats + 1):  # round 0 is the warm-up
        for e in entries:
            if e.error is not None:
                continue
            try:
                t0 = time.perf_counter()
                out = e.fn()
                if args.device != "cpu":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            except Exception as exc:
                e.error = f"{type(exc).__name__}: {exc}"
                continue
            if rnd == 0:
                e.output = out
            else:
                e.times.append(dt)

    by_name = {e.name: e for e in entries}
    fwd = statistics.median(by_name["forward"].times)
    rows: list[dict[str, Any]] = []
    for e in entries:
        if e.error is not None:
            skipped.append(f"{e.name}: {e.error}")
            continue
        sec = statistics.median(e.times)
        row: dict[str, Any] = {"method": e.name, "group": e.group, "seconds": sec, "x_forward": sec / fwd,
                               "compared_with": "", "x_captum_vit": float("nan"), "map_corr": float("nan")}
        other = by_name.get(e.compare) if e.compare else None
        if other is not None and other.error is None and other.times:
            row["compared_with"] = other.name
            row["x_captum_vit"] = sec / statistics.median(other.times)
            try:
                row["map_corr"] = _corr(_to_grid(e.output, grid), _to_grid(other.output, grid))
            except Exception:
                pass
        rows.append(row)

    out = Path(args.out)
    stem = args.name or "speed_deit_tiny"
    cols = ["method", "group", "seconds", "x_forward", "compared_with", "x_captum_vit", "map_corr"]
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    lines = [
        f"Speed of captum_vit methods vs Captum and peers: bundled DeiT-Tiny, batch "
        f"{x.shape[0]}, {tuple(x.shape[-2:])} input, device {args.device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds. "
        "x_forward = time / plain forward; x_captum_vit = time / the compared captum_vit "
        "method (>1: captum_vit is faster); map_corr = Pearson correlation of the two maps "
        "on the patch grid. Absolute seconds depend on machine load; compare ratios.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                cells.append("–" if v != v else (f"{v:.4f}" if c == "seconds" else f"{v:.2f}"))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Not measured:"] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"
