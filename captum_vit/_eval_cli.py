"""``captum-vit eval`` and ``captum-vit bench``: the evaluation suite as a job
that runs on a laptop, under ``torchrun`` on a GPU box or a cluster, and survives
being killed.

One process is one rank of a ``torch.distributed`` job started by ``torchrun`` (or by
``--nproc N``, which starts the same job through torch's elastic launcher): ``env://``
rendezvous, gloo on CPU, nccl on CUDA, rank and world size from the environment.
The data is split by batch (rank ``r`` takes batches ``r, r + W, …`` of a fixed
batching), every rank appends its rows to its own shard in ``--out``, and rank 0
writes the summary from the rows of every shard when all ranks are done. ``--out``
must therefore be on a file system every rank sees (as usual for ``torchrun`` jobs).

``--format parquet`` (needs ``pyarrow``, checked before any work: exit 2 without it)
keeps the CSV shards as the per-batch journal that ``--resume`` reads and makes every
rank, once its part is done, also write its rows as typed Parquet,
``OUT/rows.parquet/part-RRRRR.parquet`` (and ``OUT/errors.parquet/``), atomically;
``pandas.read_parquet("OUT/rows.parquet")`` gives every rank's rows as one frame. A run
started with ``--format parquet`` is resumed with it (otherwise exit 2), so the parts
never lag behind the journal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ._eval_data import EvalDataError, EvalDataset, collate, read_class_file
from ._eval_io import parquet_files, read_shards, require_pyarrow
from .registry import available_methods

__all__ = ["EvalUsageError", "bench_main", "eval_main", "launch"]

_CONFIG = "run.json"
#: The command a user typed, passed by ``--nproc`` to the ranks it starts (whose own
#: argument lists lack ``--nproc``), for the summary's header.
_COMMAND_ENV = "CAPTUM_VIT_EVAL_COMMAND"


def _typed_command(default: str) -> str:
    return os.environ.get(_COMMAND_ENV) or default


class EvalUsageError(Exception):
    """Bad options or input: one line, exit code 2."""


@dataclass
class Source:
    """One data folder of a run."""

    data: str
    masks: str | None = None
    classes: str | None = None
    perturbation: bool = True
    limit: int | None = None
    stride: int = 1
    id_prefix: str = ""


@dataclass
class RunSpec:
    """Everything one rank needs (and what ``run.json`` records)."""

    model: str
    weights: str | None
    sources: list[Source]
    methods: list[str]
    method_options: dict[str, Any]
    replacement: str
    metric: str
    batch_size: int
    rows_dir: str
    summary_stem: str
    compare: list[str] | None = None
    n_boot: int = 2000
    confidence: float = 0.95
    seed: int = 0
    resume: bool = False
    device: str = "cpu"
    threads: int | None = None
    workers: int = 0
    show_progress: bool = True
    timeout_s: int = 86400
    header: str = ""
    row_format: str = "csv"
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        keys = ("model", "weights", "methods", "method_options", "replacement", "metric", "batch_size")
        d = {k: getattr(self, k) for k in keys}
        d["sources"] = [asdict(s) for s in self.sources]
        return json.loads(json.dumps(d))


# ---------------------------------------------------------------------- environment
def _env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 without)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _init_distributed(spec: RunSpec) -> torch.device:
    import torch.distributed as dist

    _, world, local = _env_world()
    device = torch.device(spec.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalUsageError(f"--device {spec.device} requested but CUDA is not available")
        if world > 1 or device.index is None:
            count = torch.cuda.device_count()
            # torchrun sets LOCAL_WORLD_SIZE (processes on this node): every process of an
            # over-full node refuses, so its LOCAL_RANK 0 prints the line (nccl would fail
            # later with "Duplicate GPU detected" once two ranks share a device).
            per_node = max(int(os.environ.get("LOCAL_WORLD_SIZE", local + 1)), local + 1)
            if world > 1 and per_node > count:
                raise EvalUsageError(
                    f"--device cuda: {per_node} processes on this node but {count} visible "
                    "CUDA device(s); start at most one process per GPU (torchrun --nproc_per_node)"
                )
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=spec.timeout_s), **kwargs)
    return device


# ---------------------------------------------------------------------- model and data
def _load(spec: RunSpec, device: torch.device) -> tuple[Any, Any, list[str]]:
    from .models import load_model

    if spec.weights is not None and not Path(spec.weights).is_file():
        raise EvalUsageError(f"weights file not found: {spec.weights}")
    try:
        return load_model(spec.model, spec.weights, device=device)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise EvalUsageError(f"cannot load model {spec.model!r}: {err}") from err


def _datasets(spec: RunSpec, model: Any, transform: Any, class_names: list[str]) -> list[EvalDataset]:
    from .models import _label_maps, _mask_config

    maps = _label_maps(model, class_names)
    num_classes = len(class_names) or None
    out = []
    for s in spec.sources:
        try:
            classes = read_class_file(s.classes) if s.classes else None
            cfg = _mask_config(spec.model, model, transform) if s.masks else None
            out.append(EvalDataset(
                s.data, transform, num_classes=num_classes, label_maps=maps, classes=classes,
                masks=s.masks, mask_config=cfg, limit=s.limit, stride=s.stride, id_prefix=s.id_prefix,
            ))
        except EvalDataError as err:
            raise EvalUsageError(str(err)) from err
    return out


def _check_methods(spec: RunSpec) -> None:
    known = available_methods()
    bad = [m for m in spec.methods if m not in known]
    if bad:
        raise EvalUsageError(f"unknown method(s) {', '.join(bad)}; available: {', '.join(known)}")
    if not spec.methods:
        raise EvalUsageError("no methods given (--methods)")
    if len(set(spec.methods)) != len(spec.methods):
        raise EvalUsageError(f"a method is listed twice: {' '.join(spec.methods)}")
    if spec.compare:
        missing = [m for m in spec.compare if m not in spec.methods]
        if missing:
            raise EvalUsageError(f"--compare: {', '.join(missing)} not among --methods")
        if spec.compare[0] == spec.compare[1]:
            raise EvalUsageError("--compare needs two different methods")


def _check_out(spec: RunSpec) -> None:
    """A fresh run needs an empty --out; --resume needs the same settings; --format
    parquet needs pyarrow, and a run with Parquet parts needs --format parquet."""
    out = Path(spec.rows_dir)
    if out.exists() and not out.is_dir():
        raise EvalUsageError(f"--out {out} exists and is not a folder")
    if spec.row_format == "parquet":
        try:
            require_pyarrow("--format parquet")
        except ImportError as err:
            raise EvalUsageError(str(err)) from err
    elif out.is_dir() and parquet_files(out):
        raise EvalUsageError(
            f"{out} holds the Parquet rows (rows.parquet/) of a --format parquet run: continue it with "
            "--format parquet, so they stay complete"
        )
    has_rows = out.is_dir() and bool(read_shards(out))
    cfg = out / _CONFIG
    if not spec.resume:
        if has_rows:
            raise EvalUsageError(f"{out} already holds the rows of a run: pass --resume to continue it, or choose an empty --out")
        return
    if cfg.is_file():
        try:
            before = json.loads(cfg.read_text())
        except json.JSONDecodeError:
            before = None
        if before is not None and before != spec.fingerprint():
            diff = [k for k in spec.fingerprint() if before.get(k) != spec.fingerprint().get(k)]
            raise EvalUsageError(f"--resume: {out} holds a run with other settings ({', '.join(diff)}); use a new --out")


def validate(spec: RunSpec) -> None:
    """Every check that needs no image: methods, model, folders, --out (exit 2)."""
    _check_methods(spec)
    _check_out(spec)
    model, transform, names = _load(spec, torch.device("cpu") if spec.device.startswith("cuda") else torch.device(spec.device))
    _datasets(spec, model, transform, names)


# ---------------------------------------------------------------------- one rank
def _batches(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


def run(spec: RunSpec) -> int:
    """One rank of the run (the whole run without ``torchrun``); returns the exit code."""
    from .evaluation import EvaluationTable, _write_text, evaluate

    if spec.threads:
        torch.set_num_threads(spec.threads)
    rank, world, _ = _env_world()
    device = _init_distributed(spec)
    try:
        _check_methods(spec)
        _check_out(spec)
        model, transform, names = _load(spec, device)
        datasets = _datasets(spec, model, transform, names)
        out = Path(spec.rows_dir)
        out.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            for ds in datasets:
                for note in ds.notes:
                    print(f"note: {note}", file=sys.stderr)
            _write_text(out / _CONFIG, json.dumps(spec.fingerprint(), indent=1) + "\n")
        t0 = time.perf_counter()
        before = len({r["image_id"] for r in read_shards(out)})
        options = dict(spec.method_options)
        for src, ds in zip(spec.sources, datasets, strict=True):
            done = {(r["image_id"], r["method"]) for r in read_shards(out)}
            failed = {r["image_id"] for r in read_shards(out, "errors")}
            ids = ds.ids

            mine = [b for j, b in enumerate(_batches(len(ds), spec.batch_size)) if j % world == rank]
            todo = [
                b for b in mine
                if not all(ids[i] in failed or all((ids[i], m) in done for m in spec.methods) for i in b)
            ]
            loader = torch.utils.data.DataLoader(ds, batch_sampler=todo, collate_fn=collate, num_workers=spec.workers)
            evaluate(
                model, loader, spec.methods, perturbation=src.perturbation, masks=src.masks is not None,
                replacement=spec.replacement, metric=spec.metric, method_options=options, device=device,
                out=out, resume=True, row_format=spec.row_format, shard=False, show_progress=spec.show_progress,
                total=sum(len(b) for b in todo),
            )
        elapsed = time.perf_counter() - t0
        if rank == 0:
            table = EvaluationTable.load(out, spec.methods)
            with open(out / "invocations.jsonl", "a") as fh:  # how long each (resumed) invocation took
                fh.write(json.dumps({
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(elapsed, 3),
                    "processes": world, "images_before": before, "images_after": len(table.image_ids),
                    "resume": spec.resume,
                }) + "\n")
            kw: dict[str, Any] = {"n_boot": spec.n_boot, "confidence": spec.confidence, "seed": spec.seed}
            stem = Path(spec.summary_stem)
            stem.parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(stem.with_name(stem.name + ".csv"), **kw)
            md = table.to_markdown(**kw)
            text = (
                f"{spec.header}"
                f"{len(table.image_ids)} images, {len(table.errors)} skipped, {world} process(es), "
                f"{elapsed:.0f} s in this invocation. Means with {spec.confidence:.0%} bootstrap intervals "
                f"({spec.n_boot} resamples, seed {spec.seed}); AUCs, segmentation scores and pointing in percent, "
                "FAF/BAF as fractions, seconds per image of the attribution alone, "
                "x_forward = attribution time / forward time.\n\n" + md
            )
            if spec.compare:
                a, b = spec.compare
                table.compare_to_csv(stem.with_name(stem.name + "_compare.csv"), a, b, **kw)
                cmp_md = table.compare_markdown(a, b, **kw)
                text += f"\nPaired comparison {a} − {b} over the same images:\n\n" + cmp_md
            _write_text(stem.with_name(stem.name + ".md"), text)
            for line in table.summary_lines(**kw):
                print(line)
            if table.errors:
                print(f"skipped {len(table.errors)} image(s); reasons in {out}/errors-*.csv", file=sys.stderr)
            if spec.compare:
                print(cmp_md, end="")
            parquet = f" (Parquet: {out / 'rows.parquet'})" if spec.row_format == "parquet" else ""
            print(f"wrote {stem}.csv, {stem}.md and the per-image rows in {out}{parquet}")
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------------- launcher
def launch(command: Sequence[str], nproc: int) -> int:
    """Run ``python -m captum_vit COMMAND...`` as ``nproc`` ranks on this machine.

    The same job as ``torchrun --standalone --nproc_per_node NPROC -m captum_vit
    COMMAND...``, started through torch's elastic launch API (c10d rendezvous on a
    port the store picks itself).

    Args:
        command (Sequence[str]): the sub-command and its arguments.
        nproc (int): processes.

    Returns:
        int: 0 when every rank succeeded, 2 when they failed on bad input, else 1.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "captum_vit", *command)
    except ChildFailedError as err:
        codes = sorted({int(f.exitcode) for f in err.failures.values()})
        print(f"captum-vit: {len(err.failures)} of {nproc} process(es) failed (exit codes {codes})", file=sys.stderr)
        return 2 if codes == [2] else 1
    return 0


