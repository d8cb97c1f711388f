r"""The evaluation suite: every method over a dataset, one table of faithfulness,
localisation and cost.

:func:`evaluate` streams a DataLoader (or any iterable of batches) through a registry
of attribution methods and accumulates, per method,

* Chefer et al.'s perturbation AUCs (``auc_positive``, ``auc_negative``; token-level
  removal through :func:`captum_vit.metrics.perturbation_curve`),
* segmentation scores (``pixel_accuracy``, ``miou``, ``map``) and the pointing game
  (maps upsampled bilinearly from the patch grid to the input size, as Chefer et
  al. do),
* Das & Huddar's foreground / background attention fractions (``faf``, ``baf``, on
  the patch grid),
* seconds per image of the attribution alone, and its ratio to a plain forward pass.

Totals are kept as exact sums and counts; under ``torch.distributed`` (gloo on CPU,
nccl on GPU) every process takes every ``world_size``-th batch and the sums and counts
are all-reduced, so the table equals a single-process run (timings aside).

Methods come from the one method registry, :mod:`captum_vit.registry`
(:func:`register_method` and :func:`available_methods` are re-exported here); the
built-in ones cover raw attention (last layer), attention rollout (mean / max / min head
fusion), gradient rollout (Chefer and jacobgil variants), patch occlusion, SIFT
patch scores, ViT Grad-CAM and attention flow (when those classes are present in
:mod:`captum_vit.attr`), and a random-map baseline.

:func:`bench_main` is the ``captum-vit bench`` entry point (``--eval`` runs this suite
on the shared ImageNet / VOC samples, ``--speed`` the speed benchmark of
:mod:`captum_vit._speed`, built on the same registry).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._capture import ViTAdapter, resolve_adapter
from ._compat import progress
from ._utils import _split_batch
from .metrics import (
    DEFAULT_FRACTIONS,
    foreground_fraction,
    perturbation_curve,
    pointing_game,
    segmentation_scores,
)
from .registry import METHODS as _REGISTRY
from .registry import Explainer, MethodFactory, available_methods, register_method

__all__ = [
    "METRICS",
    "EvaluationTable",
    "Explainer",
    "MethodFactory",
    "available_methods",
    "bench_main",
    "evaluate",
    "register_method",
]

#: Per-method accumulated metrics, in table order.
METRICS: tuple[str, ...] = (
    "auc_positive",
    "auc_negative",
    "auc_gap",
    "pixel_accuracy",
    "miou",
    "map",
    "pointing",
    "faf",
    "baf",
    "seconds",
)
#: Metrics shown in percent in the table (as the papers report them).
_PERCENT = frozenset({"auc_positive", "auc_negative", "auc_gap", "pixel_accuracy", "miou", "map", "pointing"})


# ---------------------------------------------------------------------- the table
@dataclass
class EvaluationTable:
    """Exact sums and counts per method and metric; values are sum / count.

    Attributes:
        methods (list[str]): row order.
        sums (dict[str, dict[str, float]]): per method, per metric (:data:`METRICS`),
            the sum of per-sample values (``seconds``: total attribution seconds).
        counts (dict[str, dict[str, int]]): the matching numbers of samples (samples
            with a NaN value, e.g. a mask without foreground, are not counted).
        forward_seconds (float): total seconds of the plain forward passes.
        forward_images (int): images in those passes.
    """

    methods: list[str]
    sums: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    forward_seconds: float = 0.0
    forward_images: int = 0

    def __post_init__(self) -> None:
        for m in self.methods:
            self.sums.setdefault(m, dict.fromkeys(METRICS, 0.0))
            self.counts.setdefault(m, dict.fromkeys(METRICS, 0))

    def add(self, method: str, metric: str, values: Tensor) -> None:
        """Add per-sample values (NaN skipped)."""
        v = values.detach().double().flatten().cpu()
        ok = torch.isfinite(v)
        self.sums[method][metric] += float(v[ok].sum())
        self.counts[method][metric] += int(ok.sum())

    def value(self, method: str, metric: str) -> float:
        """Mean over samples (``seconds``: per image); NaN when nothing was counted."""
        n = self.counts[method][metric]
        return self.sums[method][metric] / n if n else float("nan")

    def forward_per_image(self) -> float:
        return self.forward_seconds / self.forward_images if self.forward_images else float("nan")

    def merge(self, other: EvaluationTable) -> EvaluationTable:
        """Sum of two tables (e.g. an ImageNet perturbation run and a VOC mask run)."""
        methods = self.methods + [m for m in other.methods if m not in self.methods]
        out = EvaluationTable(methods)
        for t in (self, other):
            for m in t.methods:
                for k in METRICS:
                    out.sums[m][k] += t.sums[m][k]
                    out.counts[m][k] += t.counts[m][k]
            out.forward_seconds += t.forward_seconds
            out.forward_images += t.forward_images
        return out

    def _vector(self) -> Tensor:
        vals = [self.sums[m][k] for m in self.methods for k in METRICS]
        vals += [float(self.counts[m][k]) for m in self.methods for k in METRICS]
        vals += [self.forward_seconds, float(self.forward_images)]
        return torch.tensor(vals, dtype=torch.float64)

    def _load_vector(self, vec: Tensor) -> None:
        v = vec.cpu().tolist()
        n = len(self.methods) * len(METRICS)
        i = 0
        for m in self.methods:
            for k in METRICS:
                self.sums[m][k] = v[i]
                self.counts[m][k] = round(v[n + i])
                i += 1
        self.forward_seconds, self.forward_images = v[2 * n], round(v[2 * n + 1])

    def rows(self) -> list[dict[str, Any]]:
        """One dict per method: metric means (AUCs and segmentation scores in percent,
        FAF/BAF as fractions), ``seconds`` per image, ``x_forward`` (attribution time
        / forward time) and the sample counts ``n_perturbation``, ``n_masks``."""
        out = []
        fwd = self.forward_per_image()
        for m in self.methods:
            row: dict[str, Any] = {"method": m}
            for k in METRICS:
                val = self.value(m, k)
                row[k] = 100.0 * val if k in _PERCENT else val
            row["x_forward"] = row["seconds"] / fwd if fwd > 0 else float("nan")
            row["n_perturbation"] = self.counts[m]["auc_positive"]
            row["n_masks"] = self.counts[m]["faf"]
            out.append(row)
        return out

    def columns(self) -> list[str]:
        return ["method", *METRICS, "x_forward", "n_perturbation", "n_masks"]

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`rows` as CSV (full precision)."""
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.columns())
            w.writeheader()
            for row in self.rows():
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def to_markdown(self) -> str:
        """A Markdown table: AUCs and segmentation in percent, FAF/BAF fractions."""
        cols = self.columns()
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in self.rows():
            cells = []
            for c in cols:
                v = row[c]
                if isinstance(v, float):
                    if math.isnan(v):
                        cells.append("–")
                    elif c == "seconds":
                        cells.append(f"{v:.4f}")
                    elif c in ("faf", "baf"):
                        cells.append(f"{v:.3f}")
                    else:
                        cells.append(f"{v:.2f}")
                else:
                    cells.append(str(v))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- evaluate
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate(
    model: nn.Module,
    data: Iterable[Any],
    methods: Sequence[str] | None = None,
    *,
    adapter: ViTAdapter | None = None,
    perturbation: bool = True,
    masks: bool = True,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    replacement: str = "zero",
    metric: str = "accuracy",
    mask_threshold: float = 0.5,
    ignore_index: int | None = 255,
    method_options: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    max_batch: int | None = None,
    show_progress: bool = True,
    total: int | None = None,
) -> EvaluationTable:
    r"""Run every method over a dataset and accumulate the evaluation table.

    For each batch: one plain forward pass (timed) gives the predicted class, which
    every method explains (the paper's "predicted class" setting); each method's
    patch grid is timed, then

    * ``perturbation``: :func:`~captum_vit.metrics.perturbation_curve`, positive and
      negative, with ``metric`` — top-1 accuracy against the batch's labels where
      they are ``>= 0`` (Chefer et al.), otherwise against the prediction;
      ``auc_gap`` = negative − positive AUC per sample;
    * ``masks`` (batches that carry masks aligned with the inputs, see
      :func:`captum_vit.metrics.align_mask`):
      :func:`~captum_vit.metrics.segmentation_scores` and
      :func:`~captum_vit.metrics.pointing_game` on the grid upsampled bilinearly to the
      input size, and :func:`~captum_vit.metrics.foreground_fraction` on the grid.

    Batches are ``images``, ``(images, labels[, masks[, indices]])`` or a dict with
    ``"image"`` and optional ``"label"``, ``"mask"``, ``"index"`` (dataset indices;
    default: running position). Labels ``< 0`` mean unknown.

    Distributed: when ``torch.distributed`` is initialised, process ``r`` of ``W``
    handles batches ``r, r + W, …`` of ``data`` (pass the same, unsharded loader to
    every process) and sums and counts are all-reduced, so every process returns the
    table of the whole dataset.

    Args:
        model (nn.Module): the ViT (eval mode).
        data (Iterable): a DataLoader or any iterable of batches.
        methods (Sequence[str], optional): registry names. Default: None (every
            available method, see :func:`available_methods`)
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None
        perturbation (bool, optional): run the perturbation tests. Default: True
        masks (bool, optional): score batches that carry masks. Default: True
        fractions (Sequence[float], optional): removal fractions.
            Default: 0, 0.1, …, 0.9
        replacement (str, optional): token removal in the perturbation test
            (``"zero"``, ``"mean"``, ``"drop"``). Default: "zero"
        metric (str, optional): ``"accuracy"`` or ``"probability"``.
            Default: "accuracy"
        mask_threshold (float, optional): FAF foreground-patch threshold.
            Default: 0.5
        ignore_index (int, optional): ignored mask value. Default: 255
        method_options (Mapping[str, Any], optional): settings passed to the method
            factories: ``occlusion_window`` (1), ``occlusion_stride`` (window),
            ``occlusion_replacement`` ("zero"), ``perturbations_per_eval`` (16),
            ``rollout_max_discard_ratio`` etc. (0.0), ``seed`` (0, random map).
            Default: None
        device (str or torch.device, optional): where to run; ``None`` = the
            model's device. Default: None
        max_batch (int, optional): perturbed images per forward pass. Default: None
        show_progress (bool, optional): progress bar on process 0. Default: True
        total (int, optional): number of batches, for the progress bar.
            Default: None (``len(data)`` when defined)

    Returns:
        EvaluationTable: sums and counts per method; ``.to_markdown()``,
        ``.to_csv(path)``.

    Example::

        >>> loader = DataLoader(dataset, batch_size=8)
        >>> table = evaluate(model, loader, ["rollout_mean", "grad_rollout_chefer", "random"])
        >>> print(table.to_markdown())
    """
    ad = resolve_adapter(model, adapter)
    names = list(methods) if methods is not None else available_methods()
    known = available_methods()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown or unavailable method(s) {unknown}; available: {known}")
    if not names:
        raise ValueError("no methods to evaluate")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    options = dict(method_options or {})
    explainers = {n: _REGISTRY[n].factory(model, ad, options) for n in names}
    table = EvaluationTable(names)
    rank, world = _dist_info()
    if total is None and hasattr(data, "__len__"):
        total = len(data)  # type: ignore[arg-type]
    iterator: Iterable[Any] = data
    if show_progress and rank == 0:
        iterator = progress(data, desc="evaluate", total=total)
    position = 0
    for b, batch in enumerate(iterator):
        x, labels, mask, index = _split_batch(batch)
        n = int(x.shape[0])
        if index is None:
            index = torch.arange(position, position + n)
        position += n
        if b % world != rank:
            continue
        x = x.to(dev)
        with torch.no_grad():
            _sync(dev)
            t0 = time.perf_counter()
            logits = ad.forward(x)
            _sync(dev)
            table.forward_seconds += time.perf_counter() - t0
            table.forward_images += n
        pred = logits.argmax(dim=1)
        ref = pred
        if labels is not None:
            lab = torch.as_tensor(labels).to(dev).long().reshape(-1)
            ref = torch.where(lab >= 0, lab, pred)
        for name, explain in explainers.items():
            _sync(dev)
            t0 = time.perf_counter()
            grid = explain(x, pred, index)
            _sync(dev)
            table.sums[name]["seconds"] += time.perf_counter() - t0
            table.counts[name]["seconds"] += n
            grid = grid.detach().float()
            if grid.ndim == 3:
                grid = grid[:, None]
            if perturbation:
                aucs = {}
                for order in ("positive", "negative"):
                    _, auc = perturbation_curve(
                        model, x, grid, pred, order=order, fractions=fractions,
                        replacement=replacement, metric=metric, labels=ref, adapter=ad,
                        max_batch=max_batch,
                    )
                    aucs[order] = auc
                    table.add(name, f"auc_{order}", auc)
                table.add(name, "auc_gap", aucs["negative"] - aucs["positive"])
            if masks and mask is not None:
                m = mask.to(dev)
                up = F.interpolate(grid, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
                seg = segmentation_scores(up, m, ignore_index=ignore_index)
                for k, v in seg.items():
                    table.add(name, k, v)
                table.add(name, "pointing", pointing_game(up, m, ignore_index=ignore_index))
                faf, baf = foreground_fraction(grid, m, mask_threshold, ignore_index=ignore_index)
                table.add(name, "faf", faf)
                table.add(name, "baf", baf)
    if world > 1:
        import torch.distributed as dist

        backend = dist.get_backend()
        vec = table._vector().to("cuda" if backend == "nccl" else "cpu")
        dist.all_reduce(vec, op=dist.ReduceOp.SUM)
        table._load_vector(vec)
    return table


# ---------------------------------------------------------------------- shared-asset datasets
class ImageFolderWithLabels(torch.utils.data.Dataset[dict[str, Any]]):
    """ImageNet sample: ``labels.csv`` (``file,class_index,...``) next to the images.

    Items are dicts ``{"image": tensor, "label": class index, "index": position}``.
    """

    def __init__(self, root: str | os.PathLike[str], transform: Callable[[Any], Tensor], limit: int | None = None, stride: int = 1) -> None:
        self.root = Path(root)
        with open(self.root / "labels.csv", newline="") as fh:
            rows = [(r["file"], int(r["class_index"])) for r in csv.DictReader(fh)]
        self.items = rows[:: max(1, stride)][:limit]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from .io import read_image

        name, label = self.items[i]
        return {"image": self.transform(read_image(self.root / name)), "label": label, "index": i}


class MaskedImages(torch.utils.data.Dataset[dict[str, Any]]):
    """VOC-style ``N_image.png`` / ``N_mask.png`` pairs listed in ``index.csv``.

    Items are dicts ``{"image", "label": -1, "mask", "index"}``, the mask aligned with
    the model's crop (:func:`captum_vit.metrics.align_mask`) and keeping its labels
    (0 background, 255 ignored).
    """

    def __init__(self, root: str | os.PathLike[str], transform: Callable[[Any], Tensor], data_config: Mapping[str, Any], limit: int | None = None) -> None:
        self.root = Path(root)
        with open(self.root / "index.csv", newline="") as fh:
            self.items = [(r["image"], r["mask"]) for r in csv.DictReader(fh)][:limit]
        self.transform = transform
        self.data_config = data_config

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import numpy as np
        from PIL import Image

        from .io import read_image
        from .metrics import align_mask

        image, mask = self.items[i]
        x = self.transform(read_image(self.root / image))
        with Image.open(self.root / mask) as mk:
            m = torch.from_numpy(np.array(mk, dtype=np.uint8))
        return {"image": x, "label": -1, "mask": align_mask(m, self.data_config), "index": i}


# ---------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="captum-vit bench",
        description="Evaluation suite (--eval) and speed benchmark (--speed) of captum_vit's methods.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--eval", action="store_true", help="faithfulness / localisation table")
    mode.add_argument("--speed", action="store_true", help="time ratios to a forward pass and to peers")
    p.add_argument("--methods", default=None, help="comma-separated registry names (default: all available)")
    p.add_argument("--imagenet", default="../shared/assets/imagenet-sample", help="ImageNet sample folder with labels.csv")
    p.add_argument("--voc", default="../shared/assets/voc2012-samples", help="VOC folder with index.csv and masks")
    p.add_argument("--limit", type=int, default=None, help="use at most this many ImageNet images")
    p.add_argument("--stride", type=int, default=1, help="use every k-th ImageNet image (fixed subset)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--replacement", default="zero", choices=("zero", "mean", "drop"), help="token removal in the perturbation test")
    p.add_argument("--metric", default="accuracy", choices=("accuracy", "probability"))
    p.add_argument("--occlusion-window", type=int, default=2)
    p.add_argument("--occlusion-stride", type=int, default=None, help="default: the window (non-overlapping windows)")
    p.add_argument("--occlusion-replacement", default="drop", choices=("zero", "mean", "drop"))
    p.add_argument("--nproc", type=int, default=1, help="processes (torch.distributed, gloo/nccl on 127.0.0.1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results", help="folder for CSV / Markdown")
    p.add_argument("--name", default=None, help="file stem (default: eval_deit_tiny / speed_deit_tiny)")
    p.add_argument("--repeats", type=int, default=3, help="--speed: timed repeats per method")
    p.add_argument("--speed-batch", type=int, default=1, help="--speed: images per call")
    p.add_argument("--peers", default="all", help="--speed: comma-separated peers or 'all' / 'none'")
    p.add_argument("--no-progress", action="store_true")
    return p


