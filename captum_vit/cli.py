"""The ``captum-vit`` command: explain images, run the demo, analyse SIFT interrelation,
run the benchmarks.

Sub-commands::

    captum-vit explain IMAGE... --method rollout chefer --out results/
    captum-vit demo --out demo/
    captum-vit analyze IMAGE... --out report/
    captum-vit bench [bench options]

Exit codes (scripts can rely on them):

* ``0``: success;
* ``1``: runtime failure (the model or a method failed while running);
* ``2``: usage error or bad input (unknown option or method, an option value out of
  range for the model, ``--out`` a file where a folder is needed, missing, unreadable or
  too large image, target out of range, unknown or unsupported model, missing weights
  file, a hub model while offline and not in the local cache), one line, no traceback;
* ``130``: interrupted (Ctrl-C).

Every method comes from the one method registry, :mod:`captum_vit.registry`
(:data:`METHODS`, re-exported here): ``--method`` takes its names; old spellings
(``raw``, ``rollout``, ``grad-rollout``, ``chefer``, ``occlusion``) still work and print
a deprecation warning.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .registry import METHODS, MethodEntry, resolve_name

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "METHODS", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_DEMO_IMAGES = ("chelsea", "coffee", "astronaut")
_HEAD_FUSIONS = ("mean", "max", "min")


class CliUsageError(Exception):
    """Bad input from the user: reported without a traceback, exit code 2."""


# ---------------------------------------------------------------------------- registry
Explain = Callable[[Any, Any], Any]

#: Methods of ``captum-vit demo`` by default (one per method family; ``--methods``
#: takes any registry name).
_DEMO_METHODS = ("raw_attention", "rollout_mean", "grad_rollout", "grad_rollout_chefer", "patch_occlusion", "sift")


def __getattr__(name: str) -> Any:
    if name == "MethodSpec":
        warnings.warn(
            "captum_vit.cli.MethodSpec is deprecated: the CLI uses captum_vit.registry.MethodEntry",
            DeprecationWarning, stacklevel=2,
        )
        return MethodEntry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _method_choices() -> list[str]:
    """Registry names and their deprecated aliases (argparse choices)."""
    return [*METHODS, *(a for e in METHODS.values() for a in e.aliases)]


def _method_names(names: Sequence[str]) -> list[str]:
    """Registry names of ``--method`` values; deprecated aliases print a warning."""
    out = []
    for name in names:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out.append(resolve_name(name))
            except KeyError as err:
                raise CliUsageError(str(err.args[0])) from err
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------- helpers
def _progress(iterable: Any, enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, **kwargs)


def _check_images(paths: Sequence[str]) -> list[Path]:
    """Fail fast (exit 2) on missing, non-file, unreadable or too large images.

    Each image is read once by :func:`captum_vit.io.read_image` (the reader used
    later), so every problem it would hit is reported before the model loads.
    """
    from .io import read_image

    out = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise CliUsageError(f"image not found: {p}")
        if not p.is_file():
            raise CliUsageError(f"not a file: {p}")
        try:
            read_image(p)
        except (ValueError, OSError) as err:
            raise CliUsageError(str(err)) from err
        out.append(p)
    return out


def _check_parents(out: Path) -> None:
    parent = next((a for a in out.parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CliUsageError(f"--out {out}: {parent} is a file, not a directory")


def _check_out_dir(out: Path) -> None:
    """``--out`` must be a directory or a path where one can be made (exit 2 otherwise)."""
    if out.exists() and not out.is_dir():
        raise CliUsageError(f"--out {out} exists and is not a directory")
    _check_parents(out)


def _check_out_file(out: Path) -> None:
    """``--out FILE.png``: not a directory, and its folder can be made (exit 2 otherwise)."""
    if out.is_dir():
        raise CliUsageError(f"--out {out} is a directory; give FILE.png or a directory without .png")
    _check_parents(out)


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliUsageError(f"cannot create the output directory {path}: {err}") from err


def _check_model_options(opts: argparse.Namespace, adapter: Any, transform: Any) -> None:
    """Options whose valid range depends on the model (exit 2 when out of range)."""
    layers = int(adapter.num_layers)
    layer = getattr(opts, "layer", -1)
    if not -layers <= layer < layers:
        raise CliUsageError(
            f"--layer {layer} is out of range: the model has {layers} layers "
            f"(0..{layers - 1}, or -1..-{layers} from the end)"
        )
    size = getattr(transform, "input_size", None)
    if size is None:
        return
    ph, pw = adapter.patch_size
    gh, gw = int(size[0]) // ph, int(size[1]) // pw
    window = getattr(opts, "window", 1)
    if window > min(gh, gw):
        raise CliUsageError(
            f"--window {window} is larger than the model's {gh}x{gw} patch grid "
            f"({size[0]}x{size[1]} inputs, {ph}x{pw} patches)"
        )
    stride = getattr(opts, "stride", None)
    if stride is not None and stride > min(gh, gw):
        raise CliUsageError(f"--stride {stride} is larger than the model's {gh}x{gw} patch grid")


def _device(name: str) -> Any:
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise CliUsageError(f"invalid --device {name!r}: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliUsageError(f"--device {name} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CliUsageError(f"--device {name} requested but MPS is not available")
    return dev


def _load(opts: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    from .models import load_model

    if opts.weights is not None and not Path(opts.weights).is_file():
        raise CliUsageError(f"weights file not found: {opts.weights}")
    device = _device(opts.device)
    try:
        return load_model(opts.model, opts.weights, device=device)
    except (ValueError, FileNotFoundError) as err:
        raise CliUsageError(f"cannot load model {opts.model!r}: {err}") from err


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in p.stem) or "image"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}-{n}")
    return stems


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _short(name: str) -> str:
    return name.split(",")[0].strip()


def _figure_png(fig: Any, path: Path | None = None, dpi: int = 100) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = buf.getvalue()
    if path is not None:
        path.write_bytes(data)
    return data


def _explainers(
    names: Sequence[str], model: Any, transform: Any, opts: argparse.Namespace
) -> dict[str, Explain]:
    """``explain(x, target)`` per method, built from its registry entry with the
    command line's method options (each entry takes the keywords it declares)."""
    import torch

    from ._capture import resolve_adapter

    adapter = resolve_adapter(model, None)
    options = {
        "head_fusion": opts.head_fusion,
        "layer": opts.layer,
        "discard_ratio": opts.discard_ratio,
        "window": opts.window,
        "stride": opts.stride,
        "perturbations_per_eval": opts.perturbations_per_eval,
        "show_progress": opts.progress,
        "gamma": opts.gamma,
        "unnormalize": (transform.mean, transform.std),
    }
    options = {k: v for k, v in options.items() if v is not None}
    def bound(run: Any) -> Explain:
        return lambda x, t: run(x, t, torch.arange(x.shape[0]))

    return {name: bound(METHODS[name].build(model, adapter, options)) for name in names}


