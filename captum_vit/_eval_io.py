"""Per-image rows of the evaluation suite on disk, and the bootstrap behind its table.

Every process (rank) of an evaluation appends its rows to its own shard,
``rows-RRRRR.csv`` (and the images it skipped to ``errors-RRRRR.csv``), one
``os.write`` per batch followed by ``fsync``, so a process killed at any moment leaves
at most one torn last line. Readers drop a torn last line; the owner cuts it off
before appending again. The files are plain CSV (``csv`` module), readable with
``pandas.read_csv``; an empty cell is a missing value (NaN).

Parquet (``row_format="parquet"``, ``--format parquet``; needs ``pyarrow``, the
``parquet`` extra): the CSV shards stay the journal that is appended per batch and
that a resumed run reads, and when a process has finished its part it also writes the
complete, de-duplicated rows of its shards as typed Parquet parts,
``rows.parquet/part-RRRRR.parquet`` and ``errors.parquet/part-RRRRR.parquet``
(:func:`write_parquet_parts`). Each part is written to a temporary dot-file, flushed
to disk and renamed over the old one, so a part is always whole: the one of the last
finished run, or absent; a killed run loses nothing (its rows are in the journal) and
the resumed run rewrites the parts. The parts sit in their own folders because
``pandas.read_parquet(FOLDER)`` reads every file of a folder (it would choke on the
CSV shards beside them); so::

    rows = pandas.read_parquet("OUT/rows.parquet")       # every rank's rows, one frame
    errors = pandas.read_parquet("OUT/errors.parquet")
    one = pandas.read_parquet("OUT/rows.parquet/part-00000.parquet")

Integer columns are ``int64``, metrics ``float64`` (a value that was not measured is
null, NaN in pandas), ids, method names and reasons strings: the same numbers as the
CSV shards (floats are written there with ``repr``, which round-trips exactly), with
the dtypes the CSV reader has to guess (``pandas.read_csv`` reads an image id ``0001``
as the integer 1).

:func:`bootstrap_ci` and :func:`paired_bootstrap` give seeded percentile bootstrap
confidence intervals of a mean and of a paired mean difference.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "ERROR_COLUMNS",
    "ERROR_TYPES",
    "ColumnType",
    "ShardWriter",
    "bootstrap_ci",
    "error_shard",
    "paired_bootstrap",
    "parquet_files",
    "parquet_part",
    "read_parquet",
    "read_shards",
    "require_pyarrow",
    "row_shard",
    "shard_files",
    "write_parquet_parts",
]

#: The type of a column in the Parquet parts: ``int64``, ``float64`` or string.
ColumnType = Literal["int", "float", "str"]
#: Columns of an error shard.
ERROR_COLUMNS: tuple[str, ...] = ("image_id", "reason")
#: Parquet types of the error columns.
ERROR_TYPES: dict[str, ColumnType] = {"image_id": "str", "reason": "str"}

_ROWS_GLOB = "rows-*.csv"
_ERRORS_GLOB = "errors-*.csv"
#: Resamples evaluated at once (bounds memory for large datasets).
_CHUNK = 200


def row_shard(out: str | os.PathLike[str], rank: int) -> Path:
    """The row shard of process ``rank`` in ``out``."""
    return Path(out) / f"rows-{rank:05d}.csv"


def error_shard(out: str | os.PathLike[str], rank: int) -> Path:
    """The error shard of process ``rank`` in ``out``."""
    return Path(out) / f"errors-{rank:05d}.csv"


def shard_files(out: str | os.PathLike[str], kind: str = "rows") -> list[Path]:
    """The ``rows`` (or ``errors``) shards in ``out``, sorted by name."""
    pattern = _ROWS_GLOB if kind == "rows" else _ERRORS_GLOB
    return sorted(Path(out).glob(pattern))


def _complete_text(path: Path) -> str:
    """The file's text up to its last newline (a torn last line is dropped)."""
    data = path.read_bytes()
    end = data.rfind(b"\n")
    return data[: end + 1].decode("utf-8", errors="replace") if end >= 0 else ""


def _read_one(path: Path) -> list[dict[str, str]]:
    text = _complete_text(path)
    if not text:
        return []
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        return []
    rows = []
    for fields in reader:
        if len(fields) != len(header):  # a line cut by a full disk or a crashed host
            continue
        rows.append(dict(zip(header, fields, strict=True)))
    return rows


