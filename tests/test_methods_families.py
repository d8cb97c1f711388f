"""Every method on every model family against an independent, straightforward reference.

The reference gets each layer's attention without captum_vit:

* timm: ``fused_attn`` switched off by hand and every 4-D ``softmax`` result recorded
  with a ``TorchFunctionMode`` (the probabilities the next matmul uses);
* Hugging Face: the model's own ``output_attentions=True`` under eager attention;
* torchvision: the whole forward pass re-computed by hand from the weights.

Gradients ``dy/dA`` come from ``torch.autograd.grad`` on that separate forward, and
the methods are re-implemented as plain Python loops over layers and heads. The token
rows each head pools are written out per family below, independently of the adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import MODEL_FACTORIES, make_model
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from captum_vit import AttentionRollout, GradientRollout, RawAttention

# family -> (number of prefix tokens, pooled rows: "cls" | "cls_dist" | "patches" | "cls+patches")
POOLED_ROWS: dict[str, tuple[int, str]] = {
    "timm_vit": (1, "cls"),
    "timm_deit_distilled": (2, "cls_dist"),
    "timm_registers": (5, "cls"),
    "timm_avgpool": (1, "patches"),
    "timm_eva": (1, "patches"),
    "hf_vit": (1, "cls"),
    "hf_deit_teacher": (2, "cls_dist"),
    "hf_dinov2": (1, "cls+patches"),
    "hf_dinov2_registers": (4, "cls+patches"),
    "hf_clip_vision": (1, "cls"),
    "hf_clip_classifier": (1, "patches"),
    "torchvision_vit": (1, "cls"),
}

ATOL = 1e-5
RTOL = 1e-4


# ------------------------------------------------------------------ reference capture
class _SoftmaxRecorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.probs: list[Tensor] = []

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in (Tensor.softmax, torch.softmax, torch.nn.functional.softmax) and (
            isinstance(out, Tensor) and out.ndim == 4
        ):
            self.probs.append(out)
        return out


def _timm_reference(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    flags = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in flags:
            m.fused_attn = False
        with _SoftmaxRecorder() as rec:
            logits = model(x)
    finally:
        for m, f in flags:
            m.fused_attn = f
    return logits, rec.probs


def _hf_reference(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(pixel_values=x, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    scores = out.logits if getattr(out, "logits", None) is not None else out.pooler_output
    return scores, list(out.attentions)


def _torchvision_reference(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    probs: list[Tensor] = []
    n = x.shape[0]
    t = model.conv_proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([model.class_token.expand(n, -1, -1), t], dim=1)
    enc = model.encoder
    t = t + enc.pos_embedding
    for layer in enc.layers:
        mha = layer.self_attention
        h, d = mha.num_heads, t.shape[-1]
        y = layer.ln_1(t)
        q, k, v = (y @ mha.in_proj_weight.T + mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.reshape(n, -1, h, d // h).transpose(1, 2) for z in (q, k, v))
        a = (q @ k.transpose(-1, -2) / (d // h) ** 0.5).softmax(-1)
        probs.append(a)
        y = (a @ v).transpose(1, 2).reshape(n, -1, d)
        t = t + mha.out_proj(y)
        t = t + layer.mlp(layer.ln_2(t))
    t = enc.ln(t)
    return model.heads(t[:, 0]), probs


def reference_forward(name: str, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Scores and per-layer attention (B, heads, N, N) of an independent forward."""
    if name.startswith("timm"):
        return _timm_reference(model, x)
    if name.startswith("hf"):
        return _hf_reference(model, x)
    return _torchvision_reference(model, x)


