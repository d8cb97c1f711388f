"""Token-masking experiments with the real DeiT-Tiny (Toseef 2025 seed experiment + sweep).

1. Seed experiment on scikit-image's ``chelsea``: the prediction unmasked, with 30 %
   of the patch tokens masked at random and as a centre square (zeroed patch
   embeddings, positions kept), and with CLS vs mean-patch pooling.
2. Sweep over the shared ImageNet sample (one image per even class): agreement with
   the unmasked prediction and top-1 accuracy per ratio 0.1..0.9 for random, centre
   and attention-rollout-guided masking (most / least attended first).

Writes ``benchmarks/results/masking_seed.md``, ``masking_sweep.md`` and
``masking_sweep.csv``. Run from the repository root::

    python benchmarks/masking_experiment.py                # all 500 images
    python benchmarks/masking_experiment.py --images 100   # fixed subset: every 5th image by file name
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import timm
import timm.data
import torch
from PIL import Image
from skimage import data as skdata
from torch import nn

import captum_vit
from captum_vit.masking import center_mask, random_mask
from captum_vit.models import load_default

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"


def load_deit() -> tuple[nn.Module, object]:
    model, _, _ = load_default()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    return model, transform


def seed_experiment(model: nn.Module, transform: object, seed: int) -> str:
    x = transform(Image.fromarray(skdata.chelsea())).unsqueeze(0)  # type: ignore[operator]
    occ = captum_vit.PatchOcclusion(model, replacement="zero")
    grid = occ.adapter.grid_size(x)
    patches = grid[0] * grid[1]
    rows: list[tuple[str, str, int, float]] = []
    info = timm.data.ImageNetInfo()

    def add(name: str, detail: str, logits: torch.Tensor) -> None:
        p = logits.softmax(-1)[0]
        rows.append((name, detail, int(p.argmax()), float(p.max())))
        print(f"{name:>20}: {int(p.argmax())} {info.index_to_description(int(p.argmax()))} p={float(p.max()):.3f}")

    with torch.no_grad():
        add("unmasked", "-", occ.adapter.forward(x))
    g = torch.Generator().manual_seed(seed)
    rmask = random_mask(1, patches, 0.3, generator=g)
    add("random 30%", f"{int(rmask.sum())}/{patches} patches, seed {seed}", occ.forward_masked(x, rmask))
    cmask, actual = center_mask(grid, 0.3, return_ratio=True)
    side = int(cmask.sum()) ** 0.5
    add("centre 30%", f"{int(side)}x{int(side)} square = {actual:.3f} of patches",
        occ.forward_masked(x, cmask))
    pooled = captum_vit.compare_pooling(model, x)
    add("CLS pooling", "model's own head", pooled["cls"])
    add("mean-patch pooling", "mean of final-norm patch states, same head", pooled["mean"])
    lines = [
        "# Seed experiment: DeiT-Tiny on skimage chelsea (class 285 = Egyptian cat)",
        "",
        "Token masking with zeroed patch embeddings (position embeddings kept).",
        "Produced by `python benchmarks/masking_experiment.py`.",
        "",
        "| setting | detail | top-1 class | name | probability |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {a} | {b} | {c} | {info.index_to_description(c).split(',')[0]} | {d:.3f} |"
        for a, b, c, d in rows
    ]
    return "\n".join(lines) + "\n"


def load_imagenet(transform: object, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    folder = ASSETS / "imagenet-sample"
    with open(folder / "labels.csv", newline="") as f:
        entries = sorted((r["file"], int(r["class_index"])) for r in csv.DictReader(f))
    if limit < len(entries):  # a fixed, evenly spaced subset: every k-th image by file name
        step = len(entries) / limit
        entries = [entries[int(i * step)] for i in range(limit)]
    images = [transform(Image.open(folder / name).convert("RGB")) for name, _ in entries]  # type: ignore[operator]
    return torch.stack(images), torch.tensor([c for _, c in entries])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500, help="N evenly spaced images by file name (default 500 = all)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--replacement", default="zero", choices=["zero", "mean", "drop"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, transform = load_deit()

    seed_md = seed_experiment(model, transform, args.seed)
    (args.out / "masking_seed.md").write_text(seed_md)
    print(seed_md)
    if args.skip_sweep:
        return

    images, labels = load_imagenet(transform, args.images)
    t0 = time.perf_counter()
    result = captum_vit.masking_sweep(
        model, images, labels,
        strategies=("random", "center", "rollout_most", "rollout_least"),
        replacement=args.replacement, batch_size=args.batch_size, seed=args.seed,
    )
    elapsed = time.perf_counter() - t0
    header = [
        "# Masking sweep: DeiT-Tiny on the shared ImageNet sample",
        "",
        f"{result.num_images} images (one per even class index, "
        f"{'all of them' if result.num_images == 500 else f'a fixed subset: every {500 // result.num_images}th by file name'}), "
        f"224x224, 196 patch tokens; token replacement {args.replacement!r} "
        "(zero = patch embedding set to 0 before position embeddings). "
        "random: exact count per image, seeded; center: centred square nearest the ratio; "
        "rollout_most / rollout_least: AttentionRollout (mean fusion, residual 0.5) of the "
        "unmasked image, most / least attended patches masked first.",
        f"Produced by `python benchmarks/masking_experiment.py --images {args.images} "
        f"--replacement {args.replacement} --seed {args.seed}` in {elapsed:.0f} s.",
        "",
    ]
    md = "\n".join(header) + "\n" + result.to_markdown()
    (args.out / "masking_sweep.md").write_text(md)
    with open(args.out / "masking_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["strategy", "ratio", "actual_ratio", "agreement", "accuracy"])
        writer.writeheader()
        writer.writerows(result.rows())
    print(md)


if __name__ == "__main__":
    main()
