"""Evaluation table of captum_vit's methods on the bundled DeiT-Tiny: perturbation
AUCs on the shared ImageNet sample, segmentation scores, pointing game and FAF/BAF on
the shared VOC images with masks, seconds per image, each a mean with a bootstrap 95%
interval. Writes the per-image rows to ``OUT/NAME_rows/`` (resumable with
``--resume``) and the table as CSV and Markdown to ``OUT/NAME.*``.

Same as ``captum-vit bench --eval``. Example (the committed table with intervals,
``benchmarks/results/eval_deit_tiny_ci.md``)::

    python benchmarks/bench_eval.py --methods raw_attention,rollout_mean,grad_rollout_chefer,random \
        --batch-size 10 --nproc 2 --threads 1 --compare grad_rollout_chefer rollout_mean \
        --name eval_deit_tiny_ci
"""

from __future__ import annotations

import sys

from captum_vit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "--eval", *sys.argv[1:]]))
