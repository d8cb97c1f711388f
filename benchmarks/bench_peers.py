"""captum_vit against its peers, in one run: paired, interleaved timings and peak memory.

Same as ``captum-vit bench --speed`` (see :mod:`captum_vit._speed` for the method).
Install the peers first (``pip install -e .[bench]``: grad-cam, torchxai-explain,
daam-timm-vit), in a virtual environment with ``--system-site-packages`` if the global
one must not change. The tables in ``benchmarks/results`` were made with::

    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --threads 1 --repeats 41 \\
        --speed-model deit_tiny --speed-batch 1 --name speed_deit_tiny \\
        --methods raw_attention,rollout_mean,rollout_max,rollout_min,grad_rollout,grad_rollout_chefer,vit_gradcam
    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --threads 1 --repeats 3 \\
        --speed-model deit_tiny --methods patch_occlusion --occlusion --peers none \\
        --name speed_deit_tiny_occlusion
    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --threads 1 --repeats 6 \\
        --speed-model vit_b16 --speed-batch 8 --name speed_vit_b16_b8 \\
        --methods rollout_mean,grad_rollout_chefer,grad_rollout,vit_gradcam
    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --threads 1 --memory --name memory_peers

(the tables record the command as ``captum-vit bench --speed ...``, the same entry
point). Companion analyses: ``benchmarks/bench_rollout_floor.py`` (where
AttentionRollout's time goes at batch 1) and ``benchmarks/bench_chefer_bound.py`` (the
FLOP / time bound of an exact streamed Chefer map against DAAM).
"""

from __future__ import annotations

import sys

from captum_vit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "--speed", *sys.argv[1:]]))
