"""Run in a subprocess by test_attn_lrp.py: AttnLRP vs lxt's own CP-LRP ViT recipe.

lxt's ``monkey_patch`` replaces torch classes for the whole process, irreversibly, so
it must never run inside the test process. ``import lxt.efficient`` fails under
transformers 5 (its BERT module imports removed helpers): the LLM modules, which this
comparison does not use, are stubbed in ``sys.modules`` before the import.

Prints one JSON line: the largest absolute difference of the two maps divided by the
largest absolute relevance, per configuration.
"""

from __future__ import annotations

import json
import sys
import types

import torch
import torchvision


def _import_lxt() -> tuple[object, object]:
    for name in ("llama", "qwen2", "qwen3", "gemma3", "bert", "gpt2"):
        stub = types.ModuleType(f"lxt.efficient.models.{name}")
        setattr(stub, f"modeling_{name}", types.ModuleType(f"modeling_{name}"))
        stub.attnLRP = {}  # type: ignore[attr-defined]
        sys.modules.setdefault(stub.__name__, stub)
    from lxt.efficient import monkey_patch, monkey_patch_zennit

    return monkey_patch, monkey_patch_zennit


def main() -> None:
    from captum_vit import AttnLRP

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision zero-initialises it
    torch.nn.init.normal_(model.heads.head.bias, std=0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 3, 32, 32)
    target = [1, 3, 4]
    configs = {
        "gamma": ({"patch_embed": ("gamma", 0.25), "mlp": ("gamma", 0.05), "head": ("gamma", 0.05)}, (0.25, 0.05)),
        "epsilon0": ({"patch_embed": "epsilon", "mlp": "epsilon", "head": "epsilon", "epsilon": 0.0}, None),
    }
    ours = {
        k: AttnLRP(model, rules={"attention": "cp", **rules}).attribute(x, target=target).sum(1)
        for k, (rules, _) in configs.items()
    }

    monkey_patch, monkey_patch_zennit = _import_lxt()
    from torchvision.models import vision_transformer

    monkey_patch(vision_transformer)
    monkey_patch_zennit()
    import zennit.rules as z_rules
    from zennit.composites import LayerMapComposite

    out: dict[str, float] = {}
    for k, (_, gammas) in configs.items():
        comp = None
        if gammas is not None:
            comp = LayerMapComposite(
                [(torch.nn.Conv2d, z_rules.Gamma(gammas[0])), (torch.nn.Linear, z_rules.Gamma(gammas[1]))]
            )
            comp.register(model)
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.gather(1, torch.tensor(target)[:, None]).sum().backward()
        if comp is not None:
            comp.remove()
        theirs = (xi * xi.grad).sum(1).detach()
        out[k] = float((ours[k] - theirs).abs().max() / theirs.abs().max())
        out[k + "_scale"] = float(theirs.abs().max())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
