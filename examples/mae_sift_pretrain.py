"""Pretrain a tiny MAE-style ViT for a few steps with random vs SIFT-guided masks.

Wu et al. propose masking keypoint patches more often during MAE pretraining, with
the keypoint fraction ``beta`` of the masked patches stepped up over training
(0.1 -> 0.5). This example trains two identical tiny masked autoencoders from the same
initialisation on the shared ImageNet images:

* ``random``: MAE's uniform random masks;
* ``sift``: :func:`captum_vit.masking.sift_guided_mask` with
  ``beta = sift_curriculum(step, steps)``.

Both reconstruct the pixels of the masked patches (MSE on per-patch normalised
pixels, as MAE). At the end both are evaluated on held-out images with the *same*
random masks. A few dozen CPU steps only show that the pipeline runs and how the
losses move; they say nothing about downstream accuracy.

Run: ``python examples/mae_sift_pretrain.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_vit.interrelation import keypoint_counts
from captum_vit.masking import sift_curriculum, sift_guided_mask

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "assets" / "imagenet-sample"


class TinyMAE(nn.Module):
    """A minimal masked autoencoder: the encoder sees only the visible patches, a
    one-block decoder predicts the pixels of every patch from encoded + mask tokens."""

    def __init__(self, image_size: int = 64, patch: int = 8, dim: int = 96, depth: int = 3,
                 heads: int = 3, decoder_dim: int = 64) -> None:
        super().__init__()
        self.patch = patch
        self.num_patches = (image_size // patch) ** 2
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, self.num_patches, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.enc_norm = nn.LayerNorm(dim)
        self.to_dec = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.dec_pos = nn.Parameter(torch.randn(1, self.num_patches, decoder_dim) * 0.02)
        dec_layer = nn.TransformerEncoderLayer(decoder_dim, 2, decoder_dim * 2, dropout=0.0,
                                               batch_first=True, norm_first=True)
        self.decoder = nn.TransformerEncoder(dec_layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(decoder_dim, 3 * patch * patch)

    def patchify(self, images: Tensor) -> Tensor:
        p = self.patch
        b, c, h, w = images.shape
        x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def loss(self, images: Tensor, mask: Tensor) -> Tensor:
        """MSE on the masked patches; ``mask`` (B, P) bool with the same count per row."""
        patches = self.patchify(images)
        b, n, _ = patches.shape
        keep = (~mask).sum(1)[0].item()
        vis_idx = torch.nonzero(~mask)[:, 1].reshape(b, int(keep))
        tokens = self.embed(patches) + self.pos
        visible = torch.gather(tokens, 1, vis_idx[..., None].expand(-1, -1, tokens.shape[-1]))
        encoded = self.to_dec(self.enc_norm(self.encoder(visible)))
        full = self.mask_token.expand(b, n, -1).clone()
        full.scatter_(1, vis_idx[..., None].expand(-1, -1, full.shape[-1]), encoded)
        pred = self.head(self.decoder(full + self.dec_pos))
        mean = patches.mean(-1, keepdim=True)
        var = patches.var(-1, keepdim=True)
        target = (patches - mean) / (var + 1e-6).sqrt()
        per_patch = F.mse_loss(pred, target, reduction="none").mean(-1)
        return (per_patch * mask).sum() / mask.sum()


def _load_images(folder: Path, count: int, size: int) -> np.ndarray:
    from PIL import Image

    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    step = max(1, len(rows) // count)
    picked = rows[::step][:count]
    out = []
    for r in picked:
        img = Image.open(folder / r["file"]).convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        out.append(np.asarray(img))
    return np.stack(out)


def _random_mask(batch: int, patches: int, ratio: float, generator: torch.Generator) -> Tensor:
    k = round(ratio * patches)
    order = torch.rand(batch, patches, generator=generator).argsort(1)
    return torch.zeros(batch, patches, dtype=torch.bool).scatter_(1, order[:, :k], True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=IMAGES)
    parser.add_argument("--num-images", type=int, default=96, help="images used (the last 16 held out)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.images / "labels.csv").exists():
        print(f"no images at {args.images} (expects the shared ImageNet sample)", file=sys.stderr)
        return 1

    uint8 = _load_images(args.images, args.num_images, args.image_size)
    counts = keypoint_counts(uint8, args.patch)  # SIFT keypoints per patch, (N, P)
    images = torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255.0
    held = 16
    train_x, test_x = images[:-held], images[-held:]
    train_c = counts[:-held]
    print(f"{len(images)} images {args.image_size}px, {counts.shape[1]} patches each; "
          f"{(counts > 0).float().mean():.0%} of patches have SIFT keypoints")

    torch.manual_seed(args.seed)
    base = TinyMAE(args.image_size, args.patch)
    models = {"random": base, "sift": copy.deepcopy(base)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.05) for k, m in models.items()}
    data_gen = torch.Generator().manual_seed(args.seed)
    mask_gens = {k: torch.Generator().manual_seed(args.seed + 1) for k in models}
    p = base.num_patches
    print(f"{'step':>5} {'beta':>5} {'loss random':>12} {'loss sift':>10} {'kp frac (sift)':>15}")
    for step in range(args.steps):
        idx = torch.randint(0, len(train_x), (args.batch_size,), generator=data_gen)
        x, c = train_x[idx], train_c[idx]
        beta = sift_curriculum(step, args.steps)
        masks = {
            "random": _random_mask(args.batch_size, p, args.mask_ratio, mask_gens["random"]),
            "sift": sift_guided_mask(c, args.mask_ratio, beta, generator=mask_gens["sift"]),
        }
        losses = {}
        for name, model in models.items():
            model.train()
            loss = model.loss(x, masks[name])
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            losses[name] = loss.item()
        if step % 5 == 0 or step == args.steps - 1:
            kp_frac = (masks["sift"] & (c > 0)).sum().item() / masks["sift"].sum().item()
            print(f"{step:>5} {beta:>5.2f} {losses['random']:>12.4f} {losses['sift']:>10.4f} {kp_frac:>15.2f}")

    eval_masks = _random_mask(held, p, args.mask_ratio, torch.Generator().manual_seed(123))
    print("\nheld-out reconstruction loss (same random masks for both):")
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            print(f"  {name:>6}: {model.loss(test_x, eval_masks).item():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
