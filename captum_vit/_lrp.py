"""LRP rules as modified gradients, installed per call on one model's instances.

Private to the capture layer and :class:`captum_vit.AttnLRP`: this module knows
where each family's attention keeps q, k and the input of the output projection,
which norm and activation modules a ViT uses, and how to turn an LRP rule into a
gradient modification (relevance = input x modified gradient, as in lxt's
"efficient" implementation of AttnLRP / CP-LRP).

Every rule is a forward hook (or pre-hook) on one module *instance*, of the capture
layer's thread-dispatched kind (shared, reference-counted, removed when the last call
using it returns, also on errors). Hooks leave every forward value unchanged (each
rule is an autograd node whose forward copies the module's output) and act only for
the thread that opened :func:`lrp_rules`: a plain ``model(x)`` or another captum_vit
method running in another thread at the same time sees the unmodified model and
unmodified gradients. No class, global flag or forward is patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._capture import (
    UnsupportedModelError,
    ViTAdapter,
    _find_blocks,
    _thread_forward_hook,
    _thread_forward_pre_hook,
)

__all__: list[str] = []

LinearRule = tuple[str, float]  # ("gradient", 0.0), ("epsilon", 0.0) or ("gamma", g)

#: Module kinds whose linear / convolution layers take a configurable rule
#: (``attn_proj``: the attention's query / key / value and output projections).
LINEAR_KINDS = ("patch_embed", "mlp", "head", "attn_proj")
ATTENTION_RULES = ("cp", "attnlrp")
IDENTITY_CHOICES = ("identity", "gradient")


@dataclass(frozen=True)
class Rules:
    """Resolved rules of one :class:`~captum_vit.AttnLRP` instance."""

    attention: str
    norm: str
    activation: str
    linear: Mapping[str, LinearRule]
    epsilon: float


# ---------------------------------------------------------------------- gradient tools
class _Reroute(torch.autograd.Function):
    """Forward: a copy of ``value``. Backward: ``g * factor_i`` to each ``source_i``.

    The rules below are all "this output, but with that gradient": one autograd node
    instead of a chain of elementwise ops keeps their cost near a plain backward.
    """

    @staticmethod
    def forward(ctx: Any, value: Tensor, *pairs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.factors = pairs[1::2]
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        out: list[Tensor | None] = [None]
        for f in ctx.factors:
            out.extend([grad * f, None])
        return tuple(out)


class _NormIdentity(torch.autograd.Function):
    """Forward: a copy of the norm's output. Backward: the norm's gradient with the
    standard deviation (RMS) held constant: ``(gw - mean(gw)) / σ`` (LayerNorm) or
    ``gw / rms`` (RMSNorm), ``gw = g ⊙ weight``, over the normalised dims."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, y: Tensor, inv: Tensor, weight: Tensor | None, dims: tuple[int, ...], center: bool
    ) -> Tensor:
        ctx.save_for_backward(inv, weight)
        ctx.dims, ctx.center = dims, center
        return y.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        inv, weight = ctx.saved_tensors
        gw = grad * weight if weight is not None else grad
        if ctx.center:
            gw = gw - gw.mean(ctx.dims, keepdim=True)
        return (gw * inv).to(grad.dtype), None, None, None, None, None


def _scale_grad(value: Tensor, factor: float) -> Tensor:
    """``value`` unchanged, its gradient multiplied by ``factor`` (the uniform rule)."""
    if factor == 0.0:
        return value.detach()
    if factor == 1.0 or not value.requires_grad:
        return value
    out: Tensor = _Reroute.apply(value, value, torch.tensor(factor, dtype=value.dtype, device=value.device))
    return out


def _stabilize(d: Tensor, eps: float) -> Tensor:
    """zennit's ``stabilize``: ``d + eps * sign(d)``, with sign(0) = +1."""
    return d + eps * ((d == 0).to(d) + d.sign())


def _ratio(num: Tensor, den: Tensor, eps: float) -> Tensor:
    """``num / stabilize(den)``, 0 where the stabilised denominator is 0 (eps = 0)."""
    s = _stabilize(den, eps)
    return torch.where(s == 0, torch.zeros_like(num), num / torch.where(s == 0, torch.ones_like(s), s))


