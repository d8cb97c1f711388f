"""AttnLRP on the held-out images: is the pixel map the best patch ranking, and is the
target logit the best starting relevance?

Two questions left open by the rule tuning (``bench_lrp.py tune``), answered on the
same 50 held-out ImageNet images (every 10th of the shared sample) with the default
rules and the bundled DeiT-Tiny, by the same pixel-zero and token-zero tests:

* **ranking**: the patch grid of the pixel relevance (``return_patch_grid=True``: the
  sum over each patch's pixels and channels, the default) against the sum of its
  positive part only, and against the *token* relevance ``Σ_d h_d ∂̃y/∂h_d`` at the
  patch embedding's output (before the position embedding) and after the position
  embedding (the input of block 0);
* **start**: the backward pass started from the target logit (the default, as Chefer
  et al. and lxt do) against the log-softmax of the target (softmax-gradient LRP) and
  the logit minus the mean of the other logits (contrastive).

Paired differences to the default (pixel map, logit start) with 95% bootstrap CIs.
Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_lrp_probe.py`` (one process) ->
``results/lrp_probe.md``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lrp import RESULTS, _bootstrap, _items, _load, zero_aucs

from captum_vit import AttnLRP, GradientRollout, _lrp

#: Starting scores: (logits, target) -> the scalar whose modified gradient is taken.
STARTS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "logit": lambda y, t: y.gather(1, t[:, None]).sum(),
    "log-softmax": lambda y, t: torch.log_softmax(y, 1).gather(1, t[:, None]).sum(),
    "logit - mean of others": lambda y, t: (
        y.gather(1, t[:, None]).squeeze(1) - (y.sum(1) - y.gather(1, t[:, None]).squeeze(1)) / (y.shape[1] - 1)
    ).sum(),
}


def maps(lrp: AttnLRP, model: torch.nn.Module, x: Tensor, t: Tensor, start: str) -> dict[str, Tensor]:
    """Patch grids ``(B, 1, 14, 14)`` of one default-rules backward pass."""
    keep: dict[str, Tensor] = {}
    embed, pos_drop = model.get_submodule("patch_embed"), model.get_submodule("pos_drop")  # timm ViT
    hooks = [
        embed.register_forward_hook(lambda m, i, o: keep.__setitem__("embed", o)),
        pos_drop.register_forward_hook(lambda m, i, o: keep.__setitem__("pos", o)),
    ]
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            with _lrp.lrp_rules(lrp.adapter, lrp.rules):
                y = lrp.adapter.forward(xg)
            gx, ge, gp = torch.autograd.grad(STARTS[start](y, t), [xg, keep["embed"], keep["pos"]])
    finally:
        for h in hooks:
            h.remove()
    pix = (xg * gx).detach()
    gh, gw = lrp.adapter.grid_size(x)
    out = {"pixel map": lrp._pixels_to_grid(pix, x)}
    if start == "logit":
        out["pixel map, positive part"] = lrp._pixels_to_grid(pix.clamp(min=0), x)
        out["tokens at the patch embedding"] = (keep["embed"] * ge).detach().sum(-1).reshape(-1, gh, gw)
        out["tokens after the position embedding"] = (keep["pos"] * gp).detach().sum(-1)[:, 1:].reshape(-1, gh, gw)
    return {k: v[:, None] for k, v in out.items()}


def main() -> int:
    torch.set_num_threads(1)
    from captum_vit.models import load_default

    model, transform, _ = load_default()
    lrp = AttnLRP(model)
    chefer = GradientRollout(model, variant="chefer")
    items = _items("tune")
    scores: dict[str, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for s in range(0, len(items), 10):
        chunk = items[s : s + 10]
        x = _load(chunk, transform)
        labels = torch.tensor([c[2] for c in chunk])
        with torch.no_grad():
            pred = model(x).argmax(1)
        grids = {f"{k} ({start})": g for start in STARTS for k, g in maps(lrp, model, x, pred, start).items()}
        cmap = chefer.attribute(x, target=pred, return_patch_grid=True)
        assert isinstance(cmap, Tensor)
        grids["Chefer relevance"] = cmap.detach()
        for name, g in grids.items():
            r = scores.setdefault(name, {"pix": [], "tok": []})
            auc = zero_aucs(model, x, g, labels, pred)
            for test in ("pix", "tok"):
                r[test] += (auc[f"{test}_neg"] - auc[f"{test}_pos"]).tolist()
    seconds = time.perf_counter() - t0
    ref = scores["pixel map (logit)"]
    lines = [
        f"# AttnLRP: patch ranking and starting relevance (held-out split: {len(ref['pix'])} ImageNet images)",
        "",
        "Default rules, bundled DeiT-Tiny, predicted class; negative-minus-positive AUC of top-1 accuracy; "
        "Δ = paired difference to the pixel map from the logit (the default), 95% bootstrap CI. "
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_lrp_probe.py` ({seconds:.0f} s).",
        "",
        "| map (start) | pixel-zero gap | Δ pixel-zero | token-zero gap | Δ token-zero |",
        "|---|---|---|---|---|",
    ]
    for name, r in scores.items():
        cells = []
        for test in ("pix", "tok"):
            d = [a - b for a, b in zip(r[test], ref[test], strict=True)]
            lo, hi = _bootstrap(d)
            cells += [f"{statistics.fmean(r[test]):.3f}", "—" if r is ref else f"{statistics.fmean(d):+.3f} [{lo:+.3f}, {hi:+.3f}]"]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lrp_probe.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