def _add_method_options(p: argparse.ArgumentParser, *, window: int = 1, stride: int | None = None) -> None:
    g = p.add_argument_group("method options")
    g.add_argument(
        "--head-fusion", choices=_HEAD_FUSIONS, default=None,
        help="how heads are fused for the attention methods (default: the method's own, mean "
        "except rollout_max / rollout_min)",
    )
    g.add_argument("--layer", type=int, default=-1, help="layer for raw attention, 0-based, negative from the end (default: -1)")
    g.add_argument(
        "--discard-ratio", type=float, default=0.0,
        help="fraction of smallest attention entries dropped per layer, rollout and grad-rollout (default: 0)",
    )
    g.add_argument("--window", type=int, default=window, help=f"occlusion window in patches (default: {window})")
    g.add_argument(
        "--stride", type=int, default=stride,
        help=f"occlusion stride in patches (default: {stride or 1})",
    )
    g.add_argument(
        "--perturbations-per-eval", type=int, default=32,
        help="occluded copies per forward pass for occlusion (default: 32)",
    )
    g.add_argument("--gamma", type=float, default=1.0, help="SIFT detection-line factor (default: 1.0)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and run options")
    g.add_argument(
        "--model", default="default",
        help="'default' (bundled DeiT-Tiny, offline), 'timm:NAME' or 'hf:NAME_OR_DIR' (default: default)",
    )
    g.add_argument("--weights", default=None, help="local weights (.safetensors, or a torch.save state dict)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    g.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _add_plot_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plot options")
    g.add_argument("--alpha", type=float, default=0.6, help="heat-map opacity in [0, 1] (default: 0.6)")
    g.add_argument("--blur-sigma", type=float, default=None, help="Gaussian blur of the map in pixels (default: none)")
    g.add_argument("--cmap", default="jet", help="matplotlib colormap (default: jet)")
    g.add_argument(
        "--normalize", choices=("minmax", "percentile"), default="minmax",
        help="how maps are scaled for display; percentile clips to the 1st-99th percentile (default: minmax)",
    )