def epsilon_linear(z: Tensor, eps: float) -> Tensor:
    """LRP-epsilon as a modified gradient: ``R_in = x ⊙ Wᵀ (R_out / (z + ε sign z))``."""
    if not z.requires_grad:
        return z
    with torch.no_grad():
        c = _ratio(z, z, eps)
    out: Tensor = _Reroute.apply(z, z, c)
    return out


def gamma_output(module: nn.Module, x: Tensor, z: Tensor, gamma: float, eps: float) -> Tensor:
    """zennit's generalised Gamma rule on a linear or convolution as a modified gradient.

    With ``P`` / ``N`` the sums of the positive / negative contributions ``x_i w_ji``,
    ``z⁺ = z + γ (P + b⁺)`` serves outputs ``z > 0`` and ``z⁻ = z + γ (N + b⁻)``
    outputs ``z < 0``; the relevance ``R_in = x ⊙ (∂z^±/∂x)ᵀ (R_out / z^±)`` equals
    zennit's five-pass ``Gamma`` rule. ``P`` and ``N`` come from one extra product
    ``A = |x| |W| + |b|``: ``P + b⁺ - b/2 = (z - b + A) / 2`` and
    ``N + b⁻ - b/2 = (z - b - A) / 2``, whose gradients ``(W ± sign(x) |W|) / 2`` are
    ``W⁺`` / ``W⁻`` on positive / negative inputs. Hence
    ``z^± = (1 + γ/2) z ± (γ/2) A`` and ``|z^±| = (1 + γ/2) |z| + (γ/2) A``; the
    modified gradient sends ``g (1 + γ/2) |z| / |z^±|`` to ``z`` and
    ``g (γ/2) z / |z^±|`` to ``A`` (zennit's stabiliser adds ``ε`` to ``|z^±|``).
    """
    if not z.requires_grad:
        return z
    weight = module.weight
    assert isinstance(weight, Tensor)
    bias = getattr(module, "bias", None)
    b_abs = bias.abs() if isinstance(bias, Tensor) else None
    if isinstance(module, nn.Linear):
        a = F.linear(x.abs(), weight.abs(), b_abs)
    else:
        assert isinstance(module, nn.Conv2d)
        a = F.conv2d(
            x.abs(), weight.abs(), b_abs, module.stride, module.padding, module.dilation, module.groups
        )
    half = gamma / 2
    with torch.no_grad():
        z_abs = z.abs()
        den = torch.add(z_abs, a, alpha=half / (1 + half))  # |z^±| / (1 + γ/2)
        den = den + eps / (1 + half) if eps > 0 else den.clamp(min=torch.finfo(den.dtype).tiny)
        q = den.reciprocal_()
        f_z = z_abs.mul_(q)
        f_a = q.mul_(z).mul_(half / (1 + half))
    out: Tensor = _Reroute.apply(z, z, f_z, a, f_a)
    return out


def identity_activation(x: Tensor, y: Tensor) -> Tensor:
    """The identity rule on an elementwise activation (lxt: ``y / (x + 1e-10)``)."""
    if not x.requires_grad:
        return y
    with torch.no_grad():
        ratio = y / (x + 1e-10)
    out: Tensor = _Reroute.apply(y, x, ratio)
    return out


