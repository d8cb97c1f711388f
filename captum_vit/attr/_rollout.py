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


def _scaled_head_sum(a: Tensor, scale: Tensor) -> Tensor:
    """``Σ_h a[:, h] · scale`` as a new tensor (``scale`` broadcasts against one head);
    with up to 4 heads one multiply-add pass per head, else one reduction and one
    multiplication (measured faster on each side of that)."""
    heads = a.shape[1]
    if heads > 4:
        return a.sum(dim=1).mul_(scale)
    total = torch.mul(a[:, 0], scale)
    for h in range(1, heads):
        total.addcmul_(a[:, h], scale)
    return total


class RolloutProduct:
    """Accumulates ``R = Ã_L · … · Ã_start`` one layer at a time (O(N²) memory).

    With ``B_l = (1 - w)·F_l + w·I`` and ``D_l`` its row sums (``1`` where a sum is
    ``<= 0``), ``Ã_l = D_l⁻¹ B_l``. The product is kept with its rows unscaled,
    ``M_l = D_l R_l``, so that ``M_l = (B_l D_{l-1}⁻¹) M_{l-1}``: per layer one pass
    per head builds ``B_l D_{l-1}⁻¹`` (its columns scaled, ``w/D`` on the diagonal;
    the identity is never built) and one matmul multiplies it on. ``M`` carries one
    extra column holding ``D``: the matmul turns ``D_{l-1}`` into
    ``B_l D_{l-1}⁻¹ D_{l-1} = B_l 1 = D_l``, so the row sums come for free. ``R`` is
    formed only when read (:attr:`result`); :meth:`final_rows` multiplies only the
    query rows of the last layer.

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
        #: ``[M | D | 0]`` of the layers so far, ``(B, N, P)``: zero columns pad the
        #: rows to a multiple of 16 floats (a faster matmul; they stay zero)
        self._m: Tensor | None = None
        self._result: Tensor | None = None
        self._consts: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _constants(self, device: torch.device, heads: int) -> tuple[Tensor, Tensor]:
        """0-dim tensors ``((1 - w) / heads or (1 - w), 0)`` (a Python number in a
        tensor operation costs a conversion per call)."""
        if device not in self._consts:
            keep = 1.0 - self.residual_weight
            if self.head_fusion == "mean" and self.discard_ratio <= 0:
                keep /= heads
            self._consts[device] = (
                torch.tensor(keep, device=device), torch.tensor(0.0, device=device)
            )
        return self._consts[device]

    @property
    def result(self) -> Tensor | None:
        """``R`` ``(B, N, N)`` float32 of the layers so far (``None`` before the first)."""
        if self._result is None and self._m is not None:
            n = self._m.shape[1]
            self._result = self._m[..., :n] / self._m[..., n : n + 1]
        return self._result

    def layer_matrix(self, per_head: Tensor) -> Tensor:
        """Steps 1-3 for one layer: fuse heads, discard, residual + row normalisation."""
        return self.fused_matrix(fuse_heads(per_head, self.head_fusion))

    def fused_matrix(self, fused: Tensor) -> Tensor:
        """Steps 2-3 for one layer's fused map ``(B, N, N)``: discard, residual + rows."""
        fused = discard_smallest(fused, self.discard_ratio, self.protected.to(fused.device))
        return residual_normalize(fused, self.residual_weight)

    def _scaled(self, per_head: Tensor, col: Tensor) -> Tensor:
        """``(1 - w)·F · col`` (``col`` ``(B, 1, N)`` scales the columns), a new float32
        tensor ``(B, rows, N)`` (the rows of ``per_head``)."""
        a = per_head if per_head.dtype == torch.float32 else per_head.float()
        keep = self._constants(a.device, a.shape[1])[0]
        if self.head_fusion == "mean" and self.discard_ratio <= 0:
            return _scaled_head_sum(a, torch.mul(col, keep))
        fused = discard_smallest(
            fuse_heads(a, self.head_fusion), self.discard_ratio, self.protected.to(a.device)
        )
        return fused.mul_(torch.mul(col, keep))

    def update(self, per_head: Tensor) -> None:
        """Multiply the next layer's ``Ã_l`` (from per-head maps) onto the left of R."""
        b, _, _, n = per_head.shape
        w = self.residual_weight
        self._result = None
        if self._m is None:
            m = per_head.new_zeros((b, n, -(-(n + 1) // 16) * 16), dtype=torch.float32)
            b_l = m[..., :n]
            b_l.copy_(self._scaled(per_head, per_head.new_ones((b, 1, n), dtype=torch.float32)))
            b_l.diagonal(dim1=-2, dim2=-1).add_(w)
            torch.sum(b_l, dim=-1, out=m[..., n])
        else:
            prev = self._m
            inv = prev[..., n].reciprocal()  # (B, N): D_{l-1}⁻¹
            g = self._scaled(per_head, inv[:, None, :])
            g.diagonal(dim1=-2, dim2=-1).add_(inv, alpha=w)
            m = torch.bmm(g, prev)
        d = m[..., n]
        d.masked_fill_(d.le(self._constants(m.device, per_head.shape[1])[1]), 1.0)
        self._m = m

    def final_rows(
        self, per_head: Tensor, weights: Tensor, rows: Tensor, *, sliced: bool = False
    ) -> Tensor:
        """``qᵀ Ã_l R`` for the last layer ``l``: the query-weighted row ``(B, N)``.

        Only the query rows of ``Ã_l`` are formed: ``qᵀ Ã_l R_{l-1} =
        ((qᵀ D_l⁻¹ B_l) ⊙ D_{l-1}⁻¹) M_{l-1}``, one vector-matrix product (``R`` is the
        identity when ``l`` is the first layer). Leaves :attr:`result` unchanged.

        Args:
            per_head (Tensor): the last layer's maps ``(B, heads, N, N)``, or with
                ``sliced`` their rows ``rows`` only, ``(B, heads, len(rows), N)``
                (only without discarding, which ranks all ``N·N`` entries).
            weights (Tensor): query weights ``(N,)`` (the rows the head pools).
            rows (Tensor): indices of the nonzero ``weights``.
            sliced (bool, optional): ``per_head`` holds the rows only. Default: False
        """
        b, n = per_head.shape[0], per_head.shape[-1]
        w = self.residual_weight
        rows = rows.to(per_head.device)
        ones = per_head.new_ones((b, 1, n), dtype=torch.float32)
        if self.discard_ratio <= 0:
            bl = self._scaled(per_head if sliced else per_head.index_select(2, rows), ones)
        else:
            if sliced:
                raise ValueError("discarding ranks the whole map: pass all rows")
            bl = self._scaled(per_head, ones).index_select(1, rows)
        # (B, k, N): the query rows of (1 - w)·F; their rows of B_l sum to d
        d = bl.sum(dim=-1).add_(w)
        d.masked_fill_(d <= 0, 1.0)
        v = weights.to(bl.device)[rows] / d  # (B, k)
        u = torch.bmm(v[:, None, :], bl)  # (B, 1, N)
        u[:, 0].index_add_(1, rows, v, alpha=w)
        if self._m is None:
            return u[:, 0]
        prev = self._m
        u.div_(prev[:, None, :, n])
        return torch.bmm(u, prev)[:, 0, :n]  # the whole (contiguous) rows: no copy


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
