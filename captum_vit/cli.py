"""The ``captum-vit`` command: explain images, run the demo, analyse SIFT interrelation,
run the benchmarks.

Sub-commands::

    captum-vit explain IMAGE... --method rollout chefer --out results/
    captum-vit demo --out demo/
    captum-vit analyze IMAGE... --out report/
    captum-vit eval --data DIR --methods ... --out DIR [eval options]
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
import contextlib
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

from .registry import METHODS, MethodEntry, available_methods, resolve_name

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "METHODS", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_HEAD_FUSIONS = ("mean", "max", "min")

#: ``explain`` without ``--method`` (and the demo's first panel): the method that scores
#: best on the evaluation suite, ``benchmarks/results/eval_deit_tiny_500.md``.
DEFAULT_METHOD = "grad_rollout"
_DEFAULT_METHOD_WHY = (
    "best on the evaluation suite (bundled DeiT-Tiny, 500 ImageNet images + 14 VOC masks, "
    "benchmarks/results/eval_deit_tiny_500.md): perturbation AUC gap 25.5 (grad_rollout_chefer 24.0, "
    "rollout_mean 12.7, raw_attention 15.8, random -1.5) and VOC mIoU 64.2 (grad_rollout_chefer 63.9, "
    "rollout_mean 55.6)"
)
#: The command line's discard ratio of each rollout method when --discard-ratio is not
#: given, chosen on the bundled DeiT-Tiny by ``benchmarks/rollout_defaults.py``
#: (``benchmarks/results/rollout_defaults.md``); the classes keep DESIGN.md's 0.
ROLLOUT_DISCARD: dict[str, float] = {"rollout_mean": 0.9, "rollout_max": 0.9, "rollout_min": 0.0}
_ROLLOUT_WHY = (
    "Chosen on the bundled DeiT-Tiny (benchmarks/results/rollout_defaults.md; held-out 50 ImageNet "
    "images + 14 VOC masks): discard 0.9 lifts rollout_mean's AUC gap from 16.5 to 20.0 and VOC mIoU "
    "from 56.6 to 61.0 and makes its near-uniform map structured (entropy 0.994 -> 0.905, top-10%% "
    "mass 0.15 -> 0.36); rollout_max 11.1 -> 22.0 (mIoU 51.5 -> 62.3); rollout_min is best at 0 "
    "(gap 20.2, mIoU 63.9)"
)


class CliUsageError(Exception):
    """Bad input from the user: reported without a traceback, exit code 2."""


# ---------------------------------------------------------------------------- registry
Explain = Callable[[Any, Any], Any]



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
def _bars(opts: argparse.Namespace) -> bool:
    """Progress bars: not with --quiet / --no-progress, and only on a terminal."""
    from ._progress import terminal

    return bool(opts.progress) and not opts.quiet and terminal()


def _write(line: str) -> None:
    """A result line on stdout that does not break an open progress bar."""
    from ._progress import write

    write(line)


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
    options: dict[str, Any] = {
        "head_fusion": opts.head_fusion,
        "layer": opts.layer,
        "discard_ratio": opts.discard_ratio,
        "window": opts.window,
        "stride": opts.stride,
        "perturbations_per_eval": opts.perturbations_per_eval,
        "replacement": opts.occlusion_replacement,
        "show_progress": False,  # the command's own bar covers the task
        "gamma": opts.gamma,
        "unnormalize": (transform.mean, transform.std),
    }
    options = {k: v for k, v in options.items() if v is not None}
    if opts.discard_ratio is None:  # per-method keys win over the generic one
        options.update({f"{name}_discard_ratio": value for name, value in ROLLOUT_DISCARD.items()})
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
    rollout = ", ".join(f"{k} {v:g}" for k, v in ROLLOUT_DISCARD.items())
    g.add_argument(
        "--discard-ratio", type=float, default=None,
        help="fraction of smallest attention entries dropped per layer by the rollout methods, "
        f"grad_rollout and attention_flow (default: {rollout}, else 0). {_ROLLOUT_WHY}",
    )
    g.add_argument("--window", type=int, default=window, help=f"occlusion window in patches (default: {window})")
    g.add_argument(
        "--stride", type=int, default=stride,
        help=f"occlusion stride in patches (default: {stride or 1})",
    )
    g.add_argument(
        "--occlusion-replacement", choices=("drop", "mean", "zero"), default="drop",
        help="how occlusion removes a window's tokens: drop them from the sequence, replace them by the "
        "mean token, or zero them (default: drop, the evaluation suite's setting; zeroed tokens are out of "
        "distribution: on cat-and-coffee they make the cat's own patches count against 'Egyptian cat')",
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
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars (they show only on a terminal)")
    g.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors: no progress bars, no per-image lines")


def _add_plot_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plot options")
    g.add_argument("--alpha", type=float, default=0.6, help="heat-map opacity in [0, 1] (default: 0.6)")
    g.add_argument("--blur-sigma", type=float, default=None, help="Gaussian blur of the map in pixels (default: none)")
    g.add_argument(
        "--cmap", default="auto",
        help="matplotlib colormap, or 'auto': diverging RdBu_r centred at zero for signed maps "
        "(occlusion), sequential inferno for non-negative ones (default: auto)",
    )
    g.add_argument(
        "--normalize", choices=("auto", "minmax", "percentile", "rank"), default="auto",
        help="how maps are scaled for display: minmax; percentile clips to the 1st-99th percentile; "
        "rank spreads colours by percentile rank; auto = rank where min-max would paint most of the "
        "map hot (SIFT patch scores), else minmax; signed maps are centred at zero (default: auto)",
    )
    g.add_argument(
        "--upsample", choices=("bilinear", "bicubic", "nearest"), default="bilinear",
        help="patch grid to pixels: bilinear or bicubic (smooth) or nearest (patch edges) (default: bilinear)",
    )


def _validate_common(opts: argparse.Namespace) -> None:
    if opts.batch_size < 1:
        raise CliUsageError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if not 0.0 <= opts.alpha <= 1.0:
        raise CliUsageError(f"--alpha must be in [0, 1], got {opts.alpha}")
    if opts.blur_sigma is not None and not 0 <= opts.blur_sigma < math.inf:
        raise CliUsageError(f"--blur-sigma must be a finite number >= 0, got {opts.blur_sigma}")
    if opts.discard_ratio is not None and not 0.0 <= opts.discard_ratio < 1.0:
        raise CliUsageError(f"--discard-ratio must be in [0, 1), got {opts.discard_ratio}")
    if opts.window < 1 or opts.perturbations_per_eval < 1 or (opts.stride is not None and opts.stride < 1):
        raise CliUsageError("--window, --stride and --perturbations-per-eval must be >= 1")
    if not 0 < opts.gamma < math.inf:
        raise CliUsageError(f"--gamma must be a finite number > 0, got {opts.gamma}")
    from matplotlib import colormaps

    if opts.cmap != "auto" and opts.cmap not in colormaps:
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
    from ._progress import progress

    for batch in progress(list(_batches(pairs, opts.batch_size)), desc="explain", unit="batch", enabled=_bars(opts)):
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
                        upsample=opts.upsample,
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
            if not opts.quiet:
                _write(f"{path}: {preds}")
    if not single_file:
        (out / "explain.json").write_text(json.dumps(records, indent=1))
    if not opts.quiet:
        _write(f"wrote {len(records)} overlay(s) and raw map(s) to {out}")
    return EXIT_OK


# ---------------------------------------------------------------------------- demo
#: Display scaling per method in the demo when ``--normalize auto``: SIFT patch scores
#: crowd near their maximum, so min-max would paint most patches hot.
_DEMO_NORMALIZE = {"sift": "rank"}


def _cmd_demo(opts: argparse.Namespace) -> int:
    from . import _demo
    from ._capture import resolve_adapter

    _validate_common(opts)
    start = time.perf_counter()
    methods = _method_names(opts.methods) if opts.methods is not None else available_methods()
    methods.sort(key=lambda m: m != DEFAULT_METHOD)  # the best-scoring method first
    named = [n for n in opts.images if n in _demo.BUILTIN_IMAGES]
    files = [n for n in opts.images if n not in _demo.BUILTIN_IMAGES]
    for name in files:
        if not Path(name).exists() and Path(name).suffix == "":
            raise CliUsageError(
                f"unknown demo image {name!r}: neither one of {', '.join(_demo.BUILTIN_IMAGES)} nor an image file"
            )
    paths = _check_images(files)
    out = Path(opts.out)
    _check_out_dir(out)
    model, transform, names = _load(opts)
    adapter = resolve_adapter(model, None)
    _check_model_options(opts, adapter, transform)
    _make_dir(out)
    stems = iter(_unique_stems([Path(n) for n in named] + paths)[len(named):])
    images = [
        _demo.builtin_image(n) if n in _demo.BUILTIN_IMAGES else _demo.file_image(Path(n), next(stems))
        for n in opts.images
    ]
    explainers = _explainers(methods, model, transform, opts)
    summary = _demo.run_demo(
        model=model, adapter=adapter, transform=transform, class_names=names,
        images=images,
        methods=[
            _demo.DemoMethod(m, METHODS[m].title, METHODS[m].class_specific, explainers[m], _DEMO_NORMALIZE.get(m, "auto"))
            for m in methods
        ],
        out=out,
        plot={"alpha": opts.alpha, "blur_sigma": opts.blur_sigma, "cmap": opts.cmap,
              "normalize": opts.normalize, "upsample": opts.upsample},
        model_label=opts.model, progress_enabled=_bars(opts),
    )
    if not opts.quiet:
        for img, res in summary["results"].items():
            tg = ", ".join(f"{_short(t['name'])} ({t['class']}) {t['p']:.2f}" for t in res["targets"])
            _write(f"{img}: targets {tg}")
        _write(f"demo report: {out / 'index.html'} ({time.perf_counter() - start:.1f} s)")
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
    from ._progress import progress

    for batch in progress(list(_batches(pairs, opts.batch_size)), desc="analyze", unit="batch", enabled=_bars(opts)):
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
                    normalize="rank" if opts.normalize == "auto" else opts.normalize,
                    upsample=opts.upsample, title=f"{path.name}: SIFT patch scores",
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
    if not opts.quiet:
        _write(f"stages: {summary.stages}")
        _write(f"wrote the interrelation report for {len(paths)} image(s) to {out}")
    return EXIT_OK


# ---------------------------------------------------------------------------- eval
def _guarded(command: str, run: Callable[[], Any], usage: tuple[type[Exception], ...] = ()) -> int:
    """Run one command and turn what it raises into the documented exit codes.

    Usage errors (``CliUsageError``, ``UnsupportedModelError``, the ``usage`` types,
    ``SystemExit`` with a message) print one line and give 2; Ctrl-C gives 130; any
    other exception prints one line and gives 1 (with its traceback when
    ``CAPTUM_VIT_DEBUG=1``).
    """
    from ._capture import UnsupportedModelError

    usage_errors: tuple[type[Exception], ...] = (CliUsageError, *usage)
    try:
        return int(run() or 0)
    except SystemExit as exc:  # argparse: 0 for --help, 2 for usage errors; or a message
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(f"captum-vit {command}: error: {exc.code}", file=sys.stderr)
        return EXIT_USAGE
    except UnsupportedModelError as err:
        print(f"captum-vit {command}: error: unsupported model: {err}", file=sys.stderr)
        return EXIT_USAGE
    except usage_errors as err:
        print(f"captum-vit {command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("captum-vit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("CAPTUM_VIT_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"captum-vit {command}: failed: {err.__class__.__name__}: {err}", file=sys.stderr)
        return EXIT_FAILURE


def _cmd_eval(argv: Sequence[str]) -> int:
    def run() -> int:
        from ._eval_cli import eval_main

        return eval_main(list(argv))

    return _guarded("eval", run)


# ---------------------------------------------------------------------------- bench
def _cmd_bench(argv: Sequence[str]) -> int:
    def run() -> int:
        from ._eval_cli import bench_main

        return int(bench_main(list(argv)) or 0)

    # bad paths or options of the suite are usage errors
    return _guarded("bench", run, usage=(FileNotFoundError, ValueError))


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
        "--method", nargs="+", choices=_method_choices(), default=[DEFAULT_METHOD], metavar="METHOD",
        help=f"one or more of: {', '.join(METHODS)} (default: {DEFAULT_METHOD}, {_DEFAULT_METHOD_WHY})",
    )
    tg = ex.add_mutually_exclusive_group()
    tg.add_argument("--target", type=int, default=None, metavar="K", help="class index to explain (default: the predicted class)")
    tg.add_argument("--top-k", type=int, default=None, metavar="N", help="explain each of the N most probable classes")
    ex.add_argument("--out", required=True, metavar="FILE_OR_DIR", help="output directory, or FILE.png for a single map")
    _add_model_options(ex)
    _add_method_options(ex)
    _add_plot_options(ex)
    ex.set_defaults(func=_cmd_explain)

    from ._demo import BUILTIN_IMAGES, DEFAULT_IMAGES

    demo = sub.add_parser(
        "demo", help="every method, two target classes per image, as an HTML report (offline)",
        description="Run every method on the bundled model (offline) and the demo images: "
        "cat-and-coffee (scikit-image's chelsea beside coffee: 'Egyptian cat' and 'espresso' in one "
        "picture), chelsea, coffee, or your own image files. Class-specific methods explain two "
        "targets per image side by side (each half's class for cat-and-coffee, else the top-2 "
        "classes). Writes DIR/index.html (self-contained), the PNGs, maps.npz and demo.json.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", required=True, metavar="DIR", help="report directory")
    demo.add_argument(
        "--images", nargs="+", default=list(DEFAULT_IMAGES), metavar="NAME_OR_FILE",
        help=f"built-in images ({', '.join(BUILTIN_IMAGES)}) and/or image files (default: {' '.join(DEFAULT_IMAGES)})",
    )
    demo.add_argument(
        "--methods", nargs="+", choices=_method_choices(), default=None, metavar="METHOD",
        help=f"methods of the registry (default: every available one; {DEFAULT_METHOD} is drawn first: "
        f"{_DEFAULT_METHOD_WHY})",
    )
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
    an.set_defaults(
        func=_cmd_analyze, occlusion_replacement="drop", discard_ratio=None, window=1, stride=None, perturbations_per_eval=1
    )

    sub.add_parser(
        "eval", help="evaluate methods on your model and image folder (options: captum-vit eval --help)",
        add_help=False,
    )
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
    if args and args[0] == "eval":
        return _cmd_eval(args[1:])
    parser = build_parser()
    try:
        opts = parser.parse_args(args)
    except SystemExit as exc:  # argparse: 0 for --help/--version, 2 for usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE

    def run() -> int:
        with _one_line_warnings(opts.command):
            return int(opts.func(opts))

    return _guarded(opts.command, run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
