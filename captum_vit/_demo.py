"""Content of ``captum-vit demo``: the showcase images, the figures and the HTML report.

The command line (:mod:`captum_vit.cli`) parses options, loads the model and builds the
explainers; this module runs them on the demo images and writes the report:

* ``cat-and-coffee``: scikit-image's ``chelsea`` beside ``coffee`` on one white canvas,
  so that one picture holds two ImageNet classes ("Egyptian cat" and "espresso" on the
  bundled DeiT-Tiny). Its two targets are the classes the model gives each half alone.
* any other image (scikit-image's ``chelsea``, ``coffee``, ``astronaut`` or a file): the
  two most probable classes.

For each image: every class-specific method for both targets side by side (one row per
target), every class-agnostic method once, and raw attention of three layers; each panel
has a colour bar in the map's raw units. The page comes from the Jinja2 template
``templates/demo.html.j2``.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__: list[str] = []

#: Images the demo knows by name (``captum-vit demo --images NAME ...``).
BUILTIN_IMAGES = ("cat-and-coffee", "chelsea", "coffee", "astronaut")
#: Images of a plain ``captum-vit demo``.
DEFAULT_IMAGES = ("cat-and-coffee", "chelsea", "coffee")

Explain = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class DemoMethod:
    """One method as the demo runs it.

    Attributes:
        name (str): the ``--method`` name.
        title (str): the panel title.
        class_specific (bool): whether the map depends on the target.
        explain (Callable): ``explain(x, target) -> (B, 1, gh, gw)``.
        normalize (str): display scaling (``"auto"``, ``"minmax"``, ``"percentile"``,
            ``"rank"``; see :func:`captum_vit.viz.normalize_map`).
    """

    name: str
    title: str
    class_specific: bool
    explain: Explain
    normalize: str = "auto"


@dataclass(frozen=True)
class DemoImage:
    """A picture of the demo and how its two targets are chosen."""

    name: str
    stem: str
    image: np.ndarray  # (H, W, 3) uint8
    parts: tuple[np.ndarray, ...] = ()  # sub-pictures whose top-1 classes are the targets
    credit: str = ""


def _square(arr: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(arr).convert("RGB")
    w, h = im.size
    m = min(w, h)
    left, top = (w - m) // 2, (h - m) // 2
    return np.asarray(im.crop((left, top, left + m, top + m)).resize((size, size), Image.Resampling.BICUBIC))


def composite(left: np.ndarray, right: np.ndarray, size: int = 224) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Two pictures side by side, centred on a white square canvas.

    Each picture is centre-cropped to a square of ``size`` pixels; the canvas is
    ``2·size`` square, so a model's centre crop keeps both whole.

    Args:
        left (numpy.ndarray): ``(H, W, 3)`` uint8.
        right (numpy.ndarray): ``(H, W, 3)`` uint8.
        size (int, optional): side of each picture in pixels. Default: 224

    Returns:
        tuple: the canvas ``(2·size, 2·size, 3)`` uint8 and its two halves
        ``(2·size, size, 3)`` (each picture on its half of the canvas).
    """
    a, b = _square(left, size), _square(right, size)
    canvas = np.full((2 * size, 2 * size, 3), 255, dtype=np.uint8)
    canvas[size // 2 : size // 2 + size, :size] = a
    canvas[size // 2 : size // 2 + size, size:] = b
    return canvas, (canvas[:, :size], canvas[:, size:])


def builtin_image(name: str) -> DemoImage:
    """A demo image by name (see :data:`BUILTIN_IMAGES`)."""
    from skimage import data

    if name == "cat-and-coffee":
        canvas, parts = composite(data.chelsea(), data.coffee())
        return DemoImage(name, name, canvas, parts, "scikit-image's chelsea and coffee")
    if name not in BUILTIN_IMAGES:
        raise ValueError(f"unknown demo image {name!r}")
    return DemoImage(name, name, np.asarray(getattr(data, name)()), (), f"scikit-image's {name}")


def file_image(path: Path, stem: str) -> DemoImage:
    """A demo image from a file."""
    from .io import read_image

    return DemoImage(str(path), stem, np.asarray(read_image(path)), (), str(path))


def _png(fig: Any, path: Path, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = buf.getvalue()
    path.write_bytes(data)
    return data


def _b64(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _short(name: str) -> str:
    return name.split(",")[0].strip()


def _targets(model_forward: Callable[[Any], Any], transform: Any, images: Sequence[DemoImage], probs: Any) -> list[list[int]]:
    """Two classes per image: each part's top-1 (composites) or the top-2 predictions."""
    import torch

    out = []
    for i, img in enumerate(images):
        if img.parts:
            xs = torch.stack([transform(p) for p in img.parts]).to(probs.device)
            with torch.no_grad():
                tops = model_forward(xs).argmax(dim=1).tolist()
            if len(set(tops)) == len(tops):
                out.append([int(t) for t in tops])
                continue
        out.append([int(c) for c in probs[i].topk(min(2, probs.shape[1])).indices])
    return out


def run_demo(
    *,
    model: Any,
    adapter: Any,
    transform: Any,
    class_names: Sequence[str],
    images: Sequence[DemoImage],
    methods: Sequence[DemoMethod],
    out: Path,
    plot: dict[str, Any],
    model_label: str,
    progress_enabled: bool,
) -> dict[str, Any]:
    """Run every method on every image and write ``out/index.html`` and its files.

    Args:
        model (nn.Module): the ViT.
        adapter (ViTAdapter): its adapter.
        transform (ImageTransform): preprocessing with ``to_image``.
        class_names (Sequence[str]): class names.
        images (Sequence[DemoImage]): the pictures.
        methods (Sequence[DemoMethod]): the methods, in display order.
        out (Path): the report folder (exists).
        plot (dict): ``alpha``, ``blur_sigma``, ``cmap``, ``normalize``, ``upsample``
            for :func:`captum_vit.viz.overlay` (``normalize="auto"`` defers to the
            method's own display scaling).
        model_label (str): the model as the user named it.
        progress_enabled (bool): draw a progress bar.

    Returns:
        dict: the summary written to ``demo.json``.
    """
    import torch
    from matplotlib.figure import Figure

    from . import __version__
    from ._progress import progress
    from .attr import RawAttention
    from .viz import layer_grid, overlay

    start = time.perf_counter()
    device = next(model.parameters()).device
    x = torch.stack([transform(img.image) for img in images]).to(device)
    with torch.no_grad():
        probs = adapter.forward(x).float().softmax(dim=1)
    targets = _targets(adapter.forward, transform, images, probs)
    rounds = max(len(t) for t in targets)
    maps: dict[tuple[str, int], Any] = {}
    timings: dict[str, float] = {}
    steps = sum(rounds if m.class_specific else 1 for m in methods) + 1
    with progress(total=steps, desc="demo", unit="map", enabled=progress_enabled) as bar:
        for m in methods:
            t0 = time.perf_counter()
            for r in range(rounds if m.class_specific else 1):
                bar.set_postfix_str(m.name)
                t = torch.tensor([row[min(r, len(row) - 1)] for row in targets], device=device)
                maps[(m.name, r)] = m.explain(x, t).detach().float().cpu()
                bar.update(1)
            timings[m.name] = time.perf_counter() - t0
        layer_maps = RawAttention(model, adapter=adapter).attention_maps(x).detach().float().cpu()
        bar.update(1)

    def panel(ax: Any, rgb: np.ndarray, grid: Any, m: DemoMethod, title: str) -> None:
        normalize = plot["normalize"] if plot["normalize"] != "auto" else m.normalize
        overlay(
            rgb, grid, alpha=plot["alpha"], blur_sigma=plot["blur_sigma"], cmap=plot["cmap"],
            normalize=normalize, upsample=plot["upsample"], title=title, ax=ax,
        )

    specific = [m for m in methods if m.class_specific]
    agnostic = [m for m in methods if not m.class_specific]
    np.savez(
        out / "maps.npz",
        **{
            (f"{img.stem}_{m.name}_class{targets[i][r]}" if m.class_specific else f"{img.stem}_{m.name}"):
                maps[(m.name, r)][i, 0].numpy()
            for m in methods for r in range(rounds if m.class_specific else 1) for i, img in enumerate(images)
        },
    )
    sections = []
    summary_images: dict[str, Any] = {}
    for i, img in enumerate(images):
        rgb = transform.to_image(x[i])
        tg = targets[i]
        labels = [f"{_short(class_names[c])} ({c}), p={float(probs[i, c]):.2f}" for c in tg]
        files: dict[str, str] = {}
        if specific:
            cols = 1 + len(specific)
            fig = Figure(figsize=(3.1 * cols, 2.9 * len(tg)), layout="constrained")
            axes = fig.subplots(len(tg), cols, squeeze=False)
            for r in range(len(tg)):
                axes[r, 0].imshow(rgb)
                axes[r, 0].set_axis_off()
                axes[r, 0].set_title(
                    f"target: {_short(class_names[tg[r]])}\nclass {tg[r]}, p={float(probs[i, tg[r]]):.2f}", fontsize=9
                )
                for c, m in enumerate(specific, start=1):
                    panel(axes[r, c], rgb, maps[(m.name, r)][i], m, f"{m.title}\n{_short(class_names[tg[r]])}")
            files["targets"] = f"{img.stem}_targets.png"
            targets_png = _png(fig, out / files["targets"])
        if agnostic:
            cols = min(1 + len(agnostic), 5)
            rows = -(-(1 + len(agnostic)) // cols)
            fig = Figure(figsize=(3.1 * cols, 2.9 * rows), layout="constrained")
            cells = list(fig.subplots(rows, cols, squeeze=False).ravel())
            for ax in cells[1 + len(agnostic) :]:
                ax.set_axis_off()
            cells[0].imshow(rgb)
            cells[0].set_axis_off()
            pred = int(probs[i].argmax())
            cells[0].set_title(f"predicted: {_short(class_names[pred])}\nclass {pred}, p={float(probs[i, pred]):.2f}", fontsize=9)
            for ax, m in zip(cells[1 : 1 + len(agnostic)], agnostic, strict=True):
                panel(ax, rgb, maps[(m.name, 0)][i], m, f"{m.title}\n(any class)")
            files["agnostic"] = f"{img.stem}_agnostic.png"
            agnostic_png = _png(fig, out / files["agnostic"])
        n_layers = layer_maps.shape[1]
        files["layers"] = f"{img.stem}_layers.png"
        layers_png = _png(
            layer_grid(
                rgb, layer_maps[i], layers=sorted({0, max(n_layers // 2 - 1, 0), n_layers - 1}),
                alpha=plot["alpha"], blur_sigma=plot["blur_sigma"], cmap=plot["cmap"],
                normalize=plot["normalize"],
            ),
            out / files["layers"],
        )
        top = probs[i].topk(min(5, probs.shape[1]))
        sections.append(
            {
                "name": img.name, "credit": img.credit,
                "top": [(int(c), class_names[int(c)], f"{float(p):.3f}") for p, c in zip(top.values, top.indices, strict=True)],
                "targets": labels,
                "composite": bool(img.parts),
                "targets_png": _b64(targets_png) if specific else None,
                "agnostic_png": _b64(agnostic_png) if agnostic else None,
                "layers_png": _b64(layers_png),
            }
        )
        summary_images[img.name] = {
            "predicted": {"class": int(probs[i].argmax()), "name": class_names[int(probs[i].argmax())],
                          "p": float(probs[i].max())},
            "targets": [{"class": c, "name": class_names[c], "p": float(probs[i, c])} for c in tg],
            "files": files,
        }
    interrelation_png, stages = None, ""
    if any(m.name == "sift" for m in methods):
        from .attr import SiftInterrelation
        from .viz import plot_interrelation

        res = SiftInterrelation(model, adapter=adapter, unnormalize=(transform.mean, transform.std)).analyze(x)
        interrelation_png = _b64(_png(plot_interrelation(res.summary()), out / "interrelation.png"))
        stages = str(res.stages)
    elapsed = time.perf_counter() - start
    page = _render_page(
        interrelation_png=interrelation_png, interrelation_stages=stages,
        version=__version__, model=model_label, model_class=type(model).__name__, device=str(device),
        methods=[{"name": m.name, "title": m.title, "class_specific": m.class_specific,
                  "seconds": f"{timings[m.name]:.2f}"} for m in methods],
        sections=sections, elapsed=f"{elapsed:.1f}", first=methods[0].title if methods else "",
    )
    (out / "index.html").write_text(page, encoding="utf-8")
    summary = {
        "model": model_label, "images": [img.name for img in images], "methods": [m.name for m in methods],
        "results": summary_images, "seconds_per_method": timings, "total_seconds": elapsed,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    return summary


def _render_page(**context: Any) -> str:
    from importlib.resources import files

    import jinja2

    source = files("captum_vit").joinpath("templates/demo.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source).render(**context)
