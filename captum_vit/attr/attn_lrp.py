"""AttnLRP: layer-wise relevance propagation for Vision Transformers (Achtibat et al. 2024;
CP-LRP of Ali et al. 2022), as input x modified gradient."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from captum.attr import GradientAttribution
from torch import Tensor, nn

from .. import _lrp
from .._capture import ViTAdapter, resolve_adapter
from .._compat import log_usage
from .._utils import TargetType, _forward_args, _resolve_target, _unpack_inputs
from ._common import _check_layer_index, _format_output

__all__ = ["AttnLRP"]

#: The default rules (chosen on held-out ImageNet images, see the class docstring).
DEFAULT_RULES: dict[str, Any] = {
    "attention": "cp",
    "norm": "identity",
    "activation": "identity",
    "patch_embed": ("gamma", 0.1),
    "mlp": ("gamma", 0.05),
    "head": ("gamma", 0.05),
    "attn_proj": "gradient",
    "epsilon": 1e-6,
}


def _linear_rule(kind: str, value: Any) -> _lrp.LinearRule:
    if value in ("epsilon", "gradient"):
        return (str(value), 0.0)
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and value[0] == "gamma"
        and isinstance(value[1], numbers.Real)
        and not isinstance(value[1], bool)
        and math.isfinite(float(value[1]))
        and float(value[1]) >= 0
    ):
        return ("gamma", float(value[1]))
    raise ValueError(
        f"rules[{kind!r}] must be 'gradient', 'epsilon' or ('gamma', g) with g >= 0, got {value!r}"
    )


def _resolve_rules(rules: Mapping[str, Any] | None) -> _lrp.Rules:
    if rules is not None and not isinstance(rules, Mapping):
        raise TypeError(f"rules must be a dict, got {type(rules).__name__}")
    merged = dict(DEFAULT_RULES)
    unknown = sorted(set(rules or {}) - set(DEFAULT_RULES))
    if unknown:
        raise ValueError(f"unknown rule key(s) {unknown}; the keys are {sorted(DEFAULT_RULES)}")
    merged.update(rules or {})
    if merged["attention"] not in _lrp.ATTENTION_RULES:
        raise ValueError(
            f"rules['attention'] must be one of {_lrp.ATTENTION_RULES}, got {merged['attention']!r}"
        )
    for key in ("norm", "activation"):
        if merged[key] not in _lrp.IDENTITY_CHOICES:
            raise ValueError(
                f"rules[{key!r}] must be one of {_lrp.IDENTITY_CHOICES}, got {merged[key]!r}"
            )
    eps = merged["epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= float(eps) < math.inf:
        raise ValueError(f"rules['epsilon'] must be a float >= 0, got {eps!r}")
    return _lrp.Rules(
        attention=str(merged["attention"]),
        norm=str(merged["norm"]),
        activation=str(merged["activation"]),
        linear={k: _linear_rule(k, merged[k]) for k in _lrp.LINEAR_KINDS},
        epsilon=float(eps),
    )


class AttnLRP(GradientAttribution):
    r"""Signed, class-specific relevance by layer-wise relevance propagation.

    Relevance is input x modified gradient (lxt's "efficient" AttnLRP): one forward
    pass with per-module rules, one backward pass from the raw score (logit) of the
    target class, ``R = x ⊙ ∂̃y/∂x``. The rules, by module kind:

    * ``"attention"``: ``"cp"`` (CP-LRP, Ali et al. 2022: attention probabilities
      held constant, no relevance through the softmax) or ``"attnlrp"`` (Achtibat
      et al. 2024: the softmax's own gradient, which in gradient x input form is
      AttnLRP's softmax rule, and the uniform rule on both matmuls: half of
      ``softmax(q kᵀ) v``'s relevance to each factor, half of the scores' relevance
      to ``q`` and to ``k``).
    * ``"norm"``: ``"identity"`` (LayerNorm / RMSNorm with the standard deviation
      detached, the identity rule on the normalisation) or ``"gradient"``.
    * ``"activation"``: ``"identity"`` (GELU / SiLU / Mish-type activations pass
      relevance unchanged: gradient ``y / x``) or ``"gradient"``. The product of a
      gated MLP (timm SwiGLU / GluMlp) always takes the uniform rule.
    * ``"patch_embed"``, ``"mlp"``, ``"head"``, ``"attn_proj"``: the linear layers /
      convolutions before the first block, inside the blocks' MLPs, after the last
      block, and the attention's query / key / value and output projections:
      ``"gradient"`` (the plain gradient, LRP-0), ``"epsilon"`` (LRP-ε with
      ``rules["epsilon"]``) or ``("gamma", g)`` (zennit's generalised Gamma rule,
      favouring positive contributions by ``g``, computed as a modified gradient
      with one extra product ``|x| |W|``; its denominator is stabilised by
      ``rules["epsilon"]`` as in zennit). ``"attn_proj"`` other than
      ``"gradient"`` needs projections called as modules (timm, Hugging Face,
      custom ViTs); ``nn.MultiheadAttention`` (torchvision) applies them
      functionally and raises ``ValueError`` there. Under ``"cp"`` only the value
      part of a projection carries relevance.
    * ``"epsilon"``: the ε of LRP-ε and of Gamma's stabiliser.

    Conservation: the identity and uniform rules conserve relevance exactly; biases
    (and ε) absorb their share, so the total input relevance equals the target
    logit only for bias-free layers with ε = 0.

    Families: timm (incl. DeiT distilled, register models, EVA), Hugging Face ViT /
    DeiT / Dinov2 / CLIP vision and torchvision ViT get every rule. A custom ViT
    (``adapt(model, attention_modules=...)``) gets the norm and activation rules by
    module type (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GELU``, ``nn.SiLU`` ...) and
    the linear rules by position (before / inside / after its blocks); its
    attention supports ``"cp"`` only, realised by detaching the captured attention
    modules' outputs, which must be the probability tensors used downstream (e.g.
    the softmax or attention-dropout modules); ``"attnlrp"`` raises ``ValueError``
    there (it needs the queries and keys). An ``nn.MultiheadAttention`` given as a
    custom attention module is treated like torchvision's.

    Nothing global is patched: the rules are forward hooks on this model's module
    instances, registered for one call and removed in ``finally`` (also when the
    call raises), acting only in the calling thread; forward values are unchanged
    and no flag is switched.

    Defaults (``rules=None``): ``{"attention": "cp", "norm": "identity",
    "activation": "identity", "patch_embed": ("gamma", 0.1), "mlp": ("gamma", 0.05),
    "head": ("gamma", 0.05), "attn_proj": "gradient", "epsilon": 1e-6}`` (lxt's ViT
    example as it acts on torchvision's ViT: Gamma on the patch convolution and on the
    Linear modules that model calls, its MLPs and head; the attention projections,
    applied functionally there, stay LRP-0). Chosen on 50 held-out ImageNet images (every 10th of the shared sample,
    none of them among the reported ones) with the bundled DeiT-Tiny, by the
    negative-minus-positive AUC of top-1 accuracy when the pixels of removed patches
    are set to 0 in the normalised input: the defaults 0.491, Chefer relevance 0.436.
    No alternative beat the defaults by more than the noise (paired difference,
    95% bootstrap CI): Gamma on the attention projections 0.05 / 0.25 / 1.0:
    -0.006 / +0.018 / -0.008; Gamma 0.1 or 0.25 on MLPs and head -0.013 / -0.010;
    epsilon on the head -0.001; lxt's example with Gamma 0.25 on the patch embedding
    and 0.05 on every linear, projections included, -0.014; Gamma 0.25 on every
    linear +0.027 [-0.023, +0.086] (the best of ten, and not better on the token-zero
    test: +0.004); AttnLRP's softmax rule -0.051 [-0.103, -0.005]. A second sweep, one
    setting at a time: patch embedding LRP-0 / Gamma 0.03 / 0.25 / 0.5 / 100: -0.021 /
    -0.015 / +0.000 / -0.009 / -0.017; MLPs epsilon / Gamma 0.02: -0.072 / -0.049; head
    Gamma 0.25 +0.002; ε 1e-2 / 1e-1 / 1: +0.005 / -0.009 / -0.274; the gradient instead
    of the identity rule on LayerNorm / GELU: -0.376 / -0.130. The patch grid sums the
    pixel relevance (ranking patches by token relevance at the patch embedding instead:
    -0.036 [-0.067, -0.009]), and relevance starts at the logit (log-softmax: -0.052).
    On the 450 reported images the defaults beat Chefer relevance by +0.040
    [+0.019, +0.062] (token-zero +0.065). ``benchmarks/results/lrp_tuning.md``,
    ``lrp_probe.md`` and ``lrp_eval.md`` have every number.

    Args:
        model (nn.Module): a ViT supported by :func:`captum_vit.adapt`.
        rules (dict, optional): rules overriding the defaults, keys as above.
            Default: None
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None

    Example::

        >>> lrp = AttnLRP(model)
        >>> r = lrp.attribute(images, target=281)          # (B, 3, H, W), signed
        >>> grid = lrp.attribute(images, return_patch_grid=True)   # (B, 1, gh, gw)
        >>> cp = AttnLRP(model, rules={"attention": "attnlrp", "mlp": "epsilon"})
        >>> g = AttnLRP(model, rules={"attn_proj": ("gamma", 0.25)})   # Gamma on qkv / proj
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rules: Mapping[str, Any] | None = None,
        adapter: ViTAdapter | None = None,
    ) -> None:
        self.adapter = resolve_adapter(model, adapter)
        super().__init__(self.adapter.forward)
        self.model = model
        self.rules = _resolve_rules(rules)
        # Find every rule's modules now, so that an unsupported model fails here.
        _lrp.check_rules(_lrp.plan(self.adapter), self.rules)

    @property
    def multiplies_by_inputs(self) -> bool:
        return True

    def has_convergence_delta(self) -> bool:
        return False

    @log_usage
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        layer: int | None = None,
        return_patch_grid: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""Relevance of each input pixel (or of block ``layer``'s output tokens).

        Args:
            inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)``.
            target (int, list or Tensor, optional): class per sample (Captum style);
                ``None`` = each sample's predicted class. Default: None
            additional_forward_args (Any, optional): extra forward arguments.
                Default: None
            layer (int, optional): explain the tokens leaving this block instead of
                the pixels: ``R = Σ_d h_d ∂̃y/∂h_d`` per patch token of block
                ``layer``'s output (latent relevance; prefix tokens are left out),
                returned on the patch grid ``(B, 1, gh, gw)`` whatever
                ``return_patch_grid`` says (tokens have no pixels; Captum's layer
                attributions likewise come in the layer's shape, not the input's).
                Negative values count from the end. Default: None
            return_patch_grid (bool, optional): return ``(B, 1, gh, gw)``: the
                pixel relevance summed over channels and the pixels of each patch.
                Default: False

        Returns:
            Tensor or tuple[Tensor]: signed relevance, float in the inputs' dtype:
            ``(B, C, H, W)`` per pixel and channel, or ``(B, 1, gh, gw)`` with
            ``return_patch_grid=True`` or ``layer``.
        """
        x, as_tuple = _unpack_inputs(inputs)
        self.adapter.check_inputs(x)
        if not isinstance(return_patch_grid, bool):
            raise TypeError("return_patch_grid must be a bool")
        block = None if layer is None else _check_layer_index(layer, self.adapter.num_layers, "layer")
        args = _forward_args(additional_forward_args)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            with _lrp.lrp_rules(self.adapter, self.rules, capture_layer=block) as session:
                scores = self.adapter.forward(xg, *args)
            session.check_projections()
            t = _resolve_target(target, scores)
            score = scores.gather(1, t[:, None]).sum()
            wrt = xg if block is None else session.block_output
            if block is not None and (not isinstance(wrt, Tensor) or wrt.ndim != 3):
                raise RuntimeError(
                    f"block {block} did not produce a token sequence (B, N, D) during the "
                    "forward pass"
                )
            if not score.requires_grad:
                raise RuntimeError("the target score does not depend on the inputs")
            assert isinstance(wrt, Tensor)
            (grad,) = torch.autograd.grad(score, [wrt], allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(wrt)
        relevance = (wrt.detach() * grad.detach()).float()
        if block is None:
            if not return_patch_grid:
                out = relevance.to(x.dtype) if x.is_floating_point() else relevance
                return (out.contiguous(),) if as_tuple else out.contiguous()
            maps = self._pixels_to_grid(relevance, x)
        else:
            lay = self.adapter.layout(x, int(relevance.shape[1]))
            tokens = relevance.sum(-1)[:, lay.num_prefix_tokens :]
            maps = tokens.reshape(tokens.shape[0], *lay.grid)
        return _format_output(maps, x, return_patch_grid=return_patch_grid or block is not None, as_tuple=as_tuple)

    def _pixels_to_grid(self, relevance: Tensor, x: Tensor) -> Tensor:
        """Sum ``(B, C, H, W)`` pixel relevance over channels and patches: ``(B, gh, gw)``."""
        gh, gw = self.adapter.grid_size(x)
        ph, pw = self.adapter.patch_size
        r = relevance.sum(1)
        h, w = gh * ph, gw * pw
        r = r[:, :h, :w]
        if r.shape[-2] < h or r.shape[-1] < w:  # dynamically padded models
            r = torch.nn.functional.pad(r, (0, w - r.shape[-1], 0, h - r.shape[-2]))
        return r.reshape(r.shape[0], gh, ph, gw, pw).sum((2, 4))
