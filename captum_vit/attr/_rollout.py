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


def _head_sum(a: Tensor) -> Tensor:
    """``a.sum(dim=1)`` of ``(B, heads, ...)`` as a new tensor; with up to 4 heads a
    chain of adds (one vectorised pass each; faster than the strided reduction)."""
    heads = a.shape[1]
    if heads == 1 or heads > 4:
        return a.sum(dim=1)
    total = torch.add(a[:, 0], a[:, 1])
    for h in range(2, heads):
        total.add_(a[:, h])
    return total


class RolloutProduct:
    """Accumulates ``R = Ã_L · … · Ã_start`` one layer at a time (O(N²) memory).

    Each layer after the first costs one fused matmul: with ``F`` the fused map and
    ``D`` the row sums of ``(1 - w)·F + w·I``,
    ``Ã R = D⁻¹ ((1 - w)·F R + w·R)`` (a ``baddbmm`` and one row scaling; the
    identity is never built). For the mean without discarding, ``F`` is kept as the
    sum over heads and ``1 / heads`` folded into the matmul's factor.
    :meth:`final_rows` multiplies only the query rows of the last layer.

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

    def _scaled_map(self, per_head: Tensor) -> tuple[Tensor, float]:
        """``(M, c)`` with ``c·M = (1 - w)·F`` (``F`` fused and discarded); ``M`` is a
        new float32 tensor ``(B, N, N)``."""
        a = per_head if per_head.dtype == torch.float32 else per_head.float()
        keep = 1.0 - self.residual_weight
        if self.head_fusion == "mean" and self.discard_ratio <= 0:
            return _head_sum(a), keep / a.shape[1]
        fused = discard_smallest(
            fuse_heads(a, self.head_fusion), self.discard_ratio, self.protected.to(a.device)
        )
        return fused, keep

    def _row_sums(self, m: Tensor, c: float) -> Tensor:
        """Row sums ``(B, rows, 1)`` of ``c·M + w·I`` (the identity's rows in ``M``'s
        rows), with ``1`` where a sum is ``<= 0`` (those rows stay as they are)."""
        sums = m.sum(dim=-1, keepdim=True).mul_(c).add_(self.residual_weight)
        return sums.masked_fill_(sums <= 0, 1.0)

    def update(self, per_head: Tensor) -> None:
        """Multiply the next layer's ``Ã_l`` (from per-head maps) onto the left of R."""
        m, c = self._scaled_map(per_head)
        w = self.residual_weight
        if self.result is None:
            m.mul_(c).diagonal(dim1=-2, dim2=-1).add_(w)
            sums = m.sum(dim=-1, keepdim=True)
            self.result = m.div_(sums.masked_fill_(sums <= 0, 1.0))
            return
        sums = self._row_sums(m, c)
        self.result = torch.baddbmm(self.result, m, self.result, beta=w, alpha=c).div_(sums)

    def final_rows(
        self, per_head: Tensor, weights: Tensor, rows: Tensor, *, sliced: bool = False
    ) -> Tensor:
        """``qᵀ Ã_l R`` for the last layer ``l``: the query-weighted row ``(B, N)``.

        Only the query rows of ``Ã_l`` are formed: with ``v = q / D`` on those rows,
        ``qᵀ Ã_l = (1 - w)·vᵀ F + w·v``, then one vector-matrix product with ``R``
        (``R`` is the identity when ``l`` is the first layer). Leaves
        :attr:`result` unchanged.

        Args:
            per_head (Tensor): the last layer's maps ``(B, heads, N, N)``, or with
                ``sliced`` their rows ``rows`` only, ``(B, heads, len(rows), N)``
                (only without discarding, which ranks all ``N·N`` entries).
            weights (Tensor): query weights ``(N,)`` (the rows the head pools).
            rows (Tensor): indices of the nonzero ``weights``.
            sliced (bool, optional): ``per_head`` holds the rows only. Default: False
        """
        w = self.residual_weight
        rows = rows.to(per_head.device)
        if self.discard_ratio <= 0:
            m, c = self._scaled_map(per_head if sliced else per_head.index_select(2, rows))
        else:
            if sliced:
                raise ValueError("discarding ranks the whole map: pass all rows")
            full, c = self._scaled_map(per_head)
            m = full.index_select(1, rows)
        v = self._row_sums(m, c).reciprocal_().mul_(weights.to(m.device)[rows, None])
        u = torch.bmm(v.transpose(1, 2), m).mul_(c)  # (B, 1, N)
        u[:, 0].index_add_(1, rows, v[..., 0], alpha=w)
        if self.result is not None:
            u = torch.bmm(u, self.result)
        return u[:, 0]


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
