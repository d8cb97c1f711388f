"""Attention-head importance (ablation and gradient) and a region probe.

Zeroing a head
--------------
Every attention layer ends in an output projection ``y = W·o + b`` whose input ``o``
is the heads' outputs concatenated head by head (``o = [o_1, …, o_H]``, each of width
``head_dim``), so ``y = Σ_h (W_h·o_h + b/H)`` with ``W_h`` the columns of ``W`` that
read head ``h`` and the bias shared equally by the heads. Zeroing head ``h`` removes
its contribution ``W_h·o_h + b/H``. Zeroing every head of a layer therefore makes
the projection output exactly 0, so the block behaves as if it had no attention
branch (the residual stream passes unchanged; layer scales multiply 0). The
projection is reached through :attr:`ViTAdapter.out_projections` (timm
``attn.proj``, Hugging Face ``o_proj`` / ``out_proj``, torchvision ``out_proj``,
which torchvision calls as a module only inside :meth:`ViTAdapter.capture`; every
forward pass here runs inside a capture).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._capture import TokenLayout, ViTAdapter, _thread_forward_hook, resolve_adapter
from ._progress import progress
from ._token_masking import check_mask, check_replacement, token_masking
from ._utils import (
    TargetType,
    _forward_args,
    _repeat_args,
    _resolve_target,
    _slice_args,
    _unpack_inputs,
    _weighted_rows,
)

__all__ = ["RegionProbe", "ablate_heads", "head_importance", "region_probe"]

_METHODS = ("ablation", "gradient")


def _projections(adapter: ViTAdapter) -> list[nn.Module]:
    projs = adapter.out_projections
    if projs is None:
        raise ValueError(
            f"the adapter of {type(adapter.model).__name__} does not know the attention output "
            "projections; pass adapt(model, ..., out_projections=[one nn.Linear per layer taking "
            "the heads' outputs concatenated head by head])"
        )
    for layer, p in enumerate(projs):
        if not isinstance(getattr(p, "weight", None), Tensor):
            raise TypeError(
                f"out projection of layer {layer} ({type(p).__name__}) has no weight tensor; "
                "expected an nn.Linear"
            )
    return projs


@contextlib.contextmanager
def _head_masking(adapter: ViTAdapter, keep: Sequence[Tensor | None]) -> Iterator[None]:
    """Scale each head's contribution ``W_h·o_h + b/H`` by ``keep[layer][sample, h]``.

    ``keep[layer]`` is ``(batch, heads)`` (1 = untouched, 0 = zeroed) or ``None``
    (layer untouched). The hooks act only on forward passes run by the calling
    thread and are removed in ``finally``.
    """

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
            k = keep[layer]
            if k is None:
                return None
            o = args[0]
            batch, width = int(o.shape[0]), int(o.shape[-1])
            heads = int(k.shape[1])
            if width % heads or int(k.shape[0]) != batch:
                raise ValueError(
                    f"layer {layer}: cannot split the projection input {tuple(o.shape)} into "
                    f"{heads} heads for a head mask of shape {tuple(k.shape)}"
                )
            k = k.to(device=o.device, dtype=o.dtype)
            view = (batch,) + (1,) * (o.ndim - 2)
            channels = k.repeat_interleave(width // heads, dim=1).reshape(*view, width)
            weight = module.weight
            assert isinstance(weight, Tensor)
            y = F.linear(o * channels, weight)
            bias = getattr(module, "bias", None)
            if isinstance(bias, Tensor):
                y = y + bias * k.mean(dim=1).reshape(*view, 1)
            return y

        return hook

    with contextlib.ExitStack() as stack:
        for layer, proj in enumerate(_projections(adapter)):
            stack.enter_context(_thread_forward_hook(proj, make_hook(layer), channel="head_mask"))
        yield


def _heads_per_layer(adapter: ViTAdapter, x: Tensor, args: tuple[Any, ...]) -> tuple[Tensor, int]:
    """Scores of an unmodified captured forward pass and the (common) number of heads."""
    heads: dict[int, int] = {}

    def on_attention(layer: int, attn: Tensor) -> None:
        heads[layer] = int(attn.shape[1])

    adapter.check_inputs(x)
    with adapter.capture(keep=False, on_attention=on_attention):
        scores = adapter.forward(x, *args)
    counts = set(heads.values())
    if len(heads) != adapter.num_layers or len(counts) != 1:
        raise ValueError(
            f"head importance needs every layer to run with the same number of heads; got {heads}"
        )
    return scores, counts.pop()


def ablate_heads(
    model: nn.Module,
    inputs: Tensor,
    head_mask: Tensor,
    additional_forward_args: Any = None,
    *,
    adapter: ViTAdapter | None = None,
) -> Tensor:
    r"""The model's scores with the chosen attention heads zeroed.

    Zeroing head ``h`` of a layer removes its contribution ``W_h·o_h + b/H`` to the
    attention's output projection (module docstring); zeroing all heads of a layer
    removes that layer's attention branch.

    Args:
        model (nn.Module): a ViT supported by :func:`captum_vit.adapt`.
        inputs (Tensor): images ``(B, C, H, W)``.
        head_mask (Tensor): bool ``(layers, heads)`` (same for every sample) or
            ``(B, layers, heads)``; ``True`` = zeroed.
        additional_forward_args (Any, optional): extra forward arguments.
            Default: None
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None

    Returns:
        Tensor: the model's scores ``(B, ...)`` (logits), computed with the caller's
        grad mode.

    Example::

        >>> mask = torch.zeros(12, 3, dtype=torch.bool)
        >>> mask[11] = True                     # drop the last layer's attention
        >>> logits = ablate_heads(model, images, mask)
    """
    adapter = resolve_adapter(model, adapter)
    x, _ = _unpack_inputs(inputs)
    adapter.check_inputs(x)
    _projections(adapter)
    if not isinstance(head_mask, Tensor) or head_mask.dtype != torch.bool:
        raise TypeError("head_mask must be a bool tensor (layers, heads) or (B, layers, heads)")
    batch = int(x.shape[0])
    if head_mask.ndim == 2:
        head_mask = head_mask.unsqueeze(0).expand(batch, -1, -1)
    if head_mask.ndim != 3 or head_mask.shape[0] != batch or head_mask.shape[1] != adapter.num_layers:
        raise ValueError(
            f"head_mask has shape {tuple(head_mask.shape)}; expected ({adapter.num_layers}, heads) "
            f"or ({batch}, {adapter.num_layers}, heads)"
        )
    keep: list[Tensor | None] = [
        None if not bool(head_mask[:, layer].any()) else (~head_mask[:, layer]).float()
        for layer in range(adapter.num_layers)
    ]
    with adapter.capture(keep=False, validate=False), _head_masking(adapter, keep):
        return adapter.forward(x, *_forward_args(additional_forward_args))


def head_importance(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    target: TargetType = None,
    method: str = "ablation",
    adapter: ViTAdapter | None = None,
    *,
    additional_forward_args: Any = None,
    perturbations_per_eval: int | None = None,
    show_progress: bool = False,
) -> Tensor:
    r"""How much each attention head matters for the target class.

    * ``method="ablation"``: ``y(x) - y(x | head (l, h) zeroed)``, the drop of the
      target's raw score (logit) when one head is zeroed (its contribution
      ``W_h·o_h + b/H`` removed, see the module docstring). Positive = the head
      supports the target. All ``layers · heads`` ablations are batched:
      ``perturbations_per_eval`` (layer, head) pairs are evaluated in one forward
      pass of ``perturbations_per_eval · B`` images (default: one pass per layer,
      all its heads at once).
    * ``method="gradient"``: ``Σ_{i,j} |A[l, h, i, j] · ∂y / ∂A[l, h, i, j]|``, the
      first-order (attention × gradient) estimate, from one forward and one
      backward pass for all heads (no loop).

    Result ``i`` of a batch equals that of sample ``i`` alone. Works under
    ``torch.no_grad()``.

    Args:
        model (nn.Module): a ViT supported by :func:`captum_vit.adapt`.
        inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)``.
        target (int, list or Tensor, optional): class per sample; ``None`` = the
            predicted class. Default: None
        method (str, optional): ``"ablation"`` or ``"gradient"``. Default: "ablation"
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None
        additional_forward_args (Any, optional): extra forward arguments; tensors
            whose first dimension is ``B`` are repeated with the batch.
            Default: None
        perturbations_per_eval (int, optional): ablations per forward pass.
            Default: None (the number of heads)
        show_progress (bool, optional): progress bar over the ablation passes.
            Default: False

    Returns:
        Tensor: ``(B, layers, heads)`` float32 importance.

    Example::

        >>> scores = head_importance(model, images, target=285)  # (B, 12, 3)
        >>> fast = head_importance(model, images, method="gradient")
    """
    adapter = resolve_adapter(model, adapter)
    x, _ = _unpack_inputs(inputs)
    args = _forward_args(additional_forward_args)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if perturbations_per_eval is not None and (
        not isinstance(perturbations_per_eval, int) or perturbations_per_eval < 1
    ):
        raise ValueError(f"perturbations_per_eval must be a positive int, got {perturbations_per_eval!r}")
    if method == "gradient":
        return _gradient_importance(adapter, x, target, args)
    _projections(adapter)
    with torch.no_grad():
        scores, heads = _heads_per_layer(adapter, x, args)
        t = _resolve_target(target, scores)
        base = scores.gather(1, t[:, None])[:, 0].float()
        batch, layers = int(x.shape[0]), adapter.num_layers
        pairs = [(layer, h) for layer in range(layers) for h in range(heads)]
        per = perturbations_per_eval or heads
        chunks = [pairs[i : i + per] for i in range(0, len(pairs), per)]
        out = torch.zeros(batch, layers, heads, dtype=torch.float32, device=base.device)
        bar = progress(total=len(chunks), desc="head ablation") if show_progress else None
        try:
            for chunk in chunks:
                k = len(chunk)
                keep: list[Tensor | None] = [None] * layers
                for c, (layer, h) in enumerate(chunk):
                    if keep[layer] is None:
                        keep[layer] = torch.ones(k * batch, heads, device=x.device)
                    keep[layer][c * batch : (c + 1) * batch, h] = 0.0  # type: ignore[index]
                with adapter.capture(keep=False, validate=False), _head_masking(adapter, keep):
                    s = adapter.forward(x.repeat(k, 1, 1, 1), *_repeat_args(args, batch, k))
                vals = s.gather(1, t.repeat(k)[:, None])[:, 0].float().reshape(k, batch)
                for c, (layer, h) in enumerate(chunk):
                    out[:, layer, h] = base - vals[c]
                if bar is not None:
                    bar.update()
        finally:
            if bar is not None:
                bar.close()
    return out


def _gradient_importance(
    adapter: ViTAdapter, x: Tensor, target: TargetType, args: tuple[Any, ...]
) -> Tensor:
    adapter.check_inputs(x)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        with adapter.capture(keep=True) as rec:
            scores = adapter.forward(xg, *args)
        attns = rec.kept()
        t = _resolve_target(target, scores)
        score = scores.gather(1, t[:, None]).sum()
        grads = torch.autograd.grad(score, attns, allow_unused=True)
    per_layer = [
        torch.zeros(a.shape[:2], device=a.device)
        if g is None
        else (a.detach().float() * g.detach().float()).abs().sum(dim=(-2, -1))
        for a, g in zip(attns, grads, strict=True)
    ]
    return torch.stack(per_layer, dim=1)


@dataclass(frozen=True)
class RegionProbe:
    r"""What the heads do with a region of patches, and what the model loses without it.

    Attributes:
        region (Tensor): bool ``(B, gh*gw)``, the probed patches.
        mass (Tensor): ``(B, layers, heads)``; attention mass from the query rows
            (the tokens the head pools, weighted as it pools them) onto the region's
            patch tokens, full image.
        mass_deviation (Tensor): ``(B, layers, heads)``; ``mass`` minus its mean over
            all heads and layers of the sample: which heads look at the region more
            (> 0) or less than the average head.
        attention_shift (Tensor): ``(B, layers, heads)``; total-variation distance,
            in ``[0, 1]``, between each head's query-row attention over the tokens
            that remain when the region is pruned: full image (renormalised over
            those tokens) vs pruned image. How much a head's attention elsewhere
            reorganises without the region.
        target (Tensor): ``(B,)`` class probed.
        score, pruned_score (Tensor): ``(B,)`` target logit with / without the region.
        probability, pruned_probability (Tensor): ``(B,)`` softmax probability of the
            target with / without the region.
        prediction, pruned_prediction (Tensor): ``(B,)`` top-1 class with / without.
    """

    region: Tensor
    mass: Tensor
    mass_deviation: Tensor
    attention_shift: Tensor
    target: Tensor
    score: Tensor
    pruned_score: Tensor
    probability: Tensor
    pruned_probability: Tensor
    prediction: Tensor
    pruned_prediction: Tensor

    def top_heads(self, k: int = 5, by: str = "mass_deviation", sample: int = 0) -> list[tuple[int, int, float]]:
        """The ``k`` (layer, head, value) with the largest ``by`` for one sample.

        Args:
            k (int, optional): how many. Default: 5
            by (str, optional): ``"mass"``, ``"mass_deviation"`` or
                ``"attention_shift"``. Default: "mass_deviation"
            sample (int, optional): sample index. Default: 0

        Returns:
            list[tuple[int, int, float]]: largest first.
        """
        if by not in ("mass", "mass_deviation", "attention_shift"):
            raise ValueError(f"by must be 'mass', 'mass_deviation' or 'attention_shift', got {by!r}")
        values = getattr(self, by)[sample]
        heads = values.shape[1]
        top = values.flatten().topk(min(k, values.numel()))
        return [(int(i) // heads, int(i) % heads, float(v)) for v, i in zip(top.values, top.indices, strict=True)]


def region_probe(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    region: Tensor,
    target: TargetType = None,
    adapter: ViTAdapter | None = None,
    *,
    replacement: str = "drop",
    additional_forward_args: Any = None,
) -> RegionProbe:
    r"""Which heads attend to a region of patches, and what pruning it does.

    Two captured forward passes: the full image, and the image with the region's
    patch tokens pruned through :func:`captum_vit._token_masking.token_masking`
    (``replacement="drop"`` removes them from the sequence; ``"zero"`` / ``"mean"``
    replace their patch embeddings, for models that cannot drop tokens, e.g. rotary
    position embeddings). With ``"drop"``, samples with different region sizes run
    in groups of equal size, and the pruned query rows follow the pooling on the
    remaining tokens (mean pooling averages the remaining patches).

    Args:
        model (nn.Module): a ViT supported by :func:`captum_vit.adapt`.
        inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)``.
        region (Tensor): bool patch mask, ``True`` = in the region: ``(gh, gw)`` or
            ``(gh*gw,)`` for every sample, or ``(B, gh, gw)`` / ``(B, gh*gw)``. Must
            leave at least one patch outside and hold at least one.
        target (int, list or Tensor, optional): class per sample; ``None`` = the
            predicted class on the full image. Default: None
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None
        replacement (str, optional): ``"drop"``, ``"zero"`` or ``"mean"``.
            Default: "drop"
        additional_forward_args (Any, optional): extra forward arguments.
            Default: None

    Returns:
        RegionProbe: per-head attention mass on the region, its deviation from the
        mean head, the attention shift when the region is pruned, and the target's
        score / probability / prediction with and without the region.

    Example::

        >>> box = torch.zeros(14, 14, dtype=torch.bool); box[4:10, 4:10] = True
        >>> probe = region_probe(model, images, box)
        >>> probe.top_heads(3), probe.probability, probe.pruned_probability
    """
    adapter = resolve_adapter(model, adapter)
    x, _ = _unpack_inputs(inputs)
    replacement = check_replacement(replacement)
    args = _forward_args(additional_forward_args)
    grid = adapter.grid_size(x)
    batch = int(x.shape[0])
    if isinstance(region, Tensor) and region.ndim == 2 and tuple(region.shape) == grid and grid[0] != batch:
        region = region.reshape(-1)
    mask = check_mask(region, batch, grid).to(x.device)
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()) or bool((counts == mask.shape[1]).any()):
        raise ValueError("region must hold at least one patch and leave at least one patch outside")

    rows: list[Tensor] = []
    with torch.no_grad():
        state: dict[str, TokenLayout] = {}

        def on_full(_layer: int, attn: Tensor) -> None:
            if "layout" not in state:
                state["layout"] = adapter.layout(x, int(attn.shape[-1]))
            rows.append(_weighted_rows(adapter.query_weights(state["layout"]), attn.detach()))

        with adapter.capture(keep=False, on_attention=on_full):
            scores = adapter.forward(x, *args)
        layout = state["layout"]
        t = _resolve_target(target, scores)
        full = torch.stack(rows, dim=1)  # (B, L, H, N)
        p = layout.num_prefix_tokens
        region_cols = torch.cat([torch.zeros(batch, p, dtype=torch.bool, device=x.device), mask], 1)
        mass = (full * region_cols[:, None, None, :]).sum(-1)
        deviation = mass - mass.mean(dim=(1, 2), keepdim=True)

        groups = [torch.arange(batch, device=x.device)]
        if replacement == "drop":
            groups = [torch.nonzero(counts == c).flatten() for c in torch.unique(counts).tolist()]
        pruned_scores = scores.new_empty(scores.shape)
        shift = torch.empty_like(mass)
        for index in groups:
            sub_rows: list[Tensor] = []

            def on_pruned(_layer: int, attn: Tensor, _sub: list[Tensor] = sub_rows) -> None:
                n = int(attn.shape[-1])
                kept = n - p
                sub_layout = TokenLayout(num_tokens=n, num_prefix_tokens=p, grid=(1, kept))
                _sub.append(_weighted_rows(adapter.query_weights(sub_layout), attn.detach()))

            sub_args = _slice_args(args, index, batch)
            with adapter.capture(keep=False, on_attention=on_pruned), token_masking(
                adapter, mask[index], replacement, grid=grid
            ):
                pruned_scores[index] = adapter.forward(x[index], *sub_args)
            pruned = torch.stack(sub_rows, dim=1)  # (b, L, H, N')
            keep_cols = ~region_cols[index]
            if replacement == "drop":
                b_sub, kept = int(index.numel()), int(pruned.shape[-1])
                before = full[index].permute(0, 3, 1, 2)[keep_cols]
                before = before.reshape(b_sub, kept, *before.shape[1:]).permute(0, 2, 3, 1)
            else:
                before = full[index] * keep_cols[:, None, None, :]
                pruned = pruned * keep_cols[:, None, None, :]
            before = before / before.sum(-1, keepdim=True).clamp_min(1e-12)
            pruned = pruned / pruned.sum(-1, keepdim=True).clamp_min(1e-12)
            shift[index] = 0.5 * (before - pruned).abs().sum(-1)

    def pick(s: Tensor) -> Tensor:
        return s.gather(1, t[:, None])[:, 0].float()

    return RegionProbe(
        region=mask,
        mass=mass,
        mass_deviation=deviation,
        attention_shift=shift,
        target=t,
        score=pick(scores),
        pruned_score=pick(pruned_scores),
        probability=pick(scores.float().softmax(-1)),
        pruned_probability=pick(pruned_scores.float().softmax(-1)),
        prediction=scores.argmax(-1),
        pruned_prediction=pruned_scores.argmax(-1),
    )
