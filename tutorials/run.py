"""Execute every tutorial notebook with nbclient (CI runs this).

    python tutorials/run.py             # execute all, fail on the first error
    python tutorials/run.py --write     # ... and store the outputs in the notebooks
    python tutorials/run.py 02_class_specific.ipynb

Each notebook runs in its own kernel with ``tutorials/`` as working directory, offline
(bundled DeiT-Tiny, scikit-image sample images). Prints the seconds each one took.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebook names (default: every tutorials/*.ipynb)")
    parser.add_argument("--write", action="store_true", help="save the executed notebooks in place")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default: 600)")
    args = parser.parse_args(argv)
    paths = [HERE / n for n in args.notebooks] if args.notebooks else sorted(HERE.glob("[0-9]*.ipynb"))
    if not paths:
        print("no notebooks found", file=sys.stderr)
        return 2
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb, timeout=args.timeout, kernel_name="python3",
            resources={"metadata": {"path": str(HERE)}},
        )
        start = time.perf_counter()
        client.execute()
        print(f"{path.name}: {time.perf_counter() - start:.1f} s", flush=True)
        if args.write:
            nbformat.write(nb, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
