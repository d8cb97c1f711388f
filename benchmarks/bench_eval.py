"""Evaluation table of every captum_vit method on the bundled DeiT-Tiny: perturbation
AUCs on the shared ImageNet sample, segmentation scores, pointing game and FAF/BAF on
the shared VOC images with masks, seconds per image. Writes CSV and Markdown to
``benchmarks/results/``.

Same as ``captum-vit bench --eval``. Example (the committed table)::

    python benchmarks/bench_eval.py --stride 5 --batch-size 10 --nproc 2 --threads 1 \
        --occlusion-window 2 --occlusion-replacement drop
"""

from __future__ import annotations

import sys

from captum_vit.evaluation import bench_main

if __name__ == "__main__":
    raise SystemExit(bench_main(["--eval", *sys.argv[1:]]))
