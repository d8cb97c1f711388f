"""Foreground attention fraction of ViTGradCam (and AttentionFlow) on the 14 VOC images.

For each PASCAL VOC 2012 sample in ../shared/assets/voc2012-samples the real DeiT-Tiny
explains its own top-1 ImageNet class (VOC classes are not ImageNet classes). The
mask gets the model's preprocessing (resize + centre crop, ``captum_vit.metrics.align_mask``)
and ``captum_vit.metrics.foreground_fraction`` gives

    FAF = sum of max(a, 0) over foreground patches / sum of max(a, 0) over all patches,

a patch being foreground when >= 50% of its valid pixels are object (mask 1..20;
0 = background, 255 = ignored boundary band). The same is reported for attention
rollout, Chefer's gradient rollout and a uniform random map (whose expected FAF is the
foreground share of the patches) for context.

Run: ``python benchmarks/voc_foreground.py`` (``--no-flow`` skips AttentionFlow).
Writes ``benchmarks/results/voc_foreground.{csv,md}``.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from captum_vit import AttentionFlow, AttentionRollout, GradientRollout, ViTGradCam
from captum_vit.metrics import align_mask, foreground_fraction
from captum_vit.models import load_default

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-flow", action="store_true", help="skip AttentionFlow (slowest)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, _, _ = load_default()
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)

    folder = ASSETS / "voc2012-samples"
    ids = sorted(int(p.name.split("_")[0]) for p in folder.glob("*_image.png"))
    x = torch.stack([transform(Image.open(folder / f"{i}_image.png").convert("RGB")) for i in ids])
    masks = torch.stack([torch.from_numpy(np.array(Image.open(folder / f"{i}_mask.png"))) for i in ids])
    masks = align_mask(masks, cfg)  # (14, 224, 224), 0 / 1..20 / 255
    with torch.no_grad():
        target = model(x).argmax(1)

    methods: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "ViTGradCam (layer=-1 -> block 10)": lambda b: ViTGradCam(model).attribute(b[0], target=b[1], return_patch_grid=True),  # type: ignore[misc,return-value]
        "AttentionRollout (mean)": lambda b: AttentionRollout(model).attribute(b[0], return_patch_grid=True),  # type: ignore[misc,return-value]
        "GradientRollout (chefer)": lambda b: GradientRollout(model).attribute(b[0], target=b[1], return_patch_grid=True),  # type: ignore[misc,return-value]
    }
    if not args.no_flow:
        methods["AttentionFlow (mean)"] = lambda b: AttentionFlow(model).attribute(b[0], return_patch_grid=True)  # type: ignore[misc,return-value]
    gen = torch.Generator().manual_seed(0)
    methods["random map"] = lambda b: torch.rand(b[0].shape[0], 1, 14, 14, generator=gen)

    rows = []
    per_image: dict[str, list[float]] = {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        grids = torch.cat([fn((x[i : i + 1], target[i : i + 1])) for i in range(len(ids))])  # type: ignore[arg-type]
        secs = (time.perf_counter() - t0) / len(ids)
        faf, _ = foreground_fraction(grids, masks)
        valid = faf[~faf.isnan()]
        per_image[name] = faf.tolist()
        std = float(valid.std()) if valid.numel() > 1 else math.nan
        rows.append((name, float(valid.mean()), std, int(valid.numel()), secs))
        print(f"{name}: FAF {float(valid.mean()):.3f} +- {std:.3f} ({valid.numel()} images), {secs:.2f} s/image", flush=True)

    fg_share = foreground_fraction(torch.ones(len(ids), 1, 14, 14), masks)[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "voc_foreground.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "target", "foreground_patch_share", *per_image])
        for k, i in enumerate(ids):
            w.writerow([i, int(target[k]), f"{float(fg_share[k]):.4f}", *(f"{per_image[m][k]:.4f}" for m in per_image)])
    lines = [
        "# Foreground attention fraction (FAF) on the 14 VOC 2012 samples, real DeiT-Tiny",
        "",
        "FAF = positive attribution mass on foreground patches / on all patches (patch = "
        "foreground when >= 50% of its valid pixels are object; 255 band ignored), "
        "`captum_vit.metrics.foreground_fraction`; target = the model's top-1 class.",
        f"Mean foreground share of the patches (FAF of a uniform map): {float(fg_share.mean()):.3f}.",
        "",
        "| method | mean FAF | std | images | s / image |",
        "|---|---|---|---|---|",
        *[f"| {n} | {m:.3f} | {s:.3f} | {c} | {t:.2f} |" for n, m, s, c, t in rows],
        "",
        "Command: `python benchmarks/voc_foreground.py"
        + (" --no-flow" if args.no_flow else "")
        + f" --threads {args.threads}` (timings under a shared, loaded CPU).",
        "",
    ]
    (RESULTS / "voc_foreground.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