def _eval_worker(rank: int, world: int, port: int, args: argparse.Namespace, result: Any) -> None:
    """One process of ``bench --eval`` (rank 0 of 1 when not distributed)."""
    import torch.distributed as dist

    if args.threads:
        torch.set_num_threads(args.threads)
    if world > 1:
        backend = "nccl" if str(args.device).startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        import timm.data

        from .models import load_default

        model, transform, _ = load_default()
        model = model.to(args.device).eval()
        cfg = timm.data.resolve_data_config({}, model=model)
        methods = args.methods.split(",") if args.methods else None
        options = {
            "occlusion_window": args.occlusion_window,
            "occlusion_stride": args.occlusion_stride or args.occlusion_window,
            "occlusion_replacement": args.occlusion_replacement,
        }
        common: dict[str, Any] = dict(
            methods=methods, replacement=args.replacement, metric=args.metric,
            method_options=options, device=args.device, show_progress=not args.no_progress,
        )
        tables = []
        if args.imagenet and Path(args.imagenet).exists():
            ds = ImageFolderWithLabels(args.imagenet, transform, limit=args.limit, stride=args.stride)
            loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size)
            tables.append(evaluate(model, loader, masks=False, **common))
        if args.voc and Path(args.voc).exists():
            ds2 = MaskedImages(args.voc, transform, cfg)
            loader2 = torch.utils.data.DataLoader(ds2, batch_size=args.batch_size)
            voc = evaluate(model, loader2, perturbation=False, **common)
            # timings come from the ImageNet run when there is one
            if tables:
                for m in voc.methods:
                    voc.sums[m]["seconds"] = 0.0
                    voc.counts[m]["seconds"] = 0
                voc.forward_seconds, voc.forward_images = 0.0, 0
            tables.append(voc)
        if not tables:
            raise FileNotFoundError(f"neither {args.imagenet} nor {args.voc} exists")
        table = tables[0] if len(tables) == 1 else tables[0].merge(tables[1])
        if rank == 0:
            result.put(table)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_processes(fn: Callable[..., None], nproc: int, *args: Any) -> Any:
    """Run ``fn(rank, nproc, port, *args, queue)`` in ``nproc`` processes (spawned when
    ``nproc > 1``) and return what rank 0 put on the queue."""
    import torch.multiprocessing as mp

    if nproc == 1:
        import queue

        q1: queue.Queue[Any] = queue.Queue()
        fn(0, 1, 0, *args, q1)
        return q1.get()
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=fn, args=(r, nproc, port, *args, q)) for r in range(nproc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"evaluation process(es) failed with exit codes {bad}")
    return q.get()


