"""AttnLRP vs lxt (2.1, PyPI) on torchvision's ViT: the same map, and the cost of each.

lxt supports torchvision's ``VisionTransformer`` only, and its ``monkey_patch``
replaces torch classes for the whole process, irreversibly: this script therefore
times captum_vit first and lxt afterwards, in one process of its own. The model is a
torchvision ViT with DeiT-Tiny's shape (224x224, 16x16 patches, 12 blocks, 3 heads,
width 192, random weights, head re-initialised) at batch 8, CPU, one thread. The rules
are lxt's ViT example: CP-LRP attention, identity rule on LayerNorm and GELU, zennit's
Gamma with 0.25 on the patch convolution and 0.05 on every linear layer (captum_vit:
the same via ``rules=``). Calls are interleaved with a plain forward + input-gradient
backward and the median of the paired ratios is reported.

    OMP_NUM_THREADS=1 python benchmarks/bench_lrp_lxt.py --repeats 7   # -> results/lrp_lxt_speed.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import types
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_lrp import paired_times  # noqa: E402

from captum_vit import AttnLRP  # noqa: E402

RULES = {"attention": "cp", "patch_embed": ("gamma", 0.25), "mlp": ("gamma", 0.05), "head": ("gamma", 0.05)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="AttnLRP vs lxt on torchvision's ViT")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=224, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768
    ).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    for param in model.parameters():
        param.requires_grad_(False)
    x = torch.randn(a.batch, 3, 224, 224)
    target = torch.arange(a.batch)

    def plain() -> None:
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg)

    lrp = AttnLRP(model, rules=RULES)

    def ours() -> torch.Tensor:
        return lrp.attribute(x, target=target).sum(1)

    base_ours, t_ours = paired_times(plain, ours, a.repeats)
    map_ours = ours()

    # lxt: its LLM modules fail to import under transformers 5; stub them (unused here).
    for name in ("llama", "qwen2", "qwen3", "gemma3", "bert", "gpt2"):
        stub = types.ModuleType(f"lxt.efficient.models.{name}")
        setattr(stub, f"modeling_{name}", types.ModuleType(f"modeling_{name}"))
        stub.attnLRP = {}  # type: ignore[attr-defined]
        sys.modules.setdefault(stub.__name__, stub)
    import zennit.rules as z_rules
    from lxt.efficient import monkey_patch, monkey_patch_zennit
    from torchvision.models import vision_transformer
    from zennit.composites import LayerMapComposite

    monkey_patch(vision_transformer)
    monkey_patch_zennit()

    def theirs() -> torch.Tensor:
        comp = LayerMapComposite([(torch.nn.Conv2d, z_rules.Gamma(0.25)), (torch.nn.Linear, z_rules.Gamma(0.05))])
        comp.register(model)
        try:
            xi = x.clone().requires_grad_(True)
            model(xi).gather(1, target[:, None]).sum().backward()
        finally:
            comp.remove()
        assert xi.grad is not None
        return (xi * xi.grad).sum(1)

    # plain() after the patch runs lxt's LayerNorm / GELU / MHA forwards: still one
    # forward + backward of the same model, so the ratios stay comparable.
    base_lxt, t_lxt = paired_times(plain, theirs, a.repeats)
    map_lxt = theirs()
    diff = float((map_ours - map_lxt).abs().max() / map_lxt.abs().max())
    r_ours = [m / b for m, b in zip(t_ours, base_ours, strict=True)]
    r_lxt = [m / b for m, b in zip(t_lxt, base_lxt, strict=True)]
    text = "\n".join(
        [
            "# AttnLRP vs lxt on torchvision's ViT (DeiT-Tiny shape, batch 8, CPU, 1 thread)",
            "",
            "Same rules (lxt's ViT example: CP-LRP, identity LayerNorm / GELU, Gamma 0.25 conv / 0.05 linears). "
            "Ratio = time / a plain forward + input-gradient backward of the same model, median of "
            f"{a.repeats} paired calls.",
            f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_lrp_lxt.py --repeats {a.repeats}`.",
            "",
            "| method | median s | x forward+backward |",
            "|---|---|---|",
            f"| captum_vit AttnLRP | {statistics.median(t_ours):.3f} | {statistics.median(r_ours):.2f} |",
            f"| lxt 2.1 + zennit Gamma | {statistics.median(t_lxt):.3f} | {statistics.median(r_lxt):.2f} |",
            "",
            f"lxt / captum_vit time: **{statistics.median(t_lxt) / statistics.median(t_ours):.2f}x**. "
            f"Largest difference of the two maps / largest |relevance|: {diff:.1e}.",
            "",
        ]
    )
    out = ROOT / "benchmarks" / "results" / "lrp_lxt_speed.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
