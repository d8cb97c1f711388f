"""Weighted patch interrelation (Wu et al.): the math, stage detection, and dataset-level
aggregation.

:class:`captum_vit.SiftInterrelation` computes an :class:`InterrelationResult` for a
batch; :func:`aggregate_interrelation` streams a ``DataLoader`` through it and keeps
only running sums (per layer and head), giving an :class:`InterrelationSummary` whose
per-layer means, per-head spread and stages are what
:func:`captum_vit.viz.plot_interrelation` draws. :func:`mask_as_prompt` is the
Mask-as-Prompt sweep: accuracy when the patches with the highest / lowest patch score
(or random ones) are masked at the token level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._compat import progress
from ._sift import keypoint_counts, unnormalize_inputs

if TYPE_CHECKING:  # pragma: no cover
    from .attr.sift_interrelation import SiftInterrelation

__all__ = [
    "MASK_AS_PROMPT_STRATEGIES",
    "InterrelationResult",
    "InterrelationSummary",
    "Stages",
    "aggregate_interrelation",
    "detect_stages",
    "interrelation_stats",
    "keypoint_counts",
    "mask_as_prompt",
    "unnormalize_inputs",
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


# ---------------------------------------------------------------------------- streaming
def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], labels
    if isinstance(batch, dict) and isinstance(batch.get("pixel_values"), Tensor):
        return batch["pixel_values"], batch.get("labels")
    raise TypeError(
        "each batch must be an image tensor (B, C, H, W), a (images, labels, ...) tuple or a "
        f"dict with 'pixel_values'; got {type(batch).__name__}"
    )


def aggregate_interrelation(
    explainer: SiftInterrelation,
    loader: Iterable[Any],
    *,
    max_batches: int | None = None,
    show_progress: bool = True,
    on_batch: Callable[[Tensor, Tensor | None, InterrelationResult], None] | None = None,
) -> InterrelationSummary:
    r"""Stream a dataset through :meth:`SiftInterrelation.analyze`, keeping only sums.

    For each layer and head the NaN-skipping mean of θ_KK, θ_NK and the focus index
    over all images is accumulated in float64 running sums of size ``(L, heads)``:
    memory does not grow with the dataset.

    Args:
        explainer (SiftInterrelation): the configured method.
        loader (Iterable): yields image tensors ``(B, C, H, W)`` (normalised as the
            model takes them), ``(images, labels, ...)`` tuples, or dicts with
            ``"pixel_values"``; keypoints are counted on
            ``explainer.unnormalize``-inverted images.
        max_batches (int, optional): stop after this many batches. Default: None
        show_progress (bool, optional): show a progress bar. Default: True
        on_batch (Callable, optional): called as ``on_batch(inputs, labels, result)``
            after each batch (``labels`` is None when the loader yields none), e.g.
            to run :func:`mask_as_prompt` on ``result.patch_scores`` without a second
            analysis. Default: None

    Returns:
        InterrelationSummary: per-head means ``(L, heads)``, per-layer curves,
        per-head spread and stages.

    Example::

        >>> summary = aggregate_interrelation(SiftInterrelation(model), loader)
        >>> print(summary.to_markdown()); print(summary.stages)
    """
    sums: Tensor | None = None
    counts: Tensor | None = None
    images = 0
    total = None
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    bar = progress(desc="SiftInterrelation", total=total, disable=not show_progress)
    try:
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            x, labels = _split_batch(batch)
            res = explainer.analyze(x)
            if on_batch is not None:
                on_batch(x, labels, res)
            stack = torch.stack([res.kk, res.nk, res.focus_index]).double()  # (3, B, L, H)
            valid = ~torch.isnan(stack)
            s = torch.nan_to_num(stack, nan=0.0).sum(1)
            c = valid.sum(1).double()
            sums = s if sums is None else sums + s
            counts = c if counts is None else counts + c
            images += int(x.shape[0])
            bar.update(1)
    finally:
        bar.close()
    if sums is None or counts is None:
        raise ValueError("the loader yielded no batches")
    means = (sums / counts).float()  # 0/0 -> NaN where a head never had a group
    return InterrelationSummary(kk=means[0], nk=means[1], focus_index=means[2], num_images=images)


# ---------------------------------------------------------------------------- Mask-as-Prompt
MASK_AS_PROMPT_STRATEGIES: tuple[str, ...] = ("top", "bottom", "random")


def mask_as_prompt(
    model: torch.nn.Module,
    inputs: Tensor,
    patch_scores: Tensor,
    *,
    ratios: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.4),
    strategies: Sequence[str] = MASK_AS_PROMPT_STRATEGIES,
    replacement: str = "zero",
    adapter: Any = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""Mask-as-Prompt sweep: the model's predictions when patch tokens are masked by
    patch score.

    For each ratio ``r``, ``k = mask_count(P, r)`` patch tokens per image are masked
    at the token level (:func:`captum_vit._token_masking.masked_forward`):
    ``"top"`` masks the k patches with the highest score, ``"bottom"`` the k with
    the lowest (:func:`captum_vit.masking.score_mask`), ``"random"`` k uniformly
    random patches (:func:`captum_vit.masking.random_mask`). NaN scores are never
    picked before finite ones.

    Args:
        model (nn.Module): the ViT.
        inputs (Tensor): images ``(B, C, H, W)`` as the model takes them.
        patch_scores (Tensor): ``(B, P)`` (e.g. ``InterrelationResult.patch_scores``).
        ratios (Sequence[float], optional): fractions of patches to mask, each in
            (0, 1). Default: (0.05, 0.1, 0.2, 0.3, 0.4)
        strategies (Sequence[str], optional): any of ``"top"``, ``"bottom"``,
            ``"random"``. Default: all three
        replacement (str, optional): token replacement ``"zero"``, ``"mean"`` or
            ``"drop"``. Default: "zero"
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None
        generator (torch.Generator, optional): for the random masks. Default: None

    Returns:
        dict[str, Tensor]: ``"unmasked"`` -> predicted classes ``(B,)``, and each
        strategy -> predicted classes ``(len(ratios), B)``.

    Example::

        >>> res = SiftInterrelation(model).analyze(x)
        >>> preds = mask_as_prompt(model, x, res.patch_scores)
        >>> (preds["top"] == labels).float().mean(1)    # accuracy per ratio
    """
    from ._capture import resolve_adapter
    from ._token_masking import check_replacement, masked_forward
    from .masking import random_mask, score_mask

    ad = resolve_adapter(model, adapter)
    check_replacement(replacement)
    grid = ad.grid_size(inputs)
    b, p = int(inputs.shape[0]), grid[0] * grid[1]
    if patch_scores.shape != (b, p):
        raise ValueError(f"patch_scores has shape {tuple(patch_scores.shape)}; expected {(b, p)}")
    bad = [s for s in strategies if s not in MASK_AS_PROMPT_STRATEGIES]
    if bad or not strategies:
        raise ValueError(f"strategies must be a non-empty subset of {MASK_AS_PROMPT_STRATEGIES}, got {strategies!r}")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise ValueError(f"each ratio must be in (0, 1), got {r!r}")
    scores = patch_scores.to(inputs.device)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        out["unmasked"] = ad.forward(inputs).argmax(-1)
        for strategy in strategies:
            preds = []
            for r in ratios:
                if strategy == "random":
                    mask = random_mask(b, p, r, generator=generator).to(inputs.device)
                else:
                    top = strategy == "top"
                    keyed = torch.nan_to_num(scores.float(), nan=-math.inf if top else math.inf)
                    mask = score_mask(keyed, r, largest=top)
                preds.append(masked_forward(ad, inputs, mask, replacement).argmax(-1))
            out[strategy] = torch.stack(preds)
    return out
