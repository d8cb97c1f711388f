"""Weighted patch interrelation (Wu et al.): the math, stage detection and result
types, below both :class:`captum_vit.SiftInterrelation` (``attr/``) and the dataset
analyses of :mod:`captum_vit.interrelation`, which re-exports the public names."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "InterrelationResult",
    "InterrelationSummary",
    "Stages",
    "detect_stages",
    "interrelation_stats",
]

#: Relative slack on the detection line so that a row equal to its own mean (e.g. a
#: constant row with gamma=1) is not lost to float32 rounding of the mean.
_LINE_RTOL = 1e-6


# ---------------------------------------------------------------------------- math
def interrelation_stats(
    alpha: Tensor, keypoint_counts: Tensor, gamma: float = 1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""θ, KK, NK and focus index of patch-to-patch attention, fully vectorised.

    With ``α`` the patch-to-patch attention (prefix rows and columns already dropped)
    and ``t_j`` the keypoint count of patch ``j``:

    * detection line ``H_i = gamma · mean_j α_ij``; attended set
      ``S_i = {j : α_ij ≥ H_i}`` (compared in float32 with a relative slack of 1e-6
      on ``H_i``, so a row equal to its mean keeps all its entries);
    * ``θ_i = Σ_{j∈S_i, t_j>0} t_j / (|{j∈S_i : t_j=0}| + Σ_{j∈S_i, t_j>0} t_j)``,
      NaN when ``S_i`` is empty (possible only for gamma > 1);
    * ``θ_KK`` = mean of θ_i over start patches ``i`` with ``t_i > 0``, ``θ_NK``
      over those with ``t_i = 0``; NaN θ_i are skipped; NaN when no start patch of
      the group has a defined θ_i. (``θ_KN = 1 − θ_KK``, ``θ_NN = 1 − θ_NK``.)
    * focus index: mean over start patches of the Shannon entropy (nats) of the row
      after min-max scaling ``(α_i − min α_i) / (max α_i − min α_i)`` and
      renormalising to sum 1. A constant row (max = min) is taken as the uniform
      distribution, entropy ``log P``. Lower = more focused; range ``[0, log P]``.

    Computed with one batched matrix product and a few elementwise passes over
    ``alpha`` in float32 through one reused work buffer (no float64, no loop over
    patches or heads).

    Args:
        alpha (Tensor): ``(B, *dims, P, P)`` attention, any leading dims after the
            batch (e.g. ``(B, L, heads, P, P)`` or ``(B, heads, P, P)``).
        keypoint_counts (Tensor): ``(B, P)`` non-negative keypoint counts.
        gamma (float, optional): detection-line factor. Default: 1.0

    Returns:
        tuple[Tensor, Tensor, Tensor, Tensor]: ``theta (B, *dims, P)``,
        ``kk (B, *dims)``, ``nk (B, *dims)``, ``focus_index (B, *dims)``, float32.

    Example::

        >>> alpha = torch.softmax(torch.randn(2, 3, 16, 16), -1)   # (B, heads, P, P)
        >>> t = torch.randint(0, 3, (2, 16))
        >>> theta, kk, nk, focus = interrelation_stats(alpha, t)
    """
    if alpha.ndim < 3 or alpha.shape[-1] != alpha.shape[-2]:
        raise ValueError(f"alpha must be (B, ..., P, P), got shape {tuple(alpha.shape)}")
    b, p = int(alpha.shape[0]), int(alpha.shape[-1])
    if keypoint_counts.shape != (b, p):
        raise ValueError(
            f"keypoint_counts has shape {tuple(keypoint_counts.shape)}; expected {(b, p)} "
            "(batch, patches) to match the attention"
        )
    if (keypoint_counts < 0).any():
        raise ValueError("keypoint_counts must be non-negative")
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma > 0:
        raise ValueError(f"gamma must be a positive number, got {gamma!r}")
    a = alpha if alpha.dtype == torch.float32 else alpha.float()
    lead = a.shape[:-1]  # (B, *dims, P): one entry per start patch
    bshape = (b,) + (1,) * (a.ndim - 3)
    t = keypoint_counts.to(device=a.device, dtype=torch.float32)
    has_kp = t > 0
    # numerator weights t_j; denominator weights t_j (keypoint patch) or 1 (none)
    weights = torch.stack([t, torch.where(has_kp, t, torch.ones_like(t))], dim=-1)  # (B,P,2)

    # one float32 work buffer of alpha's size, reused: attended set, then min-shifted rows
    buf = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    mean = a.mean(dim=-1, keepdim=True)
    torch.ge(a, mean * (gamma * (1.0 - _LINE_RTOL)), out=buf)  # S_i as 0/1
    nd = torch.bmm(buf.view(b, -1, p), weights).view(*lead, 2)
    num, den = nd[..., 0], nd[..., 1]
    theta = torch.where(den > 0, num / den.clamp_min(1.0), torch.full_like(num, math.nan))

    kp_rows = has_kp.reshape(*bshape, p)
    defined = ~torch.isnan(theta)
    th0 = torch.nan_to_num(theta, nan=0.0)
    in_k = defined & kp_rows
    in_n = defined & ~kp_rows
    kk = (th0 * in_k).sum(-1) / in_k.sum(-1)  # 0/0 -> NaN for an empty group
    nk = (th0 * in_n).sum(-1) / in_n.sum(-1)

    # Entropy of q = d / D with d = α_i - min α_i, D = Σ d: min-max scaling divides d by
    # (max - min), which cancels in q, so H = log D - Σ d log d / D.
    torch.sub(a, a.amin(dim=-1, keepdim=True), out=buf)
    total = buf.sum(-1)
    torch.special.xlogy(buf, buf, out=buf)
    slogs = buf.sum(-1)
    del buf
    safe = total.clamp_min(torch.finfo(torch.float32).tiny)
    ent = torch.where(total > 0, torch.log(safe) - slogs / safe, torch.full_like(total, math.log(p)))
    focus = ent.mean(-1)
    return theta, kk, nk, focus