def reference_grads(
    name: str, model: nn.Module, x: Tensor, target: Tensor | None
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Attention, dy_target/dA per layer, and the target used (predicted when None)."""
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        scores, attns = reference_forward(name, model, xg)
        t = scores.argmax(1) if target is None else target
        y = sum(scores[i, int(t[i])] for i in range(x.shape[0]))
        grads = torch.autograd.grad(y, attns)
    return [a.detach() for a in attns], [g.detach() for g in grads], t


# ------------------------------------------------------------------ reference methods
def query_weights(name: str, n: int) -> Tensor:
    prefix, rows = POOLED_ROWS[name]
    w = torch.zeros(n)
    patches = n - prefix
    if rows == "cls":
        w[0] = 1
    elif rows == "cls_dist":
        w[0] = w[1] = 0.5
    elif rows == "patches":
        w[prefix:] = 1 / patches
    else:
        w[0] = 0.5
        w[prefix:] = 0.5 / patches
    return w


def read_map(name: str, matrix: Tensor, grid: tuple[int, int]) -> Tensor:
    """Pooled rows of one sample's (N, N) matrix at the patch columns -> (gh, gw)."""
    prefix, _ = POOLED_ROWS[name]
    w = query_weights(name, matrix.shape[-1])
    row = sum(w[i] * matrix[i] for i in range(len(w)) if w[i] != 0)
    assert isinstance(row, Tensor)
    return row[prefix:].reshape(grid)


def fuse(per_head: Tensor, fusion: str) -> Tensor:
    """(heads, N, N) -> (N, N) by a loop over heads."""
    out = per_head[0].clone()
    for h in range(1, per_head.shape[0]):
        if fusion == "mean":
            out = out + per_head[h]
        elif fusion == "max":
            out = torch.maximum(out, per_head[h])
        else:
            out = torch.minimum(out, per_head[h])
    return out / per_head.shape[0] if fusion == "mean" else out


def discard(f: Tensor, ratio: float, protected: list[int]) -> Tensor:
    """Zero the k = floor(ratio * N²) smallest entries, protected diagonals excluded."""
    n = f.shape[0]
    k = int(round(ratio * n * n, 9))
    if k == 0:
        return f
    key = f.clone()
    for i in protected:
        key[i, i] = float("inf")
    order = torch.sort(key.flatten(), stable=True).indices
    out = f.flatten().clone()
    out[order[:k]] = 0.0
    return out.reshape(n, n)


def ref_rollout(
    name: str, per_layer: list[Tensor], fusion: str, ratio: float, w: float, start: int
) -> Tensor:
    """(N, N) rollout of one sample from per-layer (heads, N, N) maps."""
    n = per_layer[0].shape[-1]
    protected = [i for i, q in enumerate(query_weights(name, n)) if q > 0]
    r = torch.eye(n)
    for a in per_layer[start:]:
        f = discard(fuse(a, fusion), ratio, protected)
        m = (1 - w) * f + w * torch.eye(n)
        sums = m.sum(1, keepdim=True)
        m = m / torch.where(sums > 0, sums, torch.ones_like(sums))
        r = m @ r
    return r


def ref_chefer(per_layer: list[Tensor], grads: list[Tensor], start: int) -> Tensor:
    n = per_layer[0].shape[-1]
    r = torch.eye(n)
    for a, g in list(zip(per_layer, grads, strict=True))[start:]:
        cam = sum((g[h] * a[h]).clamp(min=0) for h in range(a.shape[0])) / a.shape[0]
        r = r + cam @ r
    return r


def grid_of(name: str, n_tokens: int, x: Tensor) -> tuple[int, int]:
    prefix, _ = POOLED_ROWS[name]
    patches = n_tokens - prefix
    h, w = x.shape[-2:]
    gh = round((patches * h / w) ** 0.5)
    assert patches % gh == 0
    return gh, patches // gh


def _grid(t: Any) -> Tensor:
    assert isinstance(t, Tensor)
    return t[:, 0]


# ------------------------------------------------------------------ the tests
@pytest.fixture(params=sorted(MODEL_FACTORIES), scope="module")
def family(request: pytest.FixtureRequest) -> tuple[str, nn.Module, Tensor]:
    model, size = make_model(request.param)
    torch.manual_seed(1)
    with torch.no_grad():
        # Zero-initialised tokens (CLS, registers, position) make equal attention entries;
        # jitter every parameter so that no two entries tie at a discard threshold.
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if request.param == "timm_vit":
        size = 64  # test_vit takes any size (dynamic_img_size); 4x4 patches keeps it quick
    return request.param, model, torch.randn(2, 3, size, size)


def test_reference_forward_matches_model(family: tuple[str, nn.Module, Tensor]) -> None:
    name, model, x = family
    with torch.no_grad():
        scores, attns = reference_forward(name, model, x)
        out = model(x)
    plain = out if isinstance(out, Tensor) else (out.logits if hasattr(out, "logits") and out.logits is not None else out.pooler_output)
    torch.testing.assert_close(scores, plain, atol=1e-5, rtol=1e-4)
    assert len(attns) == len(RawAttention(model).adapter.attention_modules)


def test_raw_attention_matches_reference(family: tuple[str, nn.Module, Tensor]) -> None:
    name, model, x = family
    with torch.no_grad():
        _, attns = reference_forward(name, model, x)
    grid = grid_of(name, attns[0].shape[-1], x)
    for layer, fusion in [(-1, "mean"), (0, "max"), (0, "min")]:
        got = _grid(RawAttention(model, layer=layer, head_fusion=fusion).attribute(x, return_patch_grid=True))
        for i in range(x.shape[0]):
            want = read_map(name, fuse(attns[layer][i], fusion), grid)
            torch.testing.assert_close(got[i], want, atol=ATOL, rtol=RTOL)
    maps = RawAttention(model).attention_maps(x)
    assert maps.shape == (x.shape[0], len(attns), attns[0].shape[1], *grid)
    for i in range(x.shape[0]):
        for layer, a in enumerate(attns):
            for h in range(a.shape[1]):
                want = read_map(name, a[i, h], grid)
                torch.testing.assert_close(maps[i, layer, h], want, atol=ATOL, rtol=RTOL)


ROLLOUT_SETTINGS: list[dict[str, Any]] = [
    {},
    {"head_fusion": "max", "discard_ratio": 0.9, "residual_weight": 0.0},
    {"head_fusion": "min", "discard_ratio": 0.5, "residual_weight": 0.3, "start_layer": 1},
    # no discarding: attribute() reads only the query rows of the last layer
    {"head_fusion": "max", "residual_weight": 0.0},
    {"head_fusion": "min", "start_layer": -1},
]


def test_attention_rollout_matches_reference(family: tuple[str, nn.Module, Tensor]) -> None:
    name, model, x = family
    with torch.no_grad():
        _, attns = reference_forward(name, model, x)
    grid = grid_of(name, attns[0].shape[-1], x)
    for kw in ROLLOUT_SETTINGS:
        ro = AttentionRollout(model, **kw)
        r = ro.rollout(x)
        got = _grid(ro.attribute(x, return_patch_grid=True))
        for i in range(x.shape[0]):
            want_r = ref_rollout(
                name,
                [a[i] for a in attns],
                kw.get("head_fusion", "mean"),
                kw.get("discard_ratio", 0.0),
                kw.get("residual_weight", 0.5),
                kw.get("start_layer", 0),
            )
            torch.testing.assert_close(r[i], want_r, atol=ATOL, rtol=RTOL, msg=lambda m, kw=kw: f"{kw}: {m}")
            torch.testing.assert_close(got[i], read_map(name, want_r, grid), atol=ATOL, rtol=RTOL)


def _targets(name: str, model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        scores, _ = reference_forward(name, model, x)
    return torch.tensor([1, scores.shape[1] - 1])[: x.shape[0]]


def test_chefer_matches_reference(family: tuple[str, nn.Module, Tensor]) -> None:
    name, model, x = family
    t = _targets(name, model, x)
    attns, grads, _ = reference_grads(name, model, x, t)
    grid = grid_of(name, attns[0].shape[-1], x)
    for start in (0, len(attns) - 1):
        gr = GradientRollout(model, start_layer=start)
        rel = gr.relevance(x, target=t)
        got = _grid(gr.attribute(x, target=t, return_patch_grid=True))
        for i in range(x.shape[0]):
            want = ref_chefer([a[i] for a in attns], [g[i] for g in grads], start)
            torch.testing.assert_close(rel[i], want, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(got[i], read_map(name, want, grid), atol=ATOL, rtol=RTOL)


def test_gradient_rollout_variant_matches_reference(family: tuple[str, nn.Module, Tensor]) -> None:
    name, model, x = family
    attns, grads, pred = reference_grads(name, model, x, None)  # target=None: predicted
    grid = grid_of(name, attns[0].shape[-1], x)
    for kw in ({}, {"head_fusion": "max", "discard_ratio": 0.5, "residual_weight": 0.2}):
        gr = GradientRollout(model, variant="rollout", **kw)
        got = _grid(gr.attribute(x, return_patch_grid=True))
        for i in range(x.shape[0]):
            weighted = [(g[i] * a[i]).clamp(min=0) for a, g in zip(attns, grads, strict=True)]
            want = ref_rollout(
                name,
                weighted,
                kw.get("head_fusion", "mean"),
                kw.get("discard_ratio", 0.0),
                kw.get("residual_weight", 0.5),
                0,
            )
            torch.testing.assert_close(got[i], read_map(name, want, grid), atol=ATOL, rtol=RTOL)
    # predicted class is what target=None picks
    explicit = _grid(GradientRollout(model, variant="rollout").attribute(x, target=pred, return_patch_grid=True))
    implicit = _grid(GradientRollout(model, variant="rollout").attribute(x, return_patch_grid=True))
    torch.testing.assert_close(explicit, implicit)


METHODS: list[tuple[str, Callable[[nn.Module], Any]]] = [
    ("raw", lambda m: RawAttention(m)),
    ("raw0", lambda m: RawAttention(m, layer=0, head_fusion="max")),
    ("rollout", lambda m: AttentionRollout(m, head_fusion="max", discard_ratio=0.5)),
    ("rollout_rows", lambda m: AttentionRollout(m)),
    ("rollout_last", lambda m: AttentionRollout(m, start_layer=-1, head_fusion="min")),
    ("chefer", lambda m: GradientRollout(m)),
    ("grad_rollout", lambda m: GradientRollout(m, variant="rollout", discard_ratio=0.3)),
]


def test_batch_equals_single(family: tuple[str, nn.Module, Tensor]) -> None:
    _, model, x = family
    x = torch.cat([x, x[:1] * 0.5])  # 3 different samples
    targets = torch.tensor([0, 1, 1])
    for label, make in METHODS:
        method = make(model)
        batch = method.attribute(x, target=targets)
        assert isinstance(batch, Tensor) and batch.shape == x.shape and batch.is_contiguous()
        for i in range(x.shape[0]):
            single = method.attribute(x[i : i + 1], target=int(targets[i]))
            torch.testing.assert_close(batch[i : i + 1], single, atol=1e-6, rtol=1e-5, msg=lambda m, label=label: f"{label}: {m}")
