"""Speed and memory benchmark behind ``captum-vit bench --speed`` and
``benchmarks/bench_peers.py`` (``benchmarks/bench_speed.py`` is the same command).

Speed: every method of the registry (:mod:`captum_vit.registry`) is paired with a
plain fused forward pass and with every installed peer that does the same job
(torchxai-explain's AttentionRollout and TransformerAttribution, daam-timm-vit's
DAAM, pytorch-grad-cam's GradCAM; Captum's ``Occlusion`` / ``FeatureAblation`` for
patch occlusion with ``--occlusion``). Each round times the two members of every
pair back to back (the order alternating between rounds, one warm-up round first),
and the table reports the median over rounds of the *paired* ratio, with its
interquartile range, so that load from other processes cancels out of the ratio.
Models: the bundled DeiT-Tiny at batch 1 (``--speed-model deit_tiny``) or a ViT-B/16
with random weights (``--speed-model vit_b16``, e.g. ``--speed-batch 8``).

Memory (``--memory``): each entry runs once in a fresh process; its peak resident
memory above the resident memory just before the call (``VmHWM`` reset through
``/proc/self/clear_refs``; glibc's mmap threshold fixed so that freed tensors leave
the process) is compared with a plain fused forward + backward pass (to the input).
Peers that materialise every layer's attention run on ViT-B/16 only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._capture import adapt
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


class _Entry:
    def __init__(self, name: str, group: str, fn: Callable[[], Any], note: str = "") -> None:
        self.name, self.group, self.fn, self.note = name, group, fn, note
        self.output: Any = None
        self.error: str | None = None

    def run(self, device: str) -> float:
        t0 = time.perf_counter()
        out = self.fn()
        if device != "cpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if self.output is None:
            self.output = out
        return dt


def _speed_model(name: str, batch: int, device: str) -> tuple[nn.Module, Tensor, str]:
    """(model, inputs, description) of a speed configuration."""
    if name == "deit_tiny":
        from .models import load_default

        model, transform, _ = load_default()
        x = _chelsea(transform, batch)
        desc = "bundled DeiT-Tiny (real weights)"
    elif name == "vit_b16":
        import timm

        torch.manual_seed(0)
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        desc = "timm vit_base_patch16_224 (random weights)"
    else:
        raise ValueError(f"--speed-model must be deit_tiny or vit_b16, got {name!r}")
    return model.to(device).eval(), x.to(device), desc


def _peer_entries(
    model: nn.Module, x: Tensor, target: int, wanted: set[str] | None, skipped: list[str]
) -> list[tuple[_Entry, list[str]]]:
    """Peers that import and run here, each with the captum_vit methods it is paired with."""
    entries: list[tuple[_Entry, list[str]]] = []

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

            entries.append((_Entry("grad-cam GradCAM", "peer", run_gradcam,
                                   "reshape_transform on blocks[-1].norm1"), ["vit_gradcam"]))
        except Exception as exc:
            skipped.append(f"grad-cam: {type(exc).__name__}: {exc}")
    if want("torchxai-explain"):
        try:
            from torchxai.methods.attention_rollout import AttentionRollout as TxRollout
            from torchxai.methods.transformer_attribution import TransformerAttribution

            roll = TxRollout(model, head_fusion="mean", discard_ratio=0.0)
            ta = TransformerAttribution(model)
            note = "" if x.shape[0] == 1 else (
                f"one call on the batch of {x.shape[0]}: it computes every sample but returns "
                "sample 0's map (its API explains one image per call)"
            )
            entries.append((_Entry("torchxai AttentionRollout", "peer",
                                   lambda: roll(x, target_class=target), ("mean, no discard. " + note).strip()),
                            ["rollout_mean"]))
            entries.append((_Entry("torchxai TransformerAttribution", "peer",
                                   lambda: ta(x, target_class=target), note),
                            ["grad_rollout", "grad_rollout_chefer"]))
        except Exception as exc:
            skipped.append(f"torchxai-explain: {type(exc).__name__}: {exc}")
    if want("daam-timm-vit"):
        try:
            from daam import DAAM

            def run_daam() -> Tensor:
                # DAAM keeps fused attention off and its hooks on until closed
                with DAAM(model) as daam:
                    return daam(x, target=target).maps[:, -1]

            entries.append((_Entry("daam-timm-vit DAAM", "peer", run_daam), ["grad_rollout_chefer"]))
        except Exception as exc:
            skipped.append(f"daam-timm-vit: {type(exc).__name__}: {exc}")
    return entries


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def speed_benchmark(args: argparse.Namespace) -> str:
    """Run the paired speed benchmark; write ``<out>/<name>.csv``; return Markdown."""
    from captum.attr import FeatureAblation, Occlusion

    if args.threads:
        torch.set_num_threads(args.threads)
    model_name = getattr(args, "speed_model", "deit_tiny")
    model, x, desc = _speed_model(model_name, args.speed_batch, args.device)
    with torch.no_grad():
        target = int(model(x[:1]).argmax())
    t = torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
    idx = torch.arange(x.shape[0])
    adapter = adapt(model)
    grid = adapter.grid_size(x)
    ph, pw = adapter.patch_size
    occlusion = bool(getattr(args, "occlusion", False))

    def forward() -> Tensor:
        with torch.no_grad():
            return model(x)

    def forward_backward() -> Tensor:
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xg).gather(1, t[:, None]).sum(), xg)
        return grad

    base = _Entry("forward (fused, no grad)", "baseline", forward)
    base_fb = _Entry("forward+backward (fused, grad to input)", "baseline", forward_backward)
    ours: dict[str, _Entry] = {}
    if args.methods:
        names = args.methods.split(",")
    else:
        names = [n for n in available_methods() if n not in ("random", "attention_flow", "sift")]
        if not occlusion:
            names = [n for n in names if n != "patch_occlusion"]
    for n in names:
        options: dict[str, Any] = {"occlusion_window": 1, "occlusion_replacement": "zero",
                                   "perturbations_per_eval": 16}
        explain = METHODS[n].build(model, adapter, options)
        ours[n] = _Entry(n, "captum_vit", _bind(explain, x, t, idx))
    others: list[tuple[_Entry, list[str]]] = []
    if occlusion and "patch_occlusion" in ours:
        occ, fab = Occlusion(model), FeatureAblation(model)
        patch_ids = torch.arange(grid[0] * grid[1], device=x.device).reshape(1, 1, *grid)
        feature_mask = patch_ids.repeat_interleave(ph, 2).repeat_interleave(pw, 3)

        def captum_occlusion() -> Tensor:
            with torch.no_grad():
                return occ.attribute(x, sliding_window_shapes=(3, ph, pw), strides=(3, ph, pw),
                                     baselines=0.0, target=t, perturbations_per_eval=16)

        def captum_occlusion_default() -> Tensor:
            with torch.no_grad():
                return occ.attribute(x, sliding_window_shapes=(3, ph, pw), strides=(3, ph, pw),
                                     baselines=0.0, target=t)

        def captum_ablation() -> Tensor:
            with torch.no_grad():
                return fab.attribute(x, baselines=0.0, target=t, feature_mask=feature_mask,
                                     perturbations_per_eval=16)

        others.append((_Entry("captum Occlusion", "captum", captum_occlusion,
                              "16x16-pixel windows, pixels set to 0, perturbations_per_eval=16"),
                       ["patch_occlusion"]))
        others.append((_Entry("captum FeatureAblation", "captum", captum_ablation,
                              "patch feature mask, perturbations_per_eval=16"), ["patch_occlusion"]))
        # what a user gets by default: Captum's perturbations_per_eval=1 against the
        # captum_vit registry / CLI default of 16 (not the equal-batching claim above)
        others.append((_Entry("captum Occlusion, its default perturbations_per_eval=1", "captum-default",
                              captum_occlusion_default,
                              "user defaults, NOT equal batching: Captum's default "
                              "perturbations_per_eval=1 vs captum_vit's registry / CLI default 16"),
                       ["patch_occlusion"]))
    skipped: list[str] = []
    if args.peers != "none":
        wanted = None if args.peers == "all" else set(args.peers.split(","))
        others += _peer_entries(model, x, target, wanted, skipped)

    # pairs: (captum_vit method, the other entry); the forward pass pairs with every method
    pairs: list[tuple[_Entry, _Entry]] = [(e, base) for e in ours.values()]
    pairs += [(ours[n], base_fb) for n in ("grad_rollout_chefer", "grad_rollout", "vit_gradcam") if n in ours]
    for other, matched in others:
        pairs += [(ours[m], other) for m in matched if m in ours]
    ratios: dict[tuple[str, str], list[float]] = {(a.name, b.name): [] for a, b in pairs}
    seconds: dict[str, list[float]] = {}
    load_before = os.getloadavg()[0]
    for rnd in range(args.repeats + 1):  # round 0 is the warm-up
        for i, (a, b) in enumerate(pairs):
            if a.error is not None or b.error is not None:
                continue
            times: dict[str, float] = {}
            for e in ((a, b) if (rnd + i) % 2 == 0 else (b, a)):
                try:
                    times[e.name] = e.run(args.device)
                except Exception as exc:
                    e.error = f"{type(exc).__name__}: {exc}"
                    break
            if rnd == 0 or len(times) < 2:
                continue
            ratios[(a.name, b.name)].append(times[b.name] / times[a.name])
            for name, dt in times.items():
                seconds.setdefault(name, []).append(dt)
    load_after = os.getloadavg()[0]

    rows: list[dict[str, Any]] = []
    for a, b in pairs:
        for e in (a, b):
            if e.error is not None:
                msg = f"{e.name}: {e.error}"
                if msg not in skipped:
                    skipped.append(msg)
        vals = ratios[(a.name, b.name)]
        if not vals:
            continue
        lo, med, hi = _quartiles(vals)
        corr = float("nan")
        if b.group != "baseline":
            try:
                ga, gb = _to_grid(a.output, grid), _to_grid(b.output, grid)
                if ga.shape != gb.shape:  # a peer that returns sample 0's map only
                    ga, gb = ga[:1], gb[:1]
                corr = _corr(ga, gb)
            except Exception:
                corr = float("nan")
        rows.append({
            "method": a.name, "compared_with": b.name, "group": b.group,
            "method_s": statistics.median(seconds[a.name]), "other_s": statistics.median(seconds[b.name]),
            "ratio": med, "ratio_q1": lo, "ratio_q3": hi, "rounds": len(vals), "map_corr": corr,
            "note": b.note,
        })

    out = Path(args.out)
    stem = args.name or f"speed_{model_name}"
    cols = ["method", "compared_with", "group", "method_s", "other_s", "ratio", "ratio_q1",
            "ratio_q3", "rounds", "map_corr", "note"]
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    lines = [
        f"Paired speed of captum_vit methods: {desc}, batch {x.shape[0]}, "
        f"{tuple(x.shape[-2:])} input, device {args.device}, {torch.get_num_threads()} torch "
        f"thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
        f"{args.repeats} rounds after one warm-up round, 1-minute load average "
        f"{load_before:.1f} before and {load_after:.1f} after.",
        "",
        "Each round times the method and the entry it is compared with back to back (order "
        "alternating). `ratio` = median over rounds of (other's time / method's time), with "
        "the interquartile range: for peers and Captum, **ratio > 1 means captum_vit is "
        "faster**; against a baseline it is baseline / method (so 1 / ratio is the "
        "method's cost in plain forward passes, or in plain forward + backward passes for "
        "the gradient methods' second baseline row). Seconds are medians and depend on the load; "
        "compare ratios. map_corr = Pearson correlation of the two maps on the patch grid.",
        "",
        "| method | compared with | method s | other s | ratio (other / method) | IQR | "
        "cost in baselines | map_corr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cost_cell = f"{1.0 / r['ratio']:.3f}" if r["group"] == "baseline" else ""
        corr_cell = "–" if r["map_corr"] != r["map_corr"] else f"{r['map_corr']:.2f}"
        lines.append(
            f"| {r['method']} | {r['compared_with']} | {r['method_s']:.4f} | {r['other_s']:.4f} | "
            f"{r['ratio']:.3f} | {r['ratio_q1']:.3f}–{r['ratio_q3']:.3f} | {cost_cell} | {corr_cell} |"
        )
    notes = [f"- {r['compared_with']}: {r['note']}" for r in rows if r["note"]]
    if notes:
        lines += ["", "Peers' settings:", *sorted(set(notes))]
    if skipped:
        lines += ["", "Not measured:", *[f"- {s}" for s in skipped]]
    return "\n".join(lines) + "\n"


def _bind(explain: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, t: Tensor, idx: Tensor) -> Callable[[], Tensor]:
    return lambda: explain(x, t, idx)


# ---------------------------------------------------------------------------- memory
#: (model label, timm name, depth, image size, batch) of the memory configurations
_MEMORY_MODELS: dict[str, tuple[str, int | None, int, int]] = {
    "vit_b16": ("vit_base_patch16_224", None, 224, 1),
    "vit_l14_518_d12": ("vit_large_patch14_dinov2", 12, 518, 1),
    "vit_l14_518_d24": ("vit_large_patch14_dinov2", 24, 518, 1),
}
_MEMORY_ENTRIES = ("forward_backward", "grad_rollout_chefer", "grad_rollout", "all_layers_at_once",
                   "daam-timm-vit", "torchxai TransformerAttribution")


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _all_layers_at_once(model: nn.Module, x: Tensor, target: int) -> Tensor:
    """The previous GradientRollout (Chefer): unfused capture of every layer, the
    gradients of all of them at once, then the product from the first layer up."""
    adapter = adapt(model)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        with adapter.capture(keep=True) as rec:
            scores = adapter.forward(xg)
        attns = rec.kept()
        grads = torch.autograd.grad(scores[:, target].sum(), attns)
    n = attns[0].shape[-1]
    r = torch.eye(n).expand(x.shape[0], n, n)
    for a, g in zip(attns, grads, strict=True):
        r = r + torch.bmm((g.float() * a.detach().float()).clamp(min=0).mean(dim=1), r)
    return r


def _memory_worker(spec: str) -> dict[str, Any]:
    """Run one memory entry in this (fresh) process; return its figures."""
    import timm

    label, entry = spec.split(":", 1)
    name, depth, size, batch = _MEMORY_MODELS[label]
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 1000, "img_size": size}
    if depth is not None:
        kwargs["depth"] = depth
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(batch, 3, size, size)
    target = 1
    if entry == "forward_backward":
        def run() -> Any:
            xg = x.detach().requires_grad_(True)
            return torch.autograd.grad(model(xg)[:, target].sum(), xg)
    elif entry in ("grad_rollout_chefer", "grad_rollout"):
        from .attr import GradientRollout

        gr = GradientRollout(model, variant="chefer" if entry.endswith("chefer") else "rollout")

        def run() -> Any:
            return gr.attribute(x, target=target, return_patch_grid=True)
    elif entry == "all_layers_at_once":
        def run() -> Any:
            return _all_layers_at_once(model, x, target)
    elif entry == "daam-timm-vit":
        from daam import DAAM

        def run() -> Any:
            with DAAM(model) as daam:
                return daam(x, target=target).maps[:, -1]
    elif entry == "torchxai TransformerAttribution":
        from torchxai.methods.transformer_attribution import TransformerAttribution

        ta = TransformerAttribution(model)

        def run() -> Any:
            return ta(x, target_class=target)
    else:
        raise ValueError(f"unknown memory entry {entry!r}")
    heads = int(model.blocks[0].attn.num_heads)  # type: ignore[union-attr,index]
    tokens = int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)  # type: ignore[union-attr,arg-type]
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident size
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = run()
    dt = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    del out
    return {"model": label, "timm": name, "depth": len(model.blocks), "size": size,  # type: ignore[arg-type]
            "batch": batch, "heads": heads, "tokens": tokens, "entry": entry,
            "peak_mb": (peak - rss0) / 1024, "seconds": dt,
            "attn_map_mb": batch * heads * tokens * tokens * 4 / 2**20}


def memory_benchmark(args: argparse.Namespace) -> str:
    """Peak memory of GradientRollout and peers vs a plain fused forward + backward."""
    labels = (args.memory_models or "vit_b16,vit_l14_518_d12,vit_l14_518_d24").split(",")
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # fixed threshold: freed tensors leave the process
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    for label in labels:
        entries = [e for e in _MEMORY_ENTRIES if label == "vit_b16" or e not in (
            "daam-timm-vit", "torchxai TransformerAttribution")]
        if label == "vit_l14_518_d24":  # the previous implementation needs ~8 GB there
            entries = [e for e in entries if e != "all_layers_at_once"]
        for entry in entries:
            proc = subprocess.run(
                [sys.executable, "-c", "import sys, json; from captum_vit._speed import _memory_worker; "
                 "print('RESULT ' + json.dumps(_memory_worker(sys.argv[1])))", f"{label}:{entry}"],
                capture_output=True, text=True, env=env, check=False,
            )
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                skipped.append(f"{label} {entry}: {tail}")
                continue
            results.append(json.loads(line[0][len("RESULT "):]))
    out = Path(args.out)
    stem = args.name or "memory_peers"
    cols = ["model", "timm", "depth", "size", "batch", "heads", "tokens", "entry", "peak_mb",
            "excess_mb", "attn_map_mb", "seconds"]
    base = {r["model"]: r["peak_mb"] for r in results if r["entry"] == "forward_backward"}
    for r in results:
        r["excess_mb"] = r["peak_mb"] - base[r["model"]] if r["model"] in base else float("nan")
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in results:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in cols})
    lines = [
        "Peak resident memory of one call above the resident memory just before it (model, "
        "inputs and imports excluded), one fresh process per entry, CPU, batch "
        f"{results[0]['batch'] if results else 1}, float32, random weights. "
        "`forward_backward` = a plain forward pass with timm's fused attention and the "
        "gradient of the target score w.r.t. the input; `excess` = peak - that baseline's "
        "peak; `attn map` = one layer's attention probabilities (B x heads x N x N float32). "
        "`all_layers_at_once` = the previous GradientRollout (unfused capture, every "
        "layer's gradient at once).",
        "",
        "| model | depth | tokens | entry | peak MB | excess MB | excess / attn map | attn map MB | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r["excess_mb"] / r["attn_map_mb"]
        lines.append(
            f"| {r['timm']} @ {r['size']} | {r['depth']} | {r['tokens']} | {r['entry']} | "
            f"{r['peak_mb']:.0f} | {r['excess_mb']:.0f} | {ratio:.2f} | {r['attn_map_mb']:.0f} | "
            f"{r['seconds']:.1f} |"
        )
    if skipped:
        lines += ["", "Not measured:", *[f"- {s}" for s in skipped]]
    return "\n".join(lines) + "\n"
