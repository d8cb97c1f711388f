"""Speed benchmark: each captum_vit method's time as a ratio to a plain forward pass,
next to Captum's Occlusion / FeatureAblation and the pip-installable peers
(pytorch-grad-cam, torchxai-explain, daam-timm-vit; install them with
``pip install -e .[bench]``), all in one run on the bundled DeiT-Tiny.

Same as ``captum-vit bench --speed``. Example::

    python benchmarks/bench_speed.py --repeats 3 --threads 1
"""

from __future__ import annotations

import sys

from captum_vit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "--speed", *sys.argv[1:]]))