def _validate_common(opts: argparse.Namespace) -> None:
    if opts.batch_size < 1:
        raise CliUsageError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if not 0.0 <= opts.alpha <= 1.0:
        raise CliUsageError(f"--alpha must be in [0, 1], got {opts.alpha}")
    if opts.blur_sigma is not None and not 0 <= opts.blur_sigma < math.inf:
        raise CliUsageError(f"--blur-sigma must be a finite number >= 0, got {opts.blur_sigma}")
    if not 0.0 <= opts.discard_ratio < 1.0:
        raise CliUsageError(f"--discard-ratio must be in [0, 1), got {opts.discard_ratio}")
    if opts.window < 1 or opts.perturbations_per_eval < 1 or (opts.stride is not None and opts.stride < 1):
        raise CliUsageError("--window, --stride and --perturbations-per-eval must be >= 1")
    if not 0 < opts.gamma < math.inf:
        raise CliUsageError(f"--gamma must be a finite number > 0, got {opts.gamma}")
    from matplotlib import colormaps

    if opts.cmap not in colormaps:
        raise CliUsageError(f"unknown --cmap {opts.cmap!r}")


# ---------------------------------------------------------------------------- explain
def _targets_for(opts: argparse.Namespace, probs: Any, num_classes: int) -> list[list[int]]:
    """Per image, the classes to explain."""
    if opts.target is not None:
        return [[opts.target] for _ in range(probs.shape[0])]
    k = opts.top_k or 1
    return [row.tolist() for row in probs.topk(k, dim=1).indices]