def _nanmean(x: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """Mean skipping NaN; NaN where every entry is NaN (no warnings)."""
    valid = ~torch.isnan(x)
    return torch.nan_to_num(x, nan=0.0).sum(dim) / valid.sum(dim)


# ---------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Stages:
    """Layer ranges of the three stages of Wu et al. (0-based layer indices).

    Attributes:
        retrieval (range): early layers: KK hardly above NK, high focus entropy.
        capture (range): layers where KK clearly exceeds NK.
        coach (range): the layers after capture, where the KK-minus-NK gap has
            fallen back below the capture threshold.
        clear (bool): True when all three stages are non-empty, in this order, and
            retrieval has a higher mean focus entropy than capture.
        reason (str): why the stages are (not) clear.
    """

    retrieval: range
    capture: range
    coach: range
    clear: bool
    reason: str

    def as_dict(self) -> dict[str, tuple[int, int]]:
        """``{"retrieval": (start, stop), ...}`` with stop exclusive."""
        return {
            name: (r.start, r.stop)
            for name, r in (("retrieval", self.retrieval), ("capture", self.capture), ("coach", self.coach))
        }

    def __str__(self) -> str:
        def fmt(r: range) -> str:
            return "-" if len(r) == 0 else f"{r.start}-{r.stop - 1}"

        return (
            f"retrieval {fmt(self.retrieval)}, capture {fmt(self.capture)}, coach "
            f"{fmt(self.coach)} ({'clear' if self.clear else 'not clear'}: {self.reason})"
        )


def _median3(x: Tensor) -> Tensor:
    """Running median over 3 neighbours (edges: median of the 2 available = mean)."""
    if x.numel() < 3:
        return x.clone()
    padded = torch.cat([x[:1], x, x[-1:]])
    win = padded.unfold(0, 3, 1)
    out = win.median(dim=-1).values
    out[0] = x[:2].mean()
    out[-1] = x[-2:].mean()
    return out


def detect_stages(
    gap: Tensor | Sequence[float],
    focus: Tensor | Sequence[float],
    *,
    min_gap: float = 0.02,
    threshold: float = 0.5,
) -> Stages:
    r"""Find the retrieval / capture / coach layers from the per-layer curves.

    1. Both curves are smoothed with a running median of 3 layers (one noisy layer
       cannot create or split a stage); NaN layers count as a gap of 0.
    2. If the largest smoothed gap ``KK − NK`` is below ``min_gap``, there are no
       clear stages (every range empty except retrieval, which holds all layers).
    3. Capture is the longest run of consecutive layers whose smoothed gap is at
       least ``threshold × max gap`` (the earliest such run on ties). Retrieval is
       every layer before it, coach every layer after it.
    4. The stages are *clear* when all three are non-empty and the mean smoothed
       focus entropy of retrieval exceeds that of capture (early layers look
       broadly, capture layers focus); ``reason`` names any check that failed.

    Args:
        gap (Tensor or Sequence[float]): per-layer ``KK − NK`` ``(L,)``.
        focus (Tensor or Sequence[float]): per-layer focus index ``(L,)``.
        min_gap (float, optional): smallest peak gap that counts as KK rising above
            NK. Default: 0.02
        threshold (float, optional): fraction of the peak gap that delimits the
            capture stage, in (0, 1). Default: 0.5

    Returns:
        Stages: the three layer ranges with ``clear`` and ``reason``.

    Example::

        >>> s = detect_stages([0, .01, .1, .2, .2, .05], [5, 5, 4, 3, 3, 4])
        >>> s.capture
        range(2, 5)
    """
    g = torch.as_tensor(gap, dtype=torch.float32).flatten()
    f = torch.as_tensor(focus, dtype=torch.float32).flatten()
    if g.numel() != f.numel() or g.numel() == 0:
        raise ValueError(f"gap and focus must be non-empty curves of equal length, got {g.numel()} and {f.numel()}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    n = g.numel()
    empty = range(0, 0)
    gs = _median3(torch.nan_to_num(g, nan=0.0))
    fs = _median3(torch.nan_to_num(f, nan=float(torch.nanmean(f)) if (~torch.isnan(f)).any() else 0.0))
    peak = float(gs.max())
    if n < 3:
        return Stages(range(0, n), empty, empty, False, f"only {n} layer(s): need at least 3")
    if not peak >= min_gap:
        return Stages(
            range(0, n), empty, empty, False,
            f"KK never exceeds NK by {min_gap} (largest smoothed gap {peak:.4f}): no capture stage",
        )
    above = (gs >= threshold * peak).tolist()
    best_start, best_len, start = 0, 0, None
    for i, flag in enumerate([*above, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = None
    retrieval = range(0, best_start)
    capture = range(best_start, best_start + best_len)
    coach = range(best_start + best_len, n)
    problems: list[str] = []
    if len(retrieval) == 0:
        problems.append("KK exceeds NK from the first layer on (no retrieval stage)")
    if len(coach) == 0:
        problems.append("the gap stays high up to the last layer (no coach stage)")
    if len(retrieval) > 0 and not float(fs[retrieval.start : retrieval.stop].mean()) > float(
        fs[capture.start : capture.stop].mean()
    ):
        problems.append("retrieval layers are not less focused (higher entropy) than capture layers")
    clear = not problems
    reason = (
        f"gap peaks at {peak:.3f}; capture = layers with smoothed gap >= {threshold * peak:.3f}"
        if clear
        else "; ".join(problems)
    )
    return Stages(retrieval, capture, coach, clear, reason)


# ---------------------------------------------------------------------------- results
@dataclass
class InterrelationSummary:
    """Per-layer and per-head interrelation statistics over a set of images.

    Attributes:
        kk (Tensor): ``(L, heads)`` mean θ_KK per head (images skipped where NaN).
        nk (Tensor): ``(L, heads)`` mean θ_NK per head.
        focus_index (Tensor): ``(L, heads)`` mean focus index per head.
        num_images (int): images aggregated.
        stages (Stages): from :func:`detect_stages` on the per-layer curves.
    """

    kk: Tensor
    nk: Tensor
    focus_index: Tensor
    num_images: int
    stages: Stages = field(init=False)

    def __post_init__(self) -> None:
        self.stages = detect_stages(self.kk_layer - self.nk_layer, self.focus_layer)

    @property
    def kn(self) -> Tensor:
        """``(L, heads)`` θ_KN = 1 − θ_KK."""
        return 1.0 - self.kk

    @property
    def nn(self) -> Tensor:
        """``(L, heads)`` θ_NN = 1 − θ_NK."""
        return 1.0 - self.nk

    @property
    def kk_layer(self) -> Tensor:
        """``(L,)`` mean θ_KK over heads."""
        return _nanmean(self.kk, -1)

    @property
    def nk_layer(self) -> Tensor:
        """``(L,)`` mean θ_NK over heads."""
        return _nanmean(self.nk, -1)

    @property
    def focus_layer(self) -> Tensor:
        """``(L,)`` mean focus index over heads."""
        return _nanmean(self.focus_index, -1)

    def head_spread(self, name: str) -> Tensor:
        """``(L,)`` standard deviation over heads (population) of ``kk``, ``nk`` or
        ``focus_index``."""
        values = getattr(self, name)
        mean = _nanmean(values, -1).unsqueeze(-1)
        return _nanmean((values - mean) ** 2, -1).sqrt()

    def to_markdown(self) -> str:
        """A Markdown table: one row per layer with KK, NK, KN, NN, KK−NK, focus
        index (mean ± spread over heads) and the stage of the layer."""
        stage_of = {}
        for name, r in self.stages.as_dict().items():
            for i in range(*r):
                stage_of[i] = name
        lines = [
            "| layer | KK | NK | KN | NN | KK-NK | focus index (nats) | stage |",
            "|---|---|---|---|---|---|---|---|",
        ]
        kk, nk, fo = self.kk_layer, self.nk_layer, self.focus_layer
        skk, snk, sfo = self.head_spread("kk"), self.head_spread("nk"), self.head_spread("focus_index")
        for i in range(kk.numel()):
            lines.append(
                f"| {i} | {kk[i]:.4f} ± {skk[i]:.4f} | {nk[i]:.4f} ± {snk[i]:.4f} | "
                f"{1 - kk[i]:.4f} | {1 - nk[i]:.4f} | {kk[i] - nk[i]:+.4f} | "
                f"{fo[i]:.4f} ± {sfo[i]:.4f} | {stage_of.get(i, '-')} |"
            )
        return "\n".join(lines)


@dataclass
class InterrelationResult:
    """What :meth:`SiftInterrelation.analyze` returns for a batch.

    Attributes:
        theta (Tensor): ``(B, L, heads, P)`` θ_i per start patch (NaN where the
            attended set is empty).
        kk (Tensor): ``(B, L, heads)`` θ_KK.
        nk (Tensor): ``(B, L, heads)`` θ_NK.
        kn (Tensor): ``(B, L, heads)`` θ_KN = 1 − θ_KK.
        nn (Tensor): ``(B, L, heads)`` θ_NN = 1 − θ_NK.
        focus_index (Tensor): ``(B, L, heads)`` mean row entropy (nats).
        keypoint_counts (Tensor): ``(B, P)`` SIFT keypoints per patch (int64).
        stages (Stages): stages of the batch (from the batch-mean curves).
        patch_scores (Tensor): ``(B, P)`` θ_i averaged over heads and layers,
            skipping NaN (NaN only if θ_i is NaN in every layer and head).
        grid (tuple[int, int]): the patch grid ``(gh, gw)``.
    """

    theta: Tensor
    kk: Tensor
    nk: Tensor
    kn: Tensor
    nn: Tensor
    focus_index: Tensor
    keypoint_counts: Tensor
    stages: Stages
    patch_scores: Tensor
    grid: tuple[int, int]

    def summary(self) -> InterrelationSummary:
        """Reduce over the batch: per-head means (NaN skipped) as an
        :class:`InterrelationSummary`."""
        return InterrelationSummary(
            kk=_nanmean(self.kk, 0),
            nk=_nanmean(self.nk, 0),
            focus_index=_nanmean(self.focus_index, 0),
            num_images=int(self.kk.shape[0]),
        )


def _summary_stages(kk: Tensor, nk: Tensor, focus: Tensor) -> Stages:
    """Stages from ``(B, L, heads)`` statistics (mean over batch and heads)."""
    return detect_stages(_nanmean(kk, (0, 2)) - _nanmean(nk, (0, 2)), _nanmean(focus, (0, 2)))
