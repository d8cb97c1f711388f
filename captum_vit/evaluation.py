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

Every image gives one row per method (image id, every metric, seconds), appended to a
CSV shard per process as the run goes (``out=``; ``resume=True`` continues a killed
run) and, with ``row_format="parquet"``, also written as a typed Parquet part per
process when it has finished (``pandas.read_parquet("OUT/rows.parquet")``); the table
(:class:`EvaluationTable`) is computed from the rows: per-method means with seeded
bootstrap 95% intervals and paired comparisons. Under
``torch.distributed`` (``torchrun``: gloo on CPU, nccl on GPU) every process takes
every ``world_size``-th batch, so the table equals a single-process run (timings
aside). ``captum-vit eval`` (:mod:`captum_vit._eval_cli`) runs it on an image folder.

Methods come from the one method registry, :mod:`captum_vit.registry`
(:func:`register_method` and :func:`available_methods` are re-exported here); the
built-in ones cover raw attention (last layer), attention rollout (mean / max / min head
fusion), gradient rollout (Chefer and jacobgil variants), patch occlusion, SIFT
patch scores, ViT Grad-CAM and attention flow (when those classes are present in
:mod:`captum_vit.attr`), and a random-map baseline.

:func:`captum_vit._eval_cli.bench_main` is the ``captum-vit bench`` entry point
(``--eval`` runs this suite on the shared ImageNet / VOC samples, ``--speed`` the speed
benchmark of :mod:`captum_vit._speed`, built on the same registry).
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._capture import ViTAdapter, resolve_adapter
from ._eval_data import EvalDataset, collate
from ._eval_io import (
    ERROR_COLUMNS,
    ColumnType,
    ShardWriter,
    bootstrap_ci,
    error_shard,
    paired_bootstrap,
    parquet_files,
    read_parquet,
    read_shards,
    require_pyarrow,
    row_shard,
    shard_files,
    write_parquet_parts,
)
from ._utils import _split_batch
from .metrics import (
    DEFAULT_FRACTIONS,
    foreground_fraction,
    perturbation_curve,
    pointing_game,
    segmentation_scores,
)
from .registry import Explainer, MethodFactory, available_methods, get_method, register_method