def _cmd_explain(opts: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .viz import overlay

    _validate_common(opts)
    methods = _method_names(opts.method)
    paths = _check_images(opts.images)
    out = Path(opts.out)
    single_file = out.suffix.lower() == ".png"
    if opts.target is not None and opts.target < 0:
        raise CliUsageError(f"--target must be >= 0, got {opts.target}")
    if opts.top_k is not None and opts.top_k < 1:
        raise CliUsageError(f"--top-k must be >= 1, got {opts.top_k}")
    if single_file and (len(paths) > 1 or len(methods) > 1 or (opts.top_k or 1) > 1):
        raise CliUsageError(
            "--out FILE.png takes one image, one method and one target; give a directory instead"
        )
    if single_file:
        _check_out_file(out)
    else:
        _check_out_dir(out)
    model, transform, names = _load(opts)
    num_classes = len(names)
    if opts.target is not None and opts.target >= num_classes:
        raise CliUsageError(f"--target {opts.target} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    if opts.top_k is not None and opts.top_k > num_classes:
        raise CliUsageError(f"--top-k {opts.top_k} exceeds the model's {num_classes} classes")
    device = next(model.parameters()).device
    from ._capture import resolve_adapter

    adapter = resolve_adapter(model, None)
    _check_model_options(opts, adapter, transform)
    explainers = _explainers(methods, model, transform, opts)
    _make_dir(out.parent if single_file else out)
    stems = _unique_stems(paths)
    records: list[dict[str, Any]] = []
    pairs = list(zip(paths, stems, strict=True))
    for batch in _progress(list(_batches(pairs, opts.batch_size)), opts.progress, desc="explain", unit="batch"):
        x = torch.stack([transform(p) for p, _ in batch]).to(device)
        with torch.no_grad():
            logits = adapter.forward(x).float()
        probs = logits.softmax(dim=1) if logits.shape[1] > 1 else logits
        targets = _targets_for(opts, probs, num_classes)
        for name in methods:
            spec = METHODS[name]
            rounds = max(len(t) for t in targets) if spec.class_specific else 1
            for r in range(rounds):
                t = torch.tensor([row[min(r, len(row) - 1)] for row in targets], device=device)
                maps = explainers[name](x, t).detach().float().cpu()
                for i, (path, stem) in enumerate(batch):
                    cls = int(t[i])
                    label = f"{_short(names[cls])} ({cls}), p={probs[i, cls]:.2f}"
                    if single_file:
                        png = out
                    else:
                        suffix = f"_class{cls}" if spec.class_specific else ""
                        png = out / f"{stem}_{name}{suffix}.png"
                    grid = maps[i, 0].numpy()
                    np.save(png.with_suffix(".npy"), grid)
                    title = f"{spec.title}: {label}" if spec.class_specific else f"{spec.title} (prediction: {label})"
                    fig = overlay(
                        transform.to_image(x[i]), maps[i], alpha=opts.alpha,
                        blur_sigma=opts.blur_sigma, cmap=opts.cmap, normalize=opts.normalize, title=title,
                    )
                    _figure_png(fig, png)
                    records.append(
                        {
                            "image": str(path), "method": name, "target": cls if spec.class_specific else None,
                            "predicted": int(probs[i].argmax()), "png": str(png),
                            "npy": str(png.with_suffix(".npy")), "grid": list(grid.shape),
                            "min": float(grid.min()), "max": float(grid.max()), "mean": float(grid.mean()),
                        }
                    )
        for i, (path, _) in enumerate(batch):
            top = probs[i].topk(min(3, num_classes))
            preds = ", ".join(f"{_short(names[int(c)])} ({int(c)}) {float(p):.2f}" for p, c in zip(top.values, top.indices, strict=True))
            print(f"{path}: {preds}")
    if not single_file:
        (out / "explain.json").write_text(json.dumps(records, indent=1))
    print(f"wrote {len(records)} overlay(s) and raw map(s) to {out}")
    return EXIT_OK


# ---------------------------------------------------------------------------- demo
def _demo_image(name: str) -> Any:
    from skimage import data

    return getattr(data, name)()


def _b64(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _cmd_demo(opts: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from matplotlib.figure import Figure

    from ._capture import resolve_adapter
    from .attr import RawAttention
    from .viz import layer_grid, overlay_array

    _validate_common(opts)
    start = time.perf_counter()
    methods = _method_names(opts.methods)
    for name in opts.images:
        if name not in _DEMO_IMAGES:
            raise CliUsageError(f"unknown demo image {name!r}; choose from {', '.join(_DEMO_IMAGES)}")
    out = Path(opts.out)
    _check_out_dir(out)
    model, transform, names = _load(opts)
    adapter = resolve_adapter(model, None)
    _check_model_options(opts, adapter, transform)
    _make_dir(out)
    device = next(model.parameters()).device
    explainers = _explainers(methods, model, transform, opts)
    raw_all = RawAttention(model, adapter=adapter)
    x = torch.stack([transform(_demo_image(n)) for n in opts.images]).to(device)
    with torch.no_grad():
        probs = adapter.forward(x).float().softmax(dim=1)
    target = probs.argmax(dim=1)
    maps: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for name in _progress(methods, opts.progress, desc="demo", unit="method"):
        t0 = time.perf_counter()
        maps[name] = explainers[name](x, target).detach().float().cpu()
        timings[name] = time.perf_counter() - t0
    layer_maps = raw_all.attention_maps(x).detach().float().cpu()

    sections = []
    np.savez(out / "maps.npz", **{f"{img}_{m}": maps[m][i, 0].numpy() for m in methods for i, img in enumerate(opts.images)})
    for i, img_name in enumerate(opts.images):
        rgb = transform.to_image(x[i])
        cols = len(methods) + 1
        fig = Figure(figsize=(2.6 * cols, 3.0), layout="constrained")
        axes = fig.subplots(1, cols, squeeze=False)[0]
        axes[0].imshow(rgb)
        axes[0].set_title("input", fontsize=10)
        for ax, name in zip(axes[1:], methods, strict=True):
            ax.imshow(overlay_array(rgb, maps[name][i], opts.alpha, opts.blur_sigma, opts.cmap, opts.normalize))
            ax.set_title(METHODS[name].title, fontsize=10)
        for ax in axes:
            ax.set_axis_off()
        cls = int(target[i])
        fig.suptitle(f"{img_name}: predicted {_short(names[cls])} ({cls}, p={probs[i, cls]:.2f})", fontsize=11)
        methods_png = _figure_png(fig, out / f"{img_name}_methods.png")
        layers_png = _figure_png(
            layer_grid(rgb, layer_maps[i], layers=sorted({0, max(layer_maps.shape[1] // 2 - 1, 0), layer_maps.shape[1] - 1}),
                       alpha=opts.alpha, blur_sigma=opts.blur_sigma, cmap=opts.cmap, normalize=opts.normalize),
            out / f"{img_name}_layers.png",
        )
        top = probs[i].topk(min(5, len(names)))
        rows = "".join(
            f"<tr><td>{int(c)}</td><td>{html.escape(names[int(c)])}</td><td>{float(p):.3f}</td></tr>"
            for p, c in zip(top.values, top.indices, strict=True)
        )
        sections.append(
            f"<h2>{html.escape(img_name)}</h2>\n<table><tr><th>class</th><th>name</th><th>p</th></tr>{rows}</table>\n"
            f'<h3>Every method (class-specific ones explain the predicted class)</h3>\n<img alt="{img_name} methods" src="{_b64(methods_png)}">\n'
            f'<h3>Raw attention of the first, a middle and the last layer</h3>\n<img alt="{img_name} layers" src="{_b64(layers_png)}">\n'
        )
    interrelation = ""
    if "sift" in methods:
        from .attr import SiftInterrelation
        from .viz import plot_interrelation

        res = SiftInterrelation(model, adapter=adapter, unnormalize=(transform.mean, transform.std)).analyze(x)
        png = _figure_png(plot_interrelation(res.summary()), out / "interrelation.png")
        interrelation = (
            "<h2>SIFT patch interrelation over the demo images</h2>\n"
            f"<p>{html.escape(str(res.stages))}</p>\n<img alt=\"interrelation\" src=\"{_b64(png)}\">\n"
        )
    elapsed = time.perf_counter() - start
    timing_rows = "".join(f"<tr><td>{m}</td><td>{timings[m]:.2f}</td></tr>" for m in methods)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>captum_vit demo</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}}
img{{max-width:100%;border:1px solid #ddd}} table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}</style></head><body>
<h1>captum_vit demo</h1>
<p>Model: {html.escape(opts.model)} ({html.escape(type(model).__name__)}), {len(opts.images)} image(s),
methods: {", ".join(METHODS[m].title for m in methods)}. Heat maps are min-max scaled per panel;
the raw maps are in <code>maps.npz</code>. Total time {elapsed:.1f} s on {html.escape(str(device))}.</p>
{"".join(sections)}{interrelation}
<h2>Time per method (all images, seconds)</h2><table><tr><th>method</th><th>s</th></tr>{timing_rows}</table>
</body></html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")
    (out / "demo.json").write_text(
        json.dumps(
            {
                "model": opts.model, "images": list(opts.images), "methods": methods,
                "predicted": {img: {"class": int(target[i]), "name": names[int(target[i])], "p": float(probs[i, target[i]])}
                              for i, img in enumerate(opts.images)},
                "seconds_per_method": timings, "total_seconds": elapsed,
            },
            indent=1,
        )
    )
    print(f"demo report: {out / 'index.html'} ({elapsed:.1f} s)")
    return EXIT_OK


# ---------------------------------------------------------------------------- analyze
def _cmd_analyze(opts: argparse.Namespace) -> int:
    import torch

    from .attr import SiftInterrelation
    from .interrelation import InterrelationSummary
    from .viz import overlay, plot_interrelation

    _validate_common(opts)
    paths = _check_images(opts.images)
    out = Path(opts.out)
    _check_out_dir(out)
    model, transform, _ = _load(opts)
    _make_dir(out)
    device = next(model.parameters()).device
    explainer = SiftInterrelation(model, gamma=opts.gamma, unnormalize=(transform.mean, transform.std))
    stems = _unique_stems(paths)
    kk, nk, focus = [], [], []
    per_image: list[dict[str, Any]] = []
    pairs = list(zip(paths, stems, strict=True))
    for batch in _progress(list(_batches(pairs, opts.batch_size)), opts.progress, desc="analyze", unit="batch"):
        x = torch.stack([transform(p) for p, _ in batch]).to(device)
        res = explainer.analyze(x)
        kk.append(res.kk.cpu())
        nk.append(res.nk.cpu())
        focus.append(res.focus_index.cpu())
        for i, (path, stem) in enumerate(batch):
            scores = res.patch_scores[i].reshape(res.grid).cpu()
            if opts.overlays:
                fig = overlay(
                    transform.to_image(x[i]), torch.nan_to_num(scores, nan=0.0)[None],
                    alpha=opts.alpha, blur_sigma=opts.blur_sigma, cmap=opts.cmap,
                    normalize=opts.normalize, title=f"{path.name}: SIFT patch scores",
                )
                _figure_png(fig, out / f"{stem}_sift_scores.png")
            per_image.append(
                {
                    "image": str(path),
                    "keypoints": int(res.keypoint_counts[i].sum()),
                    "kk_minus_nk_mean": float(torch.nanmean(res.kk[i] - res.nk[i])),
                    "focus_index_mean": float(torch.nanmean(res.focus_index[i])),
                }
            )
    summary = InterrelationSummary(
        kk=torch.nanmean(torch.cat(kk), 0), nk=torch.nanmean(torch.cat(nk), 0),
        focus_index=torch.nanmean(torch.cat(focus), 0), num_images=len(paths),
    )
    _figure_png(plot_interrelation(summary), out / "interrelation.png")
    (out / "interrelation.md").write_text(
        f"# SIFT patch interrelation ({len(paths)} image(s), model {opts.model})\n\n"
        f"Stages: {summary.stages}\n\n{summary.to_markdown()}\n"
    )
    import csv

    with open(out / "interrelation.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["layer", "head", "kk", "nk", "kn", "nn", "focus_index"])
        for layer in range(summary.kk.shape[0]):
            for head in range(summary.kk.shape[1]):
                writer.writerow([layer, head] + [
                    f"{float(v[layer, head]):.6f}"
                    for v in (summary.kk, summary.nk, summary.kn, summary.nn, summary.focus_index)
                ])
    (out / "summary.json").write_text(
        json.dumps(
            {"num_images": len(paths), "stages": {k: list(v) for k, v in summary.stages.as_dict().items()},
             "stages_text": str(summary.stages), "images": per_image},
            indent=1,
        )
    )
    print(f"stages: {summary.stages}")
    print(f"wrote the interrelation report for {len(paths)} image(s) to {out}")
    return EXIT_OK


# ---------------------------------------------------------------------------- bench
def _cmd_bench(argv: Sequence[str]) -> int:
    try:
        from .evaluation import bench_main
    except ImportError as err:
        print(f"captum-vit bench: the evaluation suite is not available ({err})", file=sys.stderr)
        return EXIT_FAILURE
    try:
        result = bench_main(list(argv))
    except SystemExit as exc:  # argparse errors (2), --help (0), explicit messages
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(f"captum-vit bench: error: {exc.code}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError) as err:  # bad paths or options of the suite
        print(f"captum-vit bench: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("captum-vit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("CAPTUM_VIT_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"captum-vit bench: failed: {err.__class__.__name__}: {err}", file=sys.stderr)
        return EXIT_FAILURE
    return int(result or 0)


# ---------------------------------------------------------------------------- parser
_EPILOG = """exit codes: 0 success, 1 runtime failure, 2 usage error or bad input
(missing, unreadable or too large image, unknown method, option value out of range,
target out of range, unknown or unsupported model, hub model offline and not cached),
130 interrupted. Set CAPTUM_VIT_DEBUG=1 to see tracebacks."""


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``PROG: error: ... (see PROG --help)``)."""

    def error(self, message: str) -> Any:  # argparse's signature returns NoReturn
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``captum-vit`` (all sub-commands).

    Returns:
        argparse.ArgumentParser: the parser; :func:`main` runs it.
    """
    from . import __version__

    parser = _Parser(
        prog="captum-vit",
        description="Explain Vision Transformers: attention maps, rollout, gradient rollout, "
        "patch occlusion and SIFT interrelation, as PNG overlays and raw maps.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"captum-vit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    ex = sub.add_parser(
        "explain", help="explain images with one or more methods",
        description="Explain each IMAGE with each --method. Writes a PNG overlay and the raw "
        "patch-grid map (.npy, float32, shape (gh, gw)) per image, method and target, plus "
        "explain.json listing them. With --out FILE.png (one image, method, target) writes "
        "FILE.png and FILE.npy.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    ex.add_argument(
        "--method", nargs="+", choices=_method_choices(), default=["rollout_mean"], metavar="METHOD",
        help=f"one or more of: {', '.join(METHODS)} (default: rollout_mean)",
    )
    tg = ex.add_mutually_exclusive_group()
    tg.add_argument("--target", type=int, default=None, metavar="K", help="class index to explain (default: the predicted class)")
    tg.add_argument("--top-k", type=int, default=None, metavar="N", help="explain each of the N most probable classes")
    ex.add_argument("--out", required=True, metavar="FILE_OR_DIR", help="output directory, or FILE.png for a single map")
    _add_model_options(ex)
    _add_method_options(ex)
    _add_plot_options(ex)
    ex.set_defaults(func=_cmd_explain)

    demo = sub.add_parser(
        "demo", help="every method on skimage's chelsea, coffee and astronaut, as an HTML report",
        description="Run every method on the bundled model (offline) and scikit-image's sample "
        "images; writes DIR/index.html (self-contained), one PNG per image, maps.npz and demo.json.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", required=True, metavar="DIR", help="report directory")
    demo.add_argument("--images", nargs="+", default=list(_DEMO_IMAGES), metavar="NAME", help=f"subset of {', '.join(_DEMO_IMAGES)}")
    demo.add_argument("--methods", nargs="+", choices=_method_choices(), default=list(_DEMO_METHODS), metavar="METHOD", help=f"methods of the registry (default: {' '.join(_DEMO_METHODS)})")
    _add_model_options(demo)
    _add_method_options(demo, window=2, stride=2)
    _add_plot_options(demo)
    demo.set_defaults(func=_cmd_demo)

    an = sub.add_parser(
        "analyze", help="SIFT patch-interrelation report (Wu et al.) over a set of images",
        description="SiftInterrelation over the images: per-layer and per-head KK/NK/KN/NN and "
        "focus index, the retrieval / capture / coach stages, a plot and per-image patch-score overlays.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    an.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    an.add_argument("--out", required=True, metavar="DIR", help="report directory")
    an.add_argument("--gamma", type=float, default=1.0, help="detection-line factor (default: 1.0)")
    an.add_argument("--no-overlays", dest="overlays", action="store_false", help="skip the per-image patch-score overlays")
    _add_model_options(an)
    _add_plot_options(an)
    an.set_defaults(func=_cmd_analyze, discard_ratio=0.0, window=1, stride=None, perturbations_per_eval=1)

    sub.add_parser(
        "bench", help="run the benchmark suite (options: captum-vit bench --help)", add_help=False,
    )
    return parser


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Show captum_vit's warnings about the user's input (small images) as one line."""
    from PIL import Image

    from .io import SmallImageWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", SmallImageWarning)
        # too large images are refused with one clear error line; PIL's warning is noise
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        previous = warnings.showwarning

        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(category, type) and issubclass(category, SmallImageWarning):
                print(f"captum-vit {command}: warning: {message}", file=sys.stderr)
            else:
                previous(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``captum-vit`` with ``argv`` (default: ``sys.argv[1:]``).

    Args:
        argv (Sequence[str], optional): the arguments. Default: None

    Returns:
        int: the exit code (0 ok, 1 runtime failure, 2 usage / bad input, 130
        interrupted).

    Example::

        >>> from captum_vit.cli import main
        >>> main(["explain", "cat.jpg", "--method", "rollout", "--out", "cat.png"])
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "bench":
        return _cmd_bench(args[1:])
    parser = build_parser()
    try:
        opts = parser.parse_args(args)
    except SystemExit as exc:  # argparse: 0 for --help/--version, 2 for usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    debug = os.environ.get("CAPTUM_VIT_DEBUG", "") not in ("", "0")
    from ._capture import UnsupportedModelError

    try:
        with _one_line_warnings(opts.command):
            return int(opts.func(opts))
    except CliUsageError as err:
        print(f"captum-vit {opts.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except UnsupportedModelError as err:
        print(f"captum-vit {opts.command}: error: unsupported model: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("captum-vit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        print(f"captum-vit {opts.command}: failed: {err.__class__.__name__}: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
