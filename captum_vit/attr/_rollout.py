"""Head fusion and rollout products, written once for every rollout-style method.

All arithmetic is float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._capture import LayerGrad

__all__: list[str] = []


def fuse_heads(attn: Tensor, head_fusion: str) -> Tensor:
    """Fuse heads of ``(B, heads, N, N)`` -> ``(B, N, N)`` float32 (mean, max or min)."""
    a = attn.float()
    if head_fusion == "mean":
        return a.mean(dim=1)
    if head_fusion == "max":
        return a.amax(dim=1)
    if head_fusion == "min":
        return a.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")


def discard_smallest(fused: Tensor, ratio: float, protected: Tensor) -> Tensor:
    """Zero the ``ratio`` fraction of smallest entries of each sample's ``(N, N)`` map.

    ``k = floor(ratio * N * N)`` entries are zeroed per sample (the product is
    rounded to 9 decimals first, so that e.g. ``0.29 * 100`` gives 29, not 28); the
    diagonal entries of the ``protected`` rows (the query rows) are never chosen.
    Among equal values the choice is topk's. Returns a new tensor.
    """
    if ratio <= 0:
        return fused
    b, n, _ = fused.shape
    k = min(math.floor(round(ratio * n * n, 9)), n * n - protected.numel())
    if k <= 0:
        return fused
    keyed = fused.reshape(b, n * n).clone()
    keyed[:, protected * n + protected] = float("inf")
    idx = keyed.topk(k, dim=1, largest=False).indices
    return fused.reshape(b, n * n).scatter(1, idx, 0.0).reshape(b, n, n)


def residual_normalize(fused: Tensor, residual_weight: float) -> Tensor:
    """``(1 - w)·F + w·I``, each row divided by its sum (all-zero rows stay zero)."""
    mixed = fused * (1.0 - residual_weight)
    mixed.diagonal(dim1=-2, dim2=-1).add_(residual_weight)
    sums = mixed.sum(dim=-1, keepdim=True)
    return mixed.div_(sums.masked_fill_(sums <= 0, 1.0))


class RolloutProduct:
    """Accumulates ``R = Ã_L · … · Ã_start`` one layer at a time (O(N²) memory).

    Args:
        head_fusion (str): "mean", "max" or "min".
        discard_ratio (float): fraction of smallest fused entries set to 0.
        residual_weight (float): ``w`` in ``(1 - w)·F + w·I``.
        protected (Tensor): token indices whose diagonal entry is never discarded.
    """

    def __init__(
        self, head_fusion: str, discard_ratio: float, residual_weight: float, protected: Tensor
    ) -> None:
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio
        self.residual_weight = residual_weight
        self.protected = protected
        self.result: Tensor | None = None

    def layer_matrix(self, per_head: Tensor) -> Tensor:
        """Steps 1-3 for one layer: fuse heads, discard, residual + row normalisation."""
        return self.fused_matrix(fuse_heads(per_head, self.head_fusion))

    def fused_matrix(self, fused: Tensor) -> Tensor:
        """Steps 2-3 for one layer's fused map ``(B, N, N)``: discard, residual + rows."""
        fused = discard_smallest(fused, self.discard_ratio, self.protected.to(fused.device))
        return residual_normalize(fused, self.residual_weight)

    def update(self, per_head: Tensor) -> None:
        """Multiply the next layer's ``Ã_l`` (from per-head maps) onto the left of R."""
        a = self.layer_matrix(per_head)
        self.result = a if self.result is None else torch.bmm(a, self.result)


def chefer_update(relevance: Tensor | None, attn: Tensor, grad: Tensor) -> Tensor:
    """One layer of Chefer et al. (2021): ``R = R + mean_heads((G ⊙ A)⁺) · R``."""
    cam = (grad.float() * attn.float()).clamp(min=0).mean(dim=1)
    if relevance is None:
        n = attn.shape[-1]
        relevance = torch.eye(n, dtype=torch.float32, device=attn.device).expand(
            attn.shape[0], n, n
        )
    return relevance + torch.bmm(cam, relevance)


def check_rollout_args(discard_ratio: float, residual_weight: float) -> None:
    if not 0.0 <= float(discard_ratio) < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if not 0.0 <= float(residual_weight) <= 1.0:
        raise ValueError(f"residual_weight must be in [0, 1], got {residual_weight}")


def fuse_grad_weighted(grad: LayerGrad, head_fusion: str) -> Tensor:
    """``fuse_heads((G ⊙ A)⁺)`` of one streamed layer, ``(B, N, N)`` float32, computed
    a few heads at a time (never the whole layer's per-head maps at once)."""
    heads = grad.shape[1]
    fused: Tensor | None = None
    for attn, g in grad.chunks():
        part = torch.mul(attn, g).clamp_(min=0)
        if head_fusion == "mean":
            step = part.sum(dim=1)
            fused = step if fused is None else fused.add_(step)
        elif head_fusion == "max":
            step = part.amax(dim=1)
            fused = step if fused is None else torch.maximum(fused, step, out=fused)
        else:
            step = part.amin(dim=1)
            fused = step if fused is None else torch.minimum(fused, step, out=fused)
        del part
    assert fused is not None
    return fused.div_(heads) if head_fusion == "mean" else fused


class BackwardProduct:
    """Accumulates a product of per-layer matrices from the last layer down.

    ``R ← R · M_l`` for ``l = last, …, first`` starting from ``R = start``
    (``(B, q, N)``: query weights for one row per sample, or the identity for the
    full matrix), so that ``R = start · M_last ⋯ M_first``. Layers arrive through
    :meth:`push` in any order (a streamed backward pass delivers them from the last
    layer down); each is applied as soon as every layer above it has been, and
    :meth:`finish` applies the layers that never arrived with ``missing(l)``.

    Args:
        first (int): lowest layer of the product.
        last (int): highest layer of the product.
        combine (Callable[[Tensor, Tensor], Tensor]): ``(R, layer_value) -> R``.
    """

    def __init__(self, first: int, last: int, combine: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.first, self.next = first, last
        self.combine = combine
        self.result: Tensor | None = None
        self._pending: dict[int, Tensor | None] = {}

    def start(self, value: Tensor) -> None:
        self.result = value

    def push(self, layer: int, value: Tensor | None) -> None:
        """Layer ``layer``'s value (``None``: the layer has no gradient)."""
        self._pending[layer] = value
        while self.next >= self.first and self.next in self._pending:
            item = self._pending.pop(self.next)
            if item is not None:
                assert self.result is not None
                self.result = self.combine(self.result, item)
            self.next -= 1

    def finish(self, missing: Callable[[int], Tensor | None]) -> Tensor:
        """Apply the layers that did not arrive (``missing(l)``); return ``R``."""
        while self.next >= self.first:
            layer = self.next
            self.push(layer, self._pending.get(layer, missing(layer)))
        assert self.result is not None
        return self.result