def _strip_nproc(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def start(spec: RunSpec, nproc: int, command: str, argv: Sequence[str]) -> int:
    """Validate, then run here (one process or one torchrun rank) or launch ``nproc``."""
    if nproc < 1:
        raise EvalUsageError(f"--nproc must be >= 1, got {nproc}")
    _, world, _ = _env_world()
    if nproc > 1:
        if world > 1:
            raise EvalUsageError("--nproc cannot be used inside torchrun (torchrun already started the processes)")
        validate(spec)
        child = _strip_nproc(argv)
        if spec.threads is None:
            child += ["--threads", str(max(1, (os.cpu_count() or 1) // nproc))]
        os.environ.setdefault(_COMMAND_ENV, " ".join(["captum-vit", command, *argv]))
        try:
            return launch([*command.split(), *child], nproc)
        finally:
            os.environ.pop(_COMMAND_ENV, None)
    return run(spec)


# ---------------------------------------------------------------------- captum-vit eval
class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (``PROG: error: ...``), exit code 2."""

    def error(self, message: str) -> Any:  # argparse's signature returns NoReturn
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _eval_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="captum-vit eval",
        description="Evaluate attribution methods for a ViT on an image folder: per-image rows "
        "(one CSV shard per process, written as it goes; with --format parquet also typed Parquet "
        "parts, OUT/rows.parquet/), a summary with bootstrap 95% intervals "
        "and an optional paired comparison. Runs unchanged under torchrun.",
        epilog="Data: DIR/labels.csv (file,class_index), DIR/index.csv (image[,mask]), an ImageFolder "
        "tree, or a flat folder of images. Masks: N_mask.png / STEM.png / STEM_mask.png. "
        "Exit codes: 0 ok, 1 runtime failure, 2 bad options or input.",
    )
    p.add_argument("--model", default="default", help="'default' (bundled DeiT-Tiny), 'timm:NAME' or 'hf:NAME_OR_DIR' (default: default)")
    p.add_argument("--weights", default=None, help="local weights (.safetensors or a torch.save state dict)")
    p.add_argument("--data", required=True, metavar="DIR", help="image folder (see below)")
    p.add_argument("--classes", default=None, metavar="FILE", help="ImageFolder: class names, one per line (line k = class k)")
    p.add_argument("--masks", default=None, metavar="DIR", help="ground-truth masks for segmentation, pointing game and FAF/BAF")
    p.add_argument("--methods", nargs="+", required=True, metavar="METHOD", help="registry names (space or comma separated)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the row shards and the summary")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping images already done")
    p.add_argument("--format", dest="row_format", default="csv", choices=("csv", "parquet"),
                   help="per-image rows: csv (the shards only) or parquet (also OUT/rows.parquet/, typed, "
                   "written when each process is done; needs pyarrow) (default: csv)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None, help="paired difference A - B with its interval")
    p.add_argument("--no-perturbation", dest="perturbation", action="store_false", help="skip the perturbation AUCs")
    p.add_argument("--replacement", default="zero", choices=("zero", "mean", "drop"), help="token removal in the perturbation test (default: zero)")
    p.add_argument("--metric", default="accuracy", choices=("accuracy", "probability"), help="perturbation-curve score (default: accuracy)")
    p.add_argument("--occlusion-window", type=int, default=2, help="patch_occlusion window (default: 2)")
    p.add_argument("--occlusion-stride", type=int, default=None, help="patch_occlusion stride (default: the window)")
    p.add_argument("--occlusion-replacement", default="drop", choices=("zero", "mean", "drop"))
    p.add_argument("--limit", type=int, default=None, help="use at most this many images")
    p.add_argument("--stride", type=int, default=1, help="use every k-th image")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine, started as torchrun would (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the random baseline (default: 0)")
    p.add_argument("--timeout", type=int, default=86400, help="seconds a rank waits for the others at the end (default: 86400)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    return p


def _split_methods(values: Sequence[str]) -> list[str]:
    return [m for v in values for m in v.split(",") if m]


def _check_numbers(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise EvalUsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise EvalUsageError(f"--limit must be >= 1, got {args.limit}")
    if args.stride < 1 or args.occlusion_window < 1 or (args.occlusion_stride is not None and args.occlusion_stride < 1):
        raise EvalUsageError("--stride, --occlusion-window and --occlusion-stride must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise EvalUsageError(f"--threads must be >= 1, got {args.threads}")
    if args.workers < 0 or args.n_boot < 1:
        raise EvalUsageError("--workers must be >= 0 and --n-boot >= 1")


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "occlusion_window": args.occlusion_window,
        "occlusion_stride": args.occlusion_stride or args.occlusion_window,
        "occlusion_replacement": args.occlusion_replacement,
        "seed": args.seed,
    }


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``captum-vit eval``: see ``captum-vit eval --help``.

    Args:
        argv (Sequence[str], optional): arguments after ``eval``. Default: None
            (``sys.argv[2:]``)

    Returns:
        int: exit code (0 ok, 1 runtime failure, 2 bad options or input).

    Example::

        $ captum-vit eval --data val/ --methods rollout_mean grad_rollout_chefer random \\
              --out runs/val --compare grad_rollout_chefer rollout_mean --nproc 2
        $ torchrun --nproc_per_node 8 -m captum_vit eval --device cuda --data val/ ...
    """
    args_list = list(sys.argv[2:] if argv is None else argv)
    try:
        args = _eval_parser().parse_args(args_list)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    # One line per node: the first process of each (LOCAL_RANK 0) prints a usage error, so
    # an error only one node sees (its copy of --data or --weights missing, no CUDA, no
    # pyarrow) is in that node's log, not lost because that node has no global rank 0.
    local_rank = _env_world()[2]
    try:
        _check_numbers(args)
        spec = RunSpec(
            model=args.model, weights=None if args.weights is None else str(Path(args.weights).resolve()),
            sources=[Source(str(Path(args.data).resolve()), None if args.masks is None else str(Path(args.masks).resolve()),
                            None if args.classes is None else str(Path(args.classes).resolve()),
                            args.perturbation, args.limit, args.stride)],
            methods=_split_methods(args.methods), method_options=method_options(args),
            replacement=args.replacement, metric=args.metric, batch_size=args.batch_size,
            rows_dir=args.out, summary_stem=str(Path(args.out) / "summary"), compare=args.compare,
            n_boot=args.n_boot, seed=args.seed, resume=args.resume, device=args.device, threads=args.threads,
            workers=args.workers, show_progress=args.progress, timeout_s=args.timeout, row_format=args.row_format,
            header=f"Command: `{_typed_command('captum-vit eval ' + ' '.join(args_list))}`\n\n",
        )
        return start(spec, args.nproc, "eval", args_list)
    except EvalUsageError as err:
        if local_rank == 0:
            print(f"captum-vit eval: error: {err}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------- captum-vit bench
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="captum-vit bench",
        description="Evaluation suite (--eval) and speed benchmark (--speed) of captum_vit's methods.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--eval", action="store_true", help="faithfulness / localisation table of the bundled DeiT-Tiny")
    mode.add_argument("--speed", action="store_true", help="time ratios to a forward pass and to peers")
    p.add_argument("--methods", default=None, help="comma-separated registry names (default: all available)")
    p.add_argument(
        "--data", "--imagenet", dest="imagenet", default="../shared/assets/imagenet-sample",
        help="--eval: ImageNet images for the perturbation test (labels.csv or class folders; "
        "default: %(default)s, the project's shared sample)",
    )
    p.add_argument(
        "--masks", "--voc", dest="voc", default="../shared/assets/voc2012-samples",
        help="--eval: images with N_mask.png masks for the localisation scores (default: %(default)s)",
    )
    p.add_argument("--limit", type=int, default=None, help="use at most this many ImageNet images")
    p.add_argument("--stride", type=int, default=1, help="use every k-th ImageNet image (fixed subset)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--replacement", default="zero", choices=("zero", "mean", "drop"), help="token removal in the perturbation test")
    p.add_argument("--metric", default="accuracy", choices=("accuracy", "probability"))
    p.add_argument("--occlusion-window", type=int, default=2)
    p.add_argument("--occlusion-stride", type=int, default=None, help="default: the window (non-overlapping windows)")
    p.add_argument("--occlusion-replacement", default="drop", choices=("zero", "mean", "drop"))
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (torch's elastic launcher, as torchrun)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results", help="folder for CSV / Markdown")
    p.add_argument("--name", default=None, help="file stem (default: eval_deit_tiny / speed_deit_tiny)")
    p.add_argument("--resume", action="store_true", help="--eval: continue the run whose rows are in OUT/NAME_rows")
    p.add_argument("--format", dest="row_format", default="csv", choices=("csv", "parquet"),
                   help="--eval: per-image rows as csv shards only, or also parquet (OUT/NAME_rows/rows.parquet/)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None, help="--eval: paired difference A - B")
    p.add_argument("--n-boot", type=int, default=2000, help="--eval: bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="--eval: bootstrap and random-baseline seed")
    p.add_argument("--repeats", type=int, default=3, help="--speed: timed repeats per method")
    p.add_argument("--speed-batch", type=int, default=1, help="--speed: images per call")
    p.add_argument("--peers", default="all", help="--speed: comma-separated peers or 'all' / 'none'")
    p.add_argument("--speed-model", default="deit_tiny", choices=("deit_tiny", "vit_b16"),
                   help="--speed: the bundled DeiT-Tiny or a random-weight ViT-B/16")
    p.add_argument("--occlusion", action="store_true",
                   help="--speed: also pair patch occlusion with Captum's Occlusion / FeatureAblation")
    p.add_argument("--memory", action="store_true",
                   help="--speed: peak memory of GradientRollout and peers instead of time")
    p.add_argument("--memory-models", default=None,
                   help="--memory: comma-separated of vit_b16, vit_l14_518_d12, vit_l14_518_d24")
    p.add_argument("--no-progress", action="store_true")
    return p


def _eval_spec(args: argparse.Namespace, command: str) -> Any:
    """The ``bench --eval`` run: the ImageNet sample (perturbation AUCs) and the VOC
    images (masks only) of the bundled model, rows in ``OUT/NAME_rows``."""
    sources = []
    if args.imagenet and Path(args.imagenet).exists():
        sources.append(Source(str(Path(args.imagenet).resolve()), limit=args.limit, stride=args.stride, id_prefix="imagenet/"))
    if args.voc and Path(args.voc).exists():
        voc = str(Path(args.voc).resolve())
        sources.append(Source(voc, masks=voc, perturbation=False, id_prefix="voc/"))
    if not sources:
        raise EvalUsageError(
            f"no evaluation data: neither {args.imagenet} nor {args.voc} exists (the defaults are the "
            "project's shared sample beside a development checkout); pass --data DIR (images with "
            "labels.csv or class folders) and/or --masks DIR, or use `captum-vit eval` for your "
            "own model and data"
        )
    stem = args.name or "eval_deit_tiny"
    out = Path(args.out)
    return RunSpec(
        model="default", weights=None, sources=sources,
        methods=args.methods.split(",") if args.methods else available_methods(),
        method_options={
            "occlusion_window": args.occlusion_window,
            "occlusion_stride": args.occlusion_stride or args.occlusion_window,
            "occlusion_replacement": args.occlusion_replacement,
            "seed": args.seed,
        },
        replacement=args.replacement, metric=args.metric, batch_size=args.batch_size,
        rows_dir=str(out / f"{stem}_rows"), summary_stem=str(out / stem), compare=args.compare,
        n_boot=args.n_boot, seed=args.seed, resume=args.resume, device=args.device, threads=args.threads,
        show_progress=not args.no_progress, row_format=args.row_format,
        header=(
            "Evaluation of captum_vit methods on the bundled DeiT-Tiny: perturbation AUCs on the "
            "ImageNet sample, segmentation / pointing / FAF / BAF on the VOC images with masks.\n\n"
            f"Command: `{_typed_command(command)}`\n\n"
        ),
    )


def bench_main(argv: list[str] | None = None) -> int:
    """``captum-vit bench``: ``--eval`` evaluates the bundled DeiT-Tiny on the shared
    ImageNet sample (perturbation AUCs) and VOC masks (segmentation, pointing game,
    FAF/BAF), writing per-image rows to ``OUT/NAME_rows/`` and the table with
    bootstrap intervals to ``OUT/NAME.csv`` / ``.md`` (the same machinery as
    ``captum-vit eval``: ``--nproc``, ``--resume``, ``--compare``); ``--speed``
    writes the speed table (time ratios to a forward pass and to peers).

    Args:
        argv (list[str], optional): arguments (without the program name).
            Default: None (``sys.argv[1:]``)

    Returns:
        int: exit status (0 on success, 2 bad options or input).

    Example::

        $ captum-vit bench --eval --limit 100 --nproc 2
        $ captum-vit bench --speed --repeats 3
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    command = "captum-vit bench " + " ".join(argv)
    if args.nproc < 1:
        raise SystemExit("--nproc must be >= 1")
    out = Path(args.out)
    if args.speed:
        out.mkdir(parents=True, exist_ok=True)
        from ._speed import memory_benchmark, speed_benchmark

        run = memory_benchmark if args.memory else speed_benchmark
        text = f"Command: `{command}`\n\n" + run(args)
        stem = args.name or ("memory_peers" if args.memory else f"speed_{args.speed_model}")
        (out / f"{stem}.md").write_text(text)
        print(text)
        return 0
    try:
        return start(_eval_spec(args, command), args.nproc, "bench", argv)
    except EvalUsageError as err:
        if _env_world()[2] != 0:  # under torchrun: the line once per node, as ``eval`` does
            raise SystemExit(2) from err
        raise SystemExit(str(err)) from err