__all__ = [
    "METRICS",
    "ROW_COLUMNS",
    "ROW_FORMATS",
    "ROW_TYPES",
    "EvalDataset",
    "EvaluationTable",
    "Explainer",
    "MethodFactory",
    "available_methods",
    "bootstrap_ci",
    "collate",
    "evaluate",
    "paired_bootstrap",
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
#: Columns of a row shard: one row per image and method.
ROW_COLUMNS: tuple[str, ...] = (
    "image_id", "index", "method", "label", "target", *METRICS, "forward_seconds", "rank",
)
_INT_COLUMNS = frozenset({"index", "label", "target", "rank"})
_FLOAT_COLUMNS = frozenset({*METRICS, "forward_seconds"})
#: Column types of the Parquet rows (``int64``, ``float64``, string), in column order.
ROW_TYPES: dict[str, ColumnType] = {
    c: "int" if c in _INT_COLUMNS else "float" if c in _FLOAT_COLUMNS else "str" for c in ROW_COLUMNS
}
#: Values of :func:`evaluate`'s ``row_format`` (``captum-vit eval --format``).
ROW_FORMATS: tuple[str, ...] = ("csv", "parquet")


def _parse_record(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"image_id": str(row["image_id"]), "method": str(row["method"])}
    for c in ROW_COLUMNS:
        if c in out:
            continue
        v = row.get(c, "")
        if c in _INT_COLUMNS:
            out[c] = int(v) if v not in ("", None) else -1
        else:
            out[c] = float(v) if v not in ("", None) else math.nan
    return out


@dataclass
class EvaluationTable:
    """Per-image rows of an evaluation and the table computed from them.

    Every number of the table comes from :attr:`records`: per method and metric the
    mean over the images with a finite value, with a seeded percentile bootstrap
    confidence interval (:meth:`summary`); :meth:`compare` gives the paired mean
    difference of two methods over the same images. Records are ordered by image id,
    so the table does not depend on how many processes wrote them or in which order.

    Attributes:
        methods (list[str]): row order.
        records (list[dict]): one dict per image and method with the columns of
            :data:`ROW_COLUMNS` (metrics as fractions, ``seconds`` /
            ``forward_seconds`` per image; NaN = not measured).
        errors (list[dict[str, str]]): skipped images, ``{"image_id", "reason"}``.

    Example::

        >>> table = EvaluationTable.load("eval_out")     # the rows written by evaluate
        >>> print(table.to_markdown())
        >>> table.compare("grad_rollout_chefer", "rollout_mean")
    """

    methods: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Mapping[str, Any]],
        methods: Sequence[str] | None = None,
        errors: Iterable[Mapping[str, Any]] = (),
    ) -> EvaluationTable:
        """Build a table from rows (strings as read from the shards, or values).

        A row repeated for the same image and method (a batch rerun after an
        interrupted write) counts once: the first one is kept.

        Args:
            rows (Iterable[Mapping]): rows with the columns of :data:`ROW_COLUMNS`.
            methods (Sequence[str], optional): methods to keep, in this order.
                Default: None (every method, in order of first appearance)
            errors (Iterable[Mapping], optional): ``{"image_id", "reason"}`` rows.
                Default: ()

        Returns:
            EvaluationTable: the table.
        """
        seen: set[tuple[str, str]] = set()
        records: list[dict[str, Any]] = []
        order: list[str] = []
        for row in rows:
            rec = _parse_record(row)
            key = (rec["image_id"], rec["method"])
            if key in seen:
                continue
            seen.add(key)
            records.append(rec)
            if rec["method"] not in order:
                order.append(rec["method"])
        names = list(methods) if methods is not None else order
        keep = set(names)
        records = sorted((r for r in records if r["method"] in keep), key=lambda r: (r["image_id"], r["method"]))
        errs: dict[str, str] = {}
        for e in errors:
            errs.setdefault(str(e["image_id"]), str(e.get("reason", "")))
        done = {r["image_id"] for r in records}
        err_list = [{"image_id": k, "reason": v} for k, v in sorted(errs.items()) if k not in done]
        return cls(names, records, err_list)

    @classmethod
    def load(cls, out: str | os.PathLike[str], methods: Sequence[str] | None = None) -> EvaluationTable:
        """The table of the row shards in ``out`` (``rows-*.csv``, ``errors-*.csv``).

        A folder with no CSV shard but Parquet parts (``rows.parquet/``,
        ``errors.parquet/``, e.g. only those copied from a run with
        ``row_format="parquet"``) is read from the parts (needs ``pyarrow``); both
        give the same table.

        Args:
            out (str or PathLike): the ``out`` folder of :func:`evaluate`.
            methods (Sequence[str], optional): methods to keep. Default: None (all)

        Returns:
            EvaluationTable: the table.
        """
        if not shard_files(out) and parquet_files(out):
            return cls.from_rows(read_parquet(out), methods, read_parquet(out, "errors"))
        return cls.from_rows(read_shards(out), methods, read_shards(out, "errors"))

    # ------------------------------------------------------------ values
    def values(self, method: str, metric: str) -> np.ndarray:
        """Finite per-image values of ``metric`` for ``method``, ordered by image id."""
        v = np.array([r[metric] for r in self.records if r["method"] == method], dtype=np.float64)
        return v[np.isfinite(v)]

    def value(self, method: str, metric: str) -> float:
        """Mean over images (fractions; ``seconds`` per image); NaN when none."""
        v = self.values(method, metric)
        return float(v.mean()) if v.size else math.nan

    def count(self, method: str, metric: str) -> int:
        """Number of images with a finite value."""
        return int(self.values(method, metric).size)

    @property
    def image_ids(self) -> list[str]:
        """The evaluated images' ids, sorted."""
        return sorted({r["image_id"] for r in self.records})

    def forward_per_image(self) -> float:
        """Mean seconds of the plain forward pass per image."""
        per_image: dict[str, float] = {}
        for r in self.records:
            if math.isfinite(r["forward_seconds"]):
                per_image.setdefault(r["image_id"], r["forward_seconds"])
        return float(np.mean(list(per_image.values()))) if per_image else math.nan

    def merge(self, other: EvaluationTable) -> EvaluationTable:
        """The table of both tables' rows (e.g. an ImageNet run and a VOC run)."""
        methods = self.methods + [m for m in other.methods if m not in self.methods]
        return EvaluationTable.from_rows([*self.records, *other.records], methods, [*self.errors, *other.errors])

    # ------------------------------------------------------------ summary
    def _paired(self, a: str, b: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        va = {r["image_id"]: r[metric] for r in self.records if r["method"] == a}
        vb = {r["image_id"]: r[metric] for r in self.records if r["method"] == b}
        ids = sorted(k for k in va.keys() & vb.keys() if math.isfinite(va[k]) and math.isfinite(vb[k]))
        return np.array([va[k] for k in ids]), np.array([vb[k] for k in ids])

    def summary(self, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> list[dict[str, Any]]:
        """Per method and metric: ``n``, ``mean``, ``ci_low``, ``ci_high``.

        AUCs, segmentation scores and the pointing game in percent, FAF/BAF as
        fractions, ``seconds`` per image; metrics no image has are left out. The
        interval is :func:`captum_vit._eval_io.bootstrap_ci` with ``seed``.

        Args:
            n_boot (int, optional): bootstrap resamples. Default: 2000
            confidence (float, optional): interval coverage. Default: 0.95
            seed (int, optional): bootstrap seed. Default: 0

        Returns:
            list[dict]: one dict per (method, metric), in table order.
        """
        out = []
        for m in self.methods:
            for k in METRICS:
                v = self.values(m, k)
                if not v.size:
                    continue
                scale = 100.0 if k in _PERCENT else 1.0
                mean, lo, hi = bootstrap_ci(v, n_boot=n_boot, confidence=confidence, seed=seed)
                out.append({"method": m, "metric": k, "n": int(v.size), "mean": scale * mean,
                            "ci_low": scale * lo, "ci_high": scale * hi})
        return out

    def compare(
        self, a: str, b: str, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
    ) -> list[dict[str, Any]]:
        """Paired comparison of methods ``a`` and ``b`` over the same images.

        Per metric: ``n`` images where both have a value, ``mean_a``, ``mean_b`` and
        ``diff`` = mean of ``a - b`` per image with its bootstrap interval
        (:func:`captum_vit._eval_io.paired_bootstrap`); units as in :meth:`summary`.

        Args:
            a (str): first method.
            b (str): second method.
            n_boot (int, optional): bootstrap resamples. Default: 2000
            confidence (float, optional): interval coverage. Default: 0.95
            seed (int, optional): bootstrap seed. Default: 0

        Returns:
            list[dict]: one dict per metric both methods have.
        """
        for name in (a, b):
            if name not in self.methods:
                raise ValueError(f"--compare: method {name!r} is not in the table ({', '.join(self.methods)})")
        out = []
        for k in METRICS:
            xa, xb = self._paired(a, b, k)
            if not xa.size:
                continue
            scale = 100.0 if k in _PERCENT else 1.0
            d, lo, hi = paired_bootstrap(xa, xb, n_boot=n_boot, confidence=confidence, seed=seed)
            out.append({"a": a, "b": b, "metric": k, "n": int(xa.size), "mean_a": scale * float(xa.mean()),
                        "mean_b": scale * float(xb.mean()), "diff": scale * d, "ci_low": scale * lo,
                        "ci_high": scale * hi})
        return out

    @staticmethod
    def _fmt(metric: str, v: float) -> str:
        if math.isnan(v):
            return "–"
        if metric in ("seconds", "forward_seconds"):
            return f"{v:.4f}"
        if metric in ("faf", "baf"):
            return f"{v:.3f}"
        return f"{v:.2f}"

    def to_markdown(self, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> str:
        """A Markdown table: one row per method, ``mean [low, high]`` per metric,
        ``x_forward`` (attribution seconds / forward seconds) and the image counts."""
        summ = self.summary(n_boot=n_boot, confidence=confidence, seed=seed)
        metrics = [k for k in METRICS if any(s["metric"] == k for s in summ)]
        cols = ["method", *metrics, "x_forward", "n_perturbation", "n_masks"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        fwd = self.forward_per_image()
        for m in self.methods:
            by = {s["metric"]: s for s in summ if s["method"] == m}
            cells = [m]
            for k in metrics:
                s = by.get(k)
                cells.append(
                    "–" if s is None else
                    f"{self._fmt(k, s['mean'])} [{self._fmt(k, s['ci_low'])}, {self._fmt(k, s['ci_high'])}]"
                )
            ratio = self.value(m, "seconds") / fwd if fwd and math.isfinite(fwd) else math.nan
            cells += [self._fmt("x", ratio), str(self.count(m, "auc_positive")), str(self.count(m, "pointing"))]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def compare_markdown(self, a: str, b: str, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> str:
        """:meth:`compare` as a Markdown table."""
        rows = self.compare(a, b, n_boot=n_boot, confidence=confidence, seed=seed)
        lines = [f"| metric | n | {a} | {b} | {a} − {b} [{confidence:.0%} CI] |", "|---|---|---|---|---|"]
        for r in rows:
            k = r["metric"]
            lines.append(
                f"| {k} | {r['n']} | {self._fmt(k, r['mean_a'])} | {self._fmt(k, r['mean_b'])} | "
                f"{self._fmt(k, r['diff'])} [{self._fmt(k, r['ci_low'])}, {self._fmt(k, r['ci_high'])}] |"
            )
        return "\n".join(lines) + "\n"

    def summary_lines(self, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> list[str]:
        """One line per method: image count, the headline metrics with intervals and
        seconds per image."""
        summ = self.summary(n_boot=n_boot, confidence=confidence, seed=seed)
        lines = []
        for m in self.methods:
            parts = [f"{m}: {len({r['image_id'] for r in self.records if r['method'] == m})} images"]
            for s in summ:
                if s["method"] == m and s["metric"] in ("auc_gap", "miou", "pointing", "faf", "seconds"):
                    k = s["metric"]
                    parts.append(f"{k} {self._fmt(k, s['mean'])} [{self._fmt(k, s['ci_low'])}, {self._fmt(k, s['ci_high'])}]")
            lines.append(", ".join(parts))
        return lines

    def to_csv(self, path: str | os.PathLike[str], *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> None:
        """Write :meth:`summary` as CSV (``method, metric, n, mean, ci_low, ci_high``)."""
        _write_csv(path, ["method", "metric", "n", "mean", "ci_low", "ci_high"],
                   self.summary(n_boot=n_boot, confidence=confidence, seed=seed))

    def compare_to_csv(self, path: str | os.PathLike[str], a: str, b: str, *, n_boot: int = 2000,
                       confidence: float = 0.95, seed: int = 0) -> None:
        """Write :meth:`compare` as CSV."""
        _write_csv(path, ["a", "b", "metric", "n", "mean_a", "mean_b", "diff", "ci_low", "ci_high"],
                   self.compare(a, b, n_boot=n_boot, confidence=confidence, seed=seed))


def _write_csv(path: str | os.PathLike[str], columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write a small CSV atomically (temporary file, then rename)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    os.replace(tmp, target)


def _write_text(path: str | os.PathLike[str], text: str) -> None:
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, target)


# ---------------------------------------------------------------------- evaluate
class _Batch(NamedTuple):
    images: Tensor
    labels: Tensor | None
    masks: Tensor | None
    positions: Tensor | None
    ids: list[str] | None
    has_mask: Tensor | None
    errors: list[tuple[str, str]]


def _split_eval_batch(batch: Any) -> _Batch:
    """:func:`captum_vit._utils._split_batch` plus, for dict batches (as
    :func:`collate` gives), the image ids, has-mask flags and skipped images."""
    x, labels, masks, index = _split_batch(batch)
    if not isinstance(batch, Mapping):
        return _Batch(x, labels, masks, index, None, None, [])
    ids = batch.get("id")
    return _Batch(
        x, labels, masks, index, None if ids is None else [str(i) for i in ids], batch.get("has_mask"),
        [(str(i), str(r)) for i, r in batch.get("errors", ())],
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _factory(name: str) -> MethodFactory:
    """The registry's factory of method ``name``."""
    return get_method(name).factory


def _nan_filled(n: int, sel: Tensor, values: Tensor) -> list[float]:
    out = [math.nan] * n
    for i, v in zip(sel.tolist(), values.detach().double().cpu().tolist(), strict=True):
        out[i] = float(v)
    return out


def _batches_argument(batches: Iterable[Any] | None, data: Iterable[Any] | None) -> Iterable[Any]:
    """``evaluate``'s ``batches``, or its deprecated alias ``data`` (with a warning)."""
    if data is None:
        if batches is None:
            raise TypeError("evaluate() missing required argument 'batches' (a DataLoader or any iterable of batches)")
        return batches
    if batches is not None:
        raise TypeError("evaluate() got both 'batches' and its deprecated alias 'data': pass batches only")
    warnings.warn("evaluate(data=...) is deprecated, use batches=", DeprecationWarning, stacklevel=3)
    return data


def evaluate(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
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
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    row_format: str = "csv",
    shard: bool = True,
    show_progress: bool = True,
    total: int | None = None,
    data: Iterable[Any] | None = None,
) -> EvaluationTable:
    r"""Run methods over a dataset, writing one row per image and method.

    For each batch: one plain forward pass (timed) gives the predicted class, which
    every method explains (the paper's "predicted class" setting); each method's
    patch grid is timed, then

    * ``perturbation``: :func:`~captum_vit.metrics.perturbation_curve`, positive and
      negative, with ``metric`` — top-1 accuracy against the batch's labels where
      they are ``>= 0`` (Chefer et al.), otherwise against the prediction;
      ``auc_gap`` = negative − positive AUC per image;
    * ``masks`` (batches that carry masks aligned with the inputs, see
      :func:`captum_vit.metrics.align_mask`):
      :func:`~captum_vit.metrics.segmentation_scores` and
      :func:`~captum_vit.metrics.pointing_game` on the grid upsampled bilinearly to the
      input size, and :func:`~captum_vit.metrics.foreground_fraction` on the grid.

    Batches are ``images``, ``(images, labels[, masks[, indices]])`` or a dict with
    ``"image"`` and optional ``"label"`` (``< 0``: unknown), ``"mask"``,
    ``"has_mask"`` (bool per image), ``"index"`` (dataset positions, default the
    running position), ``"id"`` (image ids, default ``str(index)``) and ``"errors"``
    (``(id, reason)`` of images the loader skipped; recorded, see
    :func:`captum_vit.evaluation.collate`).

    Rows: with ``out``, each process appends its rows to ``out/rows-RRRRR.csv`` (and
    skipped images to ``out/errors-RRRRR.csv``) after every batch; ``resume=True``
    skips every (image, method) already in ``out``'s shards, so a killed run picks up
    where it stopped and gives the same table. A batch some of whose rows are
    missing is run again whole (same batch, same numbers) and only the missing rows
    are written.

    Parquet: with ``row_format="parquet"`` the CSV shards stay the journal above (a
    killed run keeps every finished batch, a resumed run reads them), and when this
    process has finished its part it also writes its rows as typed Parquet,
    ``out/rows.parquet/part-RRRRR.parquet`` (and ``out/errors.parquet/...``):
    every complete row of its shard (and of shards ``rank + k * world`` left by a
    run with more processes), once, ints as ``int64``, metrics as
    ``float64`` (null = not measured), ids as strings, written to a temporary file
    and renamed, so a part is whole or absent; a resumed run rewrites it.
    ``pandas.read_parquet("out/rows.parquet")`` reads every rank's rows (see
    :mod:`captum_vit._eval_io`). ``pyarrow`` is checked before any work.

    Distributed: when ``torch.distributed`` is initialised (e.g. under ``torchrun``)
    and ``shard=True``, process ``r`` of ``W`` handles batches ``r, r + W, …`` of
    ``batches`` (pass the same, unsharded loader to every process); pass ``shard=False``
    when each process already gets only its own batches. Every process returns the
    table of the whole run: read back from ``out`` (which must then be on a file system
    all processes see) or gathered over the process group.

    Args:
        model (nn.Module): the ViT (eval mode).
        batches (Iterable): a DataLoader or any iterable of batches.
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
        out (str or PathLike, optional): folder for the row shards. Default: None
            (rows kept in memory only)
        resume (bool, optional): continue the run whose shards are in ``out``.
            Without it, an ``out`` that already holds rows is an error. Default: False
        row_format (str, optional): ``"csv"`` (the CSV shards only) or
            ``"parquet"`` (also the Parquet parts; needs ``out`` and ``pyarrow``, the
            ``parquet`` extra). An ``out`` holding Parquet parts must be continued
            with ``"parquet"``, so they never fall behind the CSV rows.
            Default: "csv"
        shard (bool, optional): split ``batches`` by batch over the processes of an
            initialised process group. Default: True
        show_progress (bool, optional): a progress bar per process (images/s, ETA).
            Default: True
        total (int, optional): images this process will see, for the bar.
            Default: None (from ``len(batches.dataset)`` when available)
        data (Iterable, optional): deprecated alias of ``batches`` (keyword only; a
            :class:`DeprecationWarning`, the same result). Passing both, or neither,
            is a :class:`TypeError`. Default: None

    Returns:
        EvaluationTable: every row of the run (with ``out``: of all its shards);
        ``.summary()``, ``.compare(a, b)``, ``.to_markdown()``, ``.to_csv(path)``.

    Example::

        >>> loader = DataLoader(dataset, batch_size=8, collate_fn=collate)
        >>> table = evaluate(model, loader, ["rollout_mean", "grad_rollout_chefer", "random"],
        ...                  out="eval_out", resume=True)
        >>> print(table.to_markdown())
        >>> evaluate(model, loader, ["random"], out="eval_pq", row_format="parquet")
        >>> frame = pandas.read_parquet("eval_pq/rows.parquet")
    """
    batches = _batches_argument(batches, data)
    if row_format not in ROW_FORMATS:
        raise ValueError(f"row_format must be one of {', '.join(ROW_FORMATS)}, got {row_format!r}")
    if row_format == "parquet":
        if out is None:
            raise ValueError("row_format='parquet' needs out= (the folder the rows are written to)")
        require_pyarrow()
    ad = resolve_adapter(model, adapter)
    names = list(methods) if methods is not None else available_methods()
    known = available_methods()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown or unavailable method(s) {unknown}; available: {known}")
    if not names:
        raise ValueError("no methods to evaluate")
    if len(set(names)) != len(names):
        raise ValueError(f"methods listed twice: {names}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    options = dict(method_options or {})
    rank, world = _dist_info()
    done: set[tuple[str, str]] = set()
    errors_done: set[str] = set()
    if out is not None:
        existing = read_shards(out)
        if existing and not resume:
            raise ValueError(f"{out} already holds the rows of a run: pass resume=True to continue it, or use an empty folder")
        if row_format != "parquet" and parquet_files(out):
            raise ValueError(
                f"{out} holds the Parquet rows (rows.parquet/) of a row_format='parquet' run: continue it "
                "with row_format='parquet', so they stay complete"
            )
        done = {(r["image_id"], r["method"]) for r in existing}
        errors_done = {r["image_id"] for r in read_shards(out, "errors")}
        if world > 1:
            _barrier()  # every process has looked before any creates its shard
    explainers = {n: _factory(n)(model, ad, options) for n in names}
    writer = ShardWriter(row_shard(out, rank), ROW_COLUMNS) if out is not None else None
    err_writer = ShardWriter(error_shard(out, rank), ERROR_COLUMNS) if out is not None else None
    mine: list[dict[str, Any]] = []
    my_errors: list[dict[str, str]] = []
    if total is None:
        ds = getattr(batches, "dataset", None)
        if ds is not None and hasattr(ds, "__len__"):
            n_all = len(ds)
            total = math.ceil(n_all / world) if shard and world > 1 else n_all
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"rank {rank}" if world > 1 else "evaluate", unit="img",
               position=int(os.environ.get("LOCAL_RANK", rank)),
               disable=not show_progress, file=sys.stderr, dynamic_ncols=True, leave=True)
    position = 0
    try:
        for b, batch in enumerate(batches):
            parts = _split_eval_batch(batch)
            x = parts.images
            n = int(x.shape[0])
            index = parts.positions if parts.positions is not None else torch.arange(position, position + n)
            index = torch.as_tensor(index).long().reshape(-1)
            position += n
            if shard and b % world != rank:
                continue
            for image_id, reason in parts.errors:
                if image_id not in errors_done:
                    errors_done.add(image_id)
                    err_row = {"image_id": image_id, "reason": reason}
                    my_errors.append(err_row)
                    bar.write(f"skipped {image_id}: {reason}", file=sys.stderr)
                    if err_writer is not None:
                        err_writer.write([err_row])
            if n == 0:
                continue
            ids = parts.ids if parts.ids is not None else [str(i) for i in index.tolist()]
            if len(ids) != n:
                raise ValueError(f"batch {b}: {len(ids)} ids for {n} images")
            todo = {m: [i for i in range(n) if (ids[i], m) not in done] for m in names}
            if not any(todo.values()):
                bar.update(n)
                continue
            x = x.to(dev)
            with torch.no_grad():
                _sync(dev)
                t0 = time.perf_counter()
                logits = ad.forward(x)
                _sync(dev)
                fwd = (time.perf_counter() - t0) / n
            pred = logits.argmax(dim=1)
            ref = pred
            lab_list = [-1] * n
            if parts.labels is not None:
                lab = torch.as_tensor(parts.labels).to(dev).long().reshape(-1)
                ref = torch.where(lab >= 0, lab, pred)
                lab_list = lab.tolist()
            sel_mask: Tensor | None = None
            if masks and parts.masks is not None:
                flags = parts.has_mask
                keep = torch.ones(n, dtype=torch.bool) if flags is None else torch.as_tensor(flags).bool().reshape(-1).cpu()
                sel_mask = torch.nonzero(keep).flatten()
            rows: list[dict[str, Any]] = []
            for name in names:
                if not todo[name]:
                    continue
                explain = explainers[name]
                _sync(dev)
                t0 = time.perf_counter()
                grid = explain(x, pred, index)
                _sync(dev)
                secs = (time.perf_counter() - t0) / n
                grid = grid.detach().float()
                if grid.ndim == 3:
                    grid = grid[:, None]
                values: dict[str, list[float]] = {}
                if perturbation:
                    aucs = {}
                    for order in ("positive", "negative"):
                        _, auc = perturbation_curve(
                            model, x, grid, pred, order=order, fractions=fractions,
                            replacement=replacement, metric=metric, labels=ref, adapter=ad,
                            max_batch=max_batch,
                        )
                        aucs[order] = auc
                        values[f"auc_{order}"] = auc.double().cpu().tolist()
                    values["auc_gap"] = (aucs["negative"] - aucs["positive"]).double().cpu().tolist()
                if sel_mask is not None and sel_mask.numel():
                    assert parts.masks is not None
                    sel = sel_mask
                    m = parts.masks[sel].to(dev)
                    g = grid[sel.to(grid.device)]
                    up = F.interpolate(g, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
                    seg = segmentation_scores(up, m, ignore_index=ignore_index)
                    for k, v in seg.items():
                        values[k] = _nan_filled(n, sel, v)
                    values["pointing"] = _nan_filled(n, sel, pointing_game(up, m, ignore_index=ignore_index))
                    faf, baf = foreground_fraction(g, m, mask_threshold, ignore_index=ignore_index)
                    values["faf"] = _nan_filled(n, sel, faf)
                    values["baf"] = _nan_filled(n, sel, baf)
                for i in todo[name]:
                    row: dict[str, Any] = {
                        "image_id": ids[i], "index": int(index[i]), "method": name, "label": int(lab_list[i]),
                        "target": int(pred[i]), "seconds": secs, "forward_seconds": fwd, "rank": rank,
                    }
                    for k, col in values.items():
                        row[k] = float(col[i])
                    rows.append(row)
            if writer is not None:
                writer.write(rows)  # one write per batch: a kill leaves whole batches
            for r in rows:
                done.add((r["image_id"], r["method"]))
            mine.extend(rows)
            bar.update(n)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if err_writer is not None:
            err_writer.close()
    if row_format == "parquet":
        assert out is not None
        write_parquet_parts(out, rank, world, ROW_TYPES, ("image_id", "method"))
    if world > 1:
        _barrier()
    if out is not None:
        return EvaluationTable.load(out, names)
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (mine, my_errors))
        all_rows = [r for part in gathered for r in part[0]]
        all_errors = [e for part in gathered for e in part[1]]
        return EvaluationTable.from_rows(all_rows, names, all_errors)
    return EvaluationTable.from_rows(mine, names, my_errors)


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