def identity_norm(module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The identity rule on LayerNorm / RMSNorm: the same output with std detached."""
    if not x.requires_grad:
        return y
    shape = tuple(getattr(module, "normalized_shape", (x.shape[-1],)))
    dims = tuple(range(-len(shape), 0))
    weight = getattr(module, "weight", None)
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    rms = _is_rms(module)
    with torch.no_grad():
        xf = x.float()
        if rms:
            inv = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
        else:
            var = torch.var(xf, dims, unbiased=False, keepdim=True)
            inv = torch.rsqrt(var + eps)
    w = weight.detach() if isinstance(weight, Tensor) else None
    out: Tensor = _NormIdentity.apply(x, y, inv, w, dims, not rms)
    return out


# ---------------------------------------------------------------------- model knowledge
def _is_rms(module: nn.Module) -> bool:
    return "rms" in type(module).__name__.lower()


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm)):
        return True
    try:
        from timm.layers import RmsNorm
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(module, RmsNorm)


_TORCH_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish)
_HF_ACTIVATIONS = (
    "GELUActivation",
    "GELUTanh",
    "PytorchGELUTanh",
    "NewGELUActivation",
    "FastGELUActivation",
    "QuickGELUActivation",
    "AccurateGELUActivation",
    "SiLUActivation",
    "MishActivation",
)


def _is_activation(module: nn.Module) -> bool:
    if isinstance(module, _TORCH_ACTIVATIONS):
        return True
    cls = type(module)
    return cls.__module__ == "transformers.activations" and cls.__name__ in _HF_ACTIVATIONS


def _gated_product_site(module: nn.Module) -> nn.Module | None:
    """For a gated MLP (timm SwiGLU / GluMlp), the module right after the product."""
    name = type(module).__name__
    if name in ("SwiGLU", "GluMlp") and type(module).__module__.startswith("timm."):
        drop1 = getattr(module, "drop1", None)
        return drop1 if isinstance(drop1, nn.Module) else None
    if name.endswith("SwiGLUFFN") or name.endswith("GatedMLP"):
        raise UnsupportedModelError(
            f"AttnLRP: {name} multiplies its gate functionally; its uniform rule cannot be "
            "installed on a module (use a model with a plain MLP)"
        )
    return None


@dataclass
class _AttentionSite:
    """Where one layer's attention rule acts.

    kind ``"qk"``: ``q`` / ``k`` are modules whose outputs are the queries / keys,
    ``out`` the module whose input is ``softmax(q kᵀ) v`` (heads concatenated).
    kind ``"mha"``: ``module`` is an ``nn.MultiheadAttention`` called as
    ``(query, key, value)``. kind ``"probs"``: ``module`` outputs the probabilities
    used downstream (custom models; constant attention only).
    """

    kind: str
    module: nn.Module
    q: nn.Module | None = None
    k: nn.Module | None = None
    out: nn.Module | None = None


def _attention_site(adapter: ViTAdapter, layer: int) -> _AttentionSite:
    attn = adapter.attention_modules[layer]
    if isinstance(attn, nn.MultiheadAttention):
        return _AttentionSite("mha", attn)
    if adapter.family == "timm":
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(
                f"AttnLRP: {type(attn).__name__} of layer {layer} gates its output; gated "
                "attention has no rule here"
            )
        mods = [getattr(attn, n, None) for n in ("q_norm", "k_norm", "proj")]
        if not all(isinstance(m, nn.Module) for m in mods):
            raise UnsupportedModelError(
                f"AttnLRP: timm attention {type(attn).__name__} of layer {layer} has no "
                "q_norm / k_norm / proj modules"
            )
        return _AttentionSite("qk", attn, q=mods[0], k=mods[1], out=mods[2])
    if adapter.family == "hf":
        q, k = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
        outs = adapter.out_projections
        out = outs[layer] if outs is not None else None
        if not (isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and out is not None):
            raise UnsupportedModelError(
                f"AttnLRP: Hugging Face attention {type(attn).__name__} of layer {layer} has no "
                "q_proj / k_proj / output projection"
            )
        return _AttentionSite("qk", attn, q=q, k=k, out=out)
    return _AttentionSite("probs", attn)


@dataclass
class _Plan:
    """Every module a rule acts on, found once per model."""

    attention: list[_AttentionSite]
    blocks: list[nn.Module]
    norms: list[nn.Module]
    activations: list[nn.Module]
    gated: list[nn.Module]
    block_linears: list[nn.Module]  # MLP linears inside blocks
    outer_linears: list[nn.Module]  # linears / convolutions outside the blocks
    attention_linears: list[nn.Module]  # q / k / v and output projections (module calls)


def plan(adapter: ViTAdapter) -> _Plan:
    """Where every rule acts in ``adapter``'s model (raises for unknown parts); found
    once per adapter and cached on it (read only)."""
    return adapter._cached(("lrp_plan",), lambda: _make_plan(adapter))  # type: ignore[no-any-return]


def _make_plan(adapter: ViTAdapter) -> _Plan:
    model = adapter.model
    blocks = adapter.blocks or _find_blocks(model, adapter.attention_modules)
    if blocks is None or len(blocks) != adapter.num_layers:
        raise UnsupportedModelError(
            "AttnLRP needs the transformer blocks (one per attention layer): pass blocks= to "
            "captum_vit.adapt"
        )
    sites = [_attention_site(adapter, i) for i in range(adapter.num_layers)]
    in_attention: set[int] = set()
    for block, site in zip(blocks, sites, strict=True):
        for child in block.children():
            sub = {id(m) for m in child.modules()}
            if id(site.module) in sub or (site.out is not None and id(site.out) in sub):
                in_attention |= sub
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    norms: list[nn.Module] = []
    acts: list[nn.Module] = []
    gated: list[nn.Module] = []
    block_lin: list[nn.Module] = []
    outer_lin: list[nn.Module] = []
    attn_lin: list[nn.Module] = []
    for m in model.modules():
        if _is_norm(m):
            norms.append(m)
        elif _is_activation(m):
            acts.append(m)
        product = _gated_product_site(m)
        if product is not None:
            gated.append(product)
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if id(m) in in_attention:
                attn_lin.append(m)
            else:
                (block_lin if id(m) in in_blocks else outer_lin).append(m)
    return _Plan(sites, list(blocks), norms, acts, gated, block_lin, outer_lin, attn_lin)


def check_rules(p: _Plan, rules: Rules) -> None:
    """Raise ``ValueError`` for a rule that cannot act on the planned model."""
    if rules.attention == "attnlrp" and any(s.kind == "probs" for s in p.attention):
        raise ValueError(
            "attention rule 'attnlrp' needs the queries, keys and the attention output of "
            "each layer, which captum_vit knows for timm, Hugging Face and torchvision "
            "models only; for a custom model use rules={'attention': 'cp'} (constant "
            "attention through the captured probabilities)"
        )
    if rules.linear["attn_proj"][0] != "gradient" and any(s.kind == "mha" for s in p.attention):
        raise ValueError(
            "rules['attn_proj'] other than 'gradient' needs attention projections called as "
            "modules; nn.MultiheadAttention (torchvision's ViT) applies its projection weights "
            "functionally, so use rules={'attn_proj': 'gradient'} for this model"
        )


# ---------------------------------------------------------------------- the session
class _Session:
    """State of one LRP forward pass."""

    def __init__(self, rules: Rules, capture_layer: int | None) -> None:
        self.rules = rules
        self.capture_layer = capture_layer
        self.in_blocks = False
        self.block_output: Tensor | None = None
        self.projections: list[nn.Module] = []  # attention linears with a rule
        self.fired: set[int] = set()

    def check_projections(self) -> None:
        """Raise if a forward pass left an attention projection with a rule uncalled
        (e.g. timm EVA computes its biased qkv with ``F.linear`` on the module's weight):
        its rule would silently not have acted."""
        missed = [m for m in self.projections if id(m) not in self.fired]
        if missed:
            raise ValueError(
                f"rules['attn_proj']: {len(missed)} attention projection(s) of this model "
                f"(e.g. a {type(missed[0]).__name__}) are not called as modules, so their "
                "rule cannot act; use rules={'attn_proj': 'gradient'} for this model"
            )


def _linear_rule(session: _Session, kind: str, module: nn.Module, x: Tensor, z: Tensor) -> Tensor | None:
    name, value = session.rules.linear[kind]
    if name == "gradient":
        return None
    if name == "gamma":
        return gamma_output(module, x, z, value, session.rules.epsilon)
    if session.rules.epsilon > 0:
        return epsilon_linear(z, session.rules.epsilon)
    return None


Hook = Callable[..., Any]


@contextlib.contextmanager
def lrp_rules(adapter: ViTAdapter, rules: Rules, *, capture_layer: int | None = None) -> Iterator[_Session]:
    """Apply ``rules`` to forward passes of ``adapter.model`` run in this thread.

    Every rule is a hook of the capture layer's thread-dispatched kind
    (:func:`captum_vit._capture._thread_forward_hook`): shared and reference-counted
    across threads, acting only for the thread that opened this context, removed
    when the last context using it closes. Yields the session; with
    ``capture_layer=k`` its ``block_output`` holds block ``k``'s output tokens
    ``(B, N, D)`` after the forward pass.
    """
    p = plan(adapter)
    check_rules(p, rules)
    session = _Session(rules, capture_layer)
    with contextlib.ExitStack() as stack:

        # ``channel`` names the rule: one module may carry hooks of several rules.
        def fwd(m: nn.Module, fn: Hook, channel: str) -> None:
            stack.enter_context(_thread_forward_hook(m, fn, channel=channel))

        def pre(m: nn.Module, fn: Hook, channel: str) -> None:
            stack.enter_context(_thread_forward_pre_hook(m, fn, channel=channel))

        # A norm that computes queries or keys (timm qk-norm) gets its norm rule inside
        # the attention rule's hook: one hook, so the order of the two cannot vary.
        qk_modules = {id(m) for s in p.attention for m in (s.q, s.k) if m is not None}
        if rules.norm == "identity":
            for m in p.norms:
                if id(m) not in qk_modules:
                    fwd(m, lambda mod, args, out: identity_norm(mod, args[0], out), "lrp-norm")
        if rules.activation == "identity":
            for m in p.activations:
                fwd(m, lambda mod, args, out: identity_activation(args[0], out), "lrp-activation")
        for m in p.gated:
            fwd(m, lambda mod, args, out: _scale_grad(out, 0.5), "lrp-gated")
        for m in p.block_linears:
            fwd(m, lambda mod, args, out: _linear_rule(session, "mlp", mod, args[0], out), "lrp-linear")
        if rules.linear["attn_proj"][0] != "gradient":  # "gradient": no hook at all

            def projection(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
                session.fired.add(id(mod))
                return _linear_rule(session, "attn_proj", mod, args[0], out)

            session.projections = list(p.attention_linears)
            for m in p.attention_linears:
                fwd(m, projection, "lrp-linear")
        for m in p.outer_linears:
            fwd(
                m,
                lambda mod, args, out: _linear_rule(
                    session, "head" if session.in_blocks else "patch_embed", mod, args[0], out
                ),
                "lrp-linear",
            )
        norm_qk = rules.norm == "identity"
        for site in p.attention:
            _install_attention(site, rules.attention, norm_qk, fwd, pre)

        def enter_blocks(_m: nn.Module, _args: tuple[Any, ...]) -> None:
            session.in_blocks = True

        pre(p.blocks[0], enter_blocks, "lrp-blocks")
        if capture_layer is not None:

            def keep(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
                session.block_output = out[0] if isinstance(out, (tuple, list)) else out

            fwd(p.blocks[capture_layer], keep, "lrp-layer")
        yield session


def _install_attention(
    site: _AttentionSite,
    rule: str,
    norm_qk: bool,
    fwd: Callable[[nn.Module, Hook, str], None],
    pre: Callable[[nn.Module, Hook, str], None],
) -> None:
    """CP-LRP: no gradient through the softmax. AttnLRP: the softmax's own gradient
    (AttnLRP's softmax rule in gradient x input form) and the uniform rule on both
    matmuls: half of ``softmax(q kᵀ) v``'s relevance to each factor, half of the
    scores' relevance to q and to k."""
    qk = 0.0 if rule == "cp" else 0.5
    if site.kind == "qk":
        assert site.q is not None and site.k is not None and site.out is not None

        def qk_rule(m: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            if norm_qk and _is_norm(m):
                out = identity_norm(m, args[0], out)
            return _scale_grad(out, qk)

        fwd(site.q, qk_rule, "lrp-query")
        fwd(site.k, qk_rule, "lrp-key")
        if rule == "attnlrp":
            pre(site.out, lambda m, args: (_scale_grad(args[0], 0.5), *args[1:]), "lrp-attention-out")
    elif site.kind == "mha":
        v = 1.0 if rule == "cp" else 0.5
        fac = qk * v

        def mha(m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            if len(args) < 3:
                raise UnsupportedModelError(
                    "AttnLRP: nn.MultiheadAttention must be called with query, key, value "
                    "positionally"
                )
            q, k, val = args[:3]
            return (_scale_grad(q, fac), _scale_grad(k, fac), _scale_grad(val, v), *args[3:])

        pre(site.module, mha, "lrp-mha")
    else:

        def probs(m: nn.Module, a: tuple[Any, ...], out: Any) -> Any:
            if not isinstance(out, Tensor):
                raise UnsupportedModelError(
                    f"AttnLRP: the attention module {type(m).__name__} returns "
                    f"{type(out).__name__}; constant attention needs a module whose output "
                    "is the probability tensor used downstream (e.g. the softmax or the "
                    "attention dropout)"
                )
            return out.detach()

        fwd(site.module, probs, "lrp-probs")