def read_shards(out: str | os.PathLike[str], kind: str = "rows") -> list[dict[str, str]]:
    """Every complete row of the ``rows`` (or ``errors``) shards in ``out``.

    Args:
        out (str or PathLike): the output folder of an evaluation.
        kind (str, optional): ``"rows"`` or ``"errors"``. Default: "rows"

    Returns:
        list[dict[str, str]]: the rows as strings (empty string = missing), shard by
        shard; a torn last line of a shard is left out.
    """
    rows: list[dict[str, str]] = []
    for path in shard_files(out, kind):
        rows.extend(_read_one(path))
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    text = str(value)
    return text.replace("\r", " ").replace("\n", " ")


class ShardWriter:
    """Appends rows to one shard: one ``os.write`` + ``fsync`` per call.

    Opening cuts off a torn last line left by a killed process and writes the header
    when the file is new; an existing header must equal ``columns``.

    Args:
        path (str or PathLike): the shard file.
        columns (Sequence[str]): the column names, in order.
    """

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                os.truncate(self.path, keep)
            if keep:
                header = next(csv.reader(io.StringIO(data[:keep].decode("utf-8", errors="replace"))), [])
                if tuple(header) != self.columns:
                    raise ValueError(
                        f"{self.path} has columns {header}, expected {list(self.columns)} "
                        "(written by another version or another kind of run)"
                    )
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(self._fd).st_size == 0:
            self._write([self.columns])

    def _write(self, lines: Iterable[Sequence[str]]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(lines)
        data = buf.getvalue().encode("utf-8")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append ``rows`` (dicts keyed by column; missing keys are empty cells)."""
        if rows:
            self._write([[_cell(r.get(c)) for c in self.columns] for r in rows])

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- Parquet
_PARQUET_HINT = "pip install 'captum-vit[parquet]' (or pip install pyarrow)"


def require_pyarrow(what: str = "row_format='parquet'") -> None:
    """Raise a one-line :class:`ImportError` now when ``pyarrow`` is missing.

    Args:
        what (str, optional): what needs it, for the message.
            Default: "row_format='parquet'"
    """
    try:
        import pyarrow.parquet  # noqa: F401  (imports pyarrow too)
    except ImportError as err:
        raise ImportError(f"{what} needs pyarrow, which is not installed: {_PARQUET_HINT}") from err


def parquet_part(out: str | os.PathLike[str], rank: int, kind: str = "rows") -> Path:
    """The Parquet part of shard ``rank``: ``out/rows.parquet/part-RRRRR.parquet``
    (``errors.parquet/...`` for ``kind="errors"``)."""
    return Path(out) / f"{kind}.parquet" / f"part-{rank:05d}.parquet"


def parquet_files(out: str | os.PathLike[str], kind: str = "rows") -> list[Path]:
    """The Parquet parts of ``kind`` (``"rows"`` or ``"errors"``) in ``out``, sorted."""
    return sorted((Path(out) / f"{kind}.parquet").glob("part-*.parquet"))


def _typed(value: str, kind: ColumnType) -> Any:
    if kind == "str":
        return value
    if value == "":
        return None
    if kind == "int":
        return int(value)
    v = float(value)
    return None if math.isnan(v) else v


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_parquet(path: Path, rows: Sequence[Mapping[str, str]], types: Mapping[str, ColumnType]) -> None:
    """Write string rows as one typed Parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
    schema = pa.schema([(c, arrow[t]) for c, t in types.items()])
    columns = {c: [_typed(r.get(c, ""), t) for r in rows] for c, t in types.items()}
    table = pa.Table.from_pydict(columns, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # dot-files: readers skip them
    try:
        pq.write_table(table, tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if hasattr(os, "O_DIRECTORY"):
        _fsync_path(path.parent, os.O_RDONLY | os.O_DIRECTORY)


def _unique(rows: Iterable[dict[str, str]], key: Sequence[str]) -> list[dict[str, str]]:
    seen: set[tuple[str, ...]] = set()
    out = []
    for r in rows:
        k = tuple(r.get(c, "") for c in key)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def write_parquet_parts(
    out: str | os.PathLike[str],
    rank: int,
    world: int,
    row_types: Mapping[str, ColumnType],
    row_key: Sequence[str],
) -> list[Path]:
    """Write the Parquet parts of process ``rank``'s CSV shards from their complete rows.

    Process ``rank`` of ``world`` converts every shard ``i`` with
    ``i % world == rank``: its own, and those of ranks a resumed run with fewer
    processes no longer has. Call it once the shards it converts are no longer
    written to. Rows are those of :func:`read_shards` (a torn last line left out),
    in journal order, a row repeated with the same ``row_key`` kept once (the
    first); errors likewise by image id. Each part replaces the old one atomically
    (temporary dot-file, ``fsync``, ``os.replace``).

    Args:
        out (str or PathLike): the output folder of an evaluation.
        rank (int): this process.
        world (int): number of processes.
        row_types (Mapping[str, ColumnType]): the row columns, in order, and their
            types (``"int"``, ``"float"``, ``"str"``).
        row_key (Sequence[str]): the columns that identify a row.

    Returns:
        list[Path]: the parts written.
    """
    require_pyarrow()
    written = []
    for kind, types, key in (("rows", row_types, row_key), ("errors", ERROR_TYPES, ("image_id",))):
        for path in shard_files(out, kind):
            suffix = path.stem.rsplit("-", 1)[1]
            if not suffix.isdigit() or int(suffix) % world != rank:
                continue
            index = int(suffix)
            target = parquet_part(out, index, kind)
            _write_parquet(target, _unique(_read_one(path), key), types)
            written.append(target)
    return written


def read_parquet(out: str | os.PathLike[str], kind: str = "rows") -> list[dict[str, Any]]:
    """Every row of the Parquet parts of ``kind`` in ``out``, part by part.

    Args:
        out (str or PathLike): the output folder of an evaluation.
        kind (str, optional): ``"rows"`` or ``"errors"``. Default: "rows"

    Returns:
        list[dict[str, Any]]: the rows with typed values (``None`` = missing).
    """
    require_pyarrow("reading Parquet rows")
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in parquet_files(out, kind):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


# ---------------------------------------------------------------------- bootstrap
def _resampled_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, _CHUNK):
        k = min(_CHUNK, n_boot - start)
        idx = rng.integers(0, n, size=(k, n))
        means[start : start + k] = values[idx].mean(axis=1)
    return means


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile bootstrap confidence interval.

    ``n_boot`` resamples of size ``n`` with replacement, drawn by
    ``numpy.random.default_rng(seed)``; the interval is the ``(1 - confidence) / 2``
    and ``(1 + confidence) / 2`` quantiles of the resampled means. The same values in
    the same order and the same seed give the same interval.

    Args:
        values (Sequence[float] or numpy.ndarray): per-sample values (finite).
        n_boot (int, optional): number of resamples. Default: 2000
        confidence (float, optional): coverage of the interval, in (0, 1).
            Default: 0.95
        seed (int, optional): seed of the resampling. Default: 0

    Returns:
        tuple[float, float, float]: ``(mean, low, high)``; NaN for no values, the
        value itself for one value.

    Example::

        >>> bootstrap_ci([0.2, 0.4, 0.9], seed=0)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size == 1:
        return mean, mean, mean
    means = _resampled_means(v, n_boot, seed)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(lo), float(hi)


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of the paired differences ``a - b`` and its bootstrap interval.

    The same samples are drawn for both methods (resampling the per-sample
    differences), so the interval reflects the spread of the difference over the
    same images, not of each mean alone.

    Args:
        a (Sequence[float] or numpy.ndarray): per-sample values of the first method.
        b (Sequence[float] or numpy.ndarray): the second method's values for the same
            samples, in the same order.
        n_boot (int, optional): number of resamples. Default: 2000
        confidence (float, optional): coverage of the interval. Default: 0.95
        seed (int, optional): seed of the resampling. Default: 0

    Returns:
        tuple[float, float, float]: ``(mean difference, low, high)``.

    Example::

        >>> paired_bootstrap([0.5, 0.7, 0.9], [0.4, 0.7, 0.6], seed=0)
    """
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal lengths, got {x.size} and {y.size}")
    return bootstrap_ci(x - y, n_boot=n_boot, confidence=confidence, seed=seed)