def bench_main(argv: list[str] | None = None) -> int:
    """``captum-vit bench``: ``--eval`` writes the evaluation table of the bundled
    DeiT-Tiny on the shared ImageNet sample (perturbation AUCs) and VOC masks
    (segmentation, pointing game, FAF/BAF) to ``--out`` as CSV and Markdown;
    ``--speed`` writes the speed table (time ratios to a forward pass and to peers).

    Args:
        argv (list[str], optional): arguments (without the program name).
            Default: None (``sys.argv[1:]``)

    Returns:
        int: exit status (0 on success).

    Example::

        $ captum-vit bench --eval --limit 100 --nproc 2
        $ captum-vit bench --speed --repeats 3
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    command = "captum-vit bench " + " ".join(argv)
    if args.nproc < 1:
        raise SystemExit("--nproc must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.speed:
        from ._speed import speed_benchmark

        text = f"Command: `{command}`\n\n" + speed_benchmark(args)
        stem = args.name or "speed_deit_tiny"
        (out / f"{stem}.md").write_text(text)
        print(text)
        return 0
    t0 = time.perf_counter()
    table: EvaluationTable = run_processes(_eval_worker, args.nproc, args)
    stem = args.name or "eval_deit_tiny"
    table.to_csv(out / f"{stem}.csv")
    md = table.to_markdown()
    header = (
        f"Evaluation of captum_vit methods on the bundled DeiT-Tiny "
        f"({time.perf_counter() - t0:.0f} s, {args.nproc} process(es)).\n\n"
        f"Command: `{command}`\n\n"
        "AUCs and segmentation scores in percent, FAF/BAF as fractions, seconds per image "
        "of the attribution alone, x_forward = attribution time / forward time.\n\n"
    )
    (out / f"{stem}.md").write_text(header + md)
    print(md)
    return 0
