"""The one progress helper of captum_vit, built on ``tqdm.auto``.

* :func:`progress` makes one bar per long task (a notebook widget under Jupyter, a text
  bar on ``stderr`` elsewhere). Close it, or use it as a context manager / iterate it to
  the end, so that it finishes once: tqdm then draws the final state on one line.
* :func:`write` prints a line without breaking an open bar (``tqdm.write``); use it for
  per-item output while a bar runs.
* :func:`terminal` says whether the command line may draw bars at all: the CLI shows
  none with ``--quiet`` or when ``stdout`` is not a terminal (pipes, files, CI logs),
  where carriage-return redraws would turn into repeated lines.

The library's ``show_progress=`` arguments keep Captum's meaning: ``True`` draws a bar,
``False`` (their default) draws none.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm.auto import tqdm

__all__ = ["progress", "terminal", "write"]


def progress(
    iterable: Iterable[Any] | None = None,
    desc: str | None = None,
    total: int | None = None,
    *,
    enabled: bool = True,
    unit: str = "it",
    file: IO[str] | None = None,
    **kwargs: Any,
) -> Any:
    """A tqdm bar over ``iterable`` (or updated by hand with ``bar.update(n)``).

    Args:
        iterable (Iterable, optional): what to iterate; None for a bar driven by
            ``update``. Default: None
        desc (str, optional): the bar's label. Default: None
        total (int, optional): expected number of steps (``len(iterable)`` when it has
            one). Default: None
        enabled (bool, optional): False returns a disabled bar (iterates, updates and
            closes like a real one, draws nothing). Default: True
        unit (str, optional): the step's unit in the bar. Default: "it"
        file (IO[str], optional): where the text bar goes. Default: None
            (``sys.stderr``)
        **kwargs: other ``tqdm`` arguments (``disable=True`` also hides the bar).

    Returns:
        tqdm: the bar; close it (or use ``with``) when the task ends.

    Example::

        >>> with progress(total=len(chunks), desc="occlusion") as bar:
        ...     for chunk in chunks:
        ...         run(chunk)
        ...         bar.update(1)
    """
    disable = bool(kwargs.pop("disable", False)) or not enabled
    return tqdm(
        iterable, desc=desc, total=total, unit=unit, file=file or sys.stderr,
        disable=disable, dynamic_ncols=True, **kwargs,
    )


def write(line: str, *, file: IO[str] | None = None) -> None:
    """Print ``line`` above any open bar (``tqdm.write``), to ``stdout`` by default.

    Args:
        line (str): the text, without a trailing newline.
        file (IO[str], optional): where to print. Default: None (``sys.stdout``)
    """
    tqdm.write(line, file=file or sys.stdout)


def terminal() -> bool:
    """Whether both ``stdout`` and ``stderr`` are terminals (the CLI draws bars only then).

    Returns:
        bool: True on an interactive terminal, False for pipes, files and CI logs.
    """
    for stream in (sys.stdout, sys.stderr):
        isatty = getattr(stream, "isatty", None)
        if isatty is None or not isatty():
            return False
    return True
