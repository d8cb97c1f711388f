"""Robustness experiments: CLS vs mean pooling, and masking sweeps (Toseef 2025).

* :func:`compare_pooling` runs the model once and feeds its final token states to
  its own classifier head twice: pooled from the CLS token and averaged over the
  patch tokens.
* :func:`masking_sweep` masks a fraction of the patch tokens (random, centre square,
  or guided by an attention-rollout map, most- or least-attended first) over a range
  of ratios and reports how often the prediction stays the same (and the accuracy
  when labels are given).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._capture import ViTAdapter, _thread_forward_hook, resolve_adapter
from ._progress import progress
from ._token_masking import check_replacement, masked_forward
from ._utils import _forward_args, _resolve_target, _unpack_inputs
from .attr.attention_rollout import AttentionRollout
from .masking import center_mask, mask_count, random_mask, score_mask

__all__ = ["STRATEGIES", "MaskingSweepResult", "compare_pooling", "masking_sweep"]

#: Strategy names understood by :func:`masking_sweep`.
STRATEGIES: tuple[str, ...] = (
    "random",
    "center",
    "rollout_most",
    "rollout_least",
    "score_most",
    "score_least",
)


def compare_pooling(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    adapter: ViTAdapter | None = None,
    additional_forward_args: Any = None,
) -> dict[str, Tensor]:
    r"""Scores from the CLS token vs from the mean of the patch tokens, through the same head.

    The model runs once; its final token states (after the final norm, exactly the
    tensor its own head reads) are pooled two ways and passed through the model's own
    classifier head:

    * ``"cls"``: the CLS state (token 0). For DeiT distilled (timm, and HF
      ``DeiTForImageClassificationWithTeacher``) it is the model's own prefix pooling,
      ``(head(CLS) + head_dist(DIST)) / 2``.
    * ``"mean"``: the mean of the patch-token states (prefix tokens — CLS,
      distillation, registers — excluded). For DeiT distilled both heads get the mean
      and are averaged.

    Family details: timm applies ``fc_norm`` (the post-pooling norm of average-pooled
    models; Identity otherwise) before ``head``, so for timm ``global_pool="avg"`` models
    ``"mean"`` equals the model's output and ``"cls"`` reads its (untrained-for) CLS
    token. Hugging Face Dinov2 heads read the concatenation ``[CLS, mean]``: here
    ``"cls"`` feeds ``[CLS, CLS]`` and ``"mean"`` feeds ``[mean, mean]``, so neither
    equals the model's output. Hugging Face ``CLIPForImageClassification`` averages the
    patch tokens of the (not post-normed) last hidden state: ``"mean"`` is its output
    and ``"cls"`` puts the CLS state of the same tensor through the classifier.
    ``CLIPVisionModel`` has no classifier: its "head" is ``post_layernorm`` and
    ``"cls"`` equals its ``pooler_output``. Models with attention pooling (timm
    ``global_pool="map"``) or without prefix tokens raise ``ValueError``. The head
    comes from the adapter's ``pooling_path`` (for a custom model pass
    ``captum_vit.adapt(model, ..., pooling_path=captum_vit.PoolingPath(...))``).

    Args:
        model (nn.Module): a timm, Hugging Face or torchvision ViT classifier.
        inputs (Tensor or tuple[Tensor]): images ``(B, C, H, W)``.
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None
        additional_forward_args (Any, optional): extra forward arguments.
            Default: None

    Returns:
        dict[str, Tensor]: ``{"cls": (B, classes), "mean": (B, classes)}`` raw scores,
        computed under ``torch.no_grad()``.

    Example::

        >>> out = compare_pooling(model, images)
        >>> (out["cls"].argmax(1) == out["mean"].argmax(1)).float().mean()
    """
    adapter = resolve_adapter(model, adapter)
    x, _ = _unpack_inputs(inputs)
    adapter.check_inputs(x)
    path = adapter.pooling_path
    if path is None:
        raise ValueError(adapter.pooling_path_error or f"{type(model).__name__}: no classifier head to compare poolings with")
    seen: list[Tensor] = []

    def hook(_m: nn.Module, _args: Any, out: Any) -> None:
        seen.append(path.read(out))

    with torch.no_grad(), _thread_forward_hook(path.module, hook, channel="pooling_probe"):
        adapter.forward(x, *_forward_args(additional_forward_args))
    if not seen:
        raise RuntimeError(f"the final token states of {type(model).__name__} were not produced")
    seq = seen[-1]
    grid = adapter.grid_size(x)
    patches = grid[0] * grid[1]
    prefix = seq.shape[1] - patches if adapter.num_prefix_tokens is None else adapter.num_prefix_tokens
    if prefix < 1 or prefix + patches != seq.shape[1]:
        raise ValueError(
            f"{type(model).__name__} has {prefix} prefix tokens: no CLS state to compare"
        )
    with torch.no_grad():
        return {"cls": path.cls_head(seq), "mean": path.head(seq[:, prefix:].mean(dim=1))}


@dataclass
class MaskingSweepResult:
    """Agreement (and accuracy) of masked predictions, per strategy and ratio.

    Attributes:
        strategies (list[str]): row order.
        ratios (list[float]): requested ratios, column order.
        actual_ratio (Tensor): ``(S, R)`` fraction of patches actually masked (the
            centre square can only approximate the ratio).
        agreement (Tensor): ``(S, R)`` fraction of images whose masked top-1 equals
            the unmasked top-1.
        accuracy (Tensor or None): ``(S, R)`` masked top-1 accuracy when labels were
            given.
        clean_accuracy (float or None): unmasked top-1 accuracy.
        num_images (int): images evaluated.
        replacement (str): token replacement used.
    """

    strategies: list[str]
    ratios: list[float]
    actual_ratio: Tensor
    agreement: Tensor
    accuracy: Tensor | None
    clean_accuracy: float | None
    num_images: int
    replacement: str

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (strategy, ratio): keys ``strategy, ratio, actual_ratio,
        agreement`` and ``accuracy`` (None without labels)."""
        out = []
        for i, s in enumerate(self.strategies):
            for j, r in enumerate(self.ratios):
                out.append({
                    "strategy": s,
                    "ratio": r,
                    "actual_ratio": float(self.actual_ratio[i, j]),
                    "agreement": float(self.agreement[i, j]),
                    "accuracy": None if self.accuracy is None else float(self.accuracy[i, j]),
                })
        return out

    def to_markdown(self) -> str:
        """Markdown tables: agreement (and accuracy) with strategies as rows, ratios as columns."""
        head = "| strategy | " + " | ".join(f"{r:.1f}" for r in self.ratios) + " |"
        sep = "|---|" + "---|" * len(self.ratios)

        def table(values: Tensor, title: str) -> list[str]:
            lines = [f"**{title}** ({self.num_images} images, replacement={self.replacement!r})", "",
                     head, sep]
            for i, s in enumerate(self.strategies):
                lines.append(f"| {s} | " + " | ".join(f"{float(v):.3f}" for v in values[i]) + " |")
            return [*lines, ""]

        lines = table(self.agreement, "Agreement with the unmasked prediction")
        if self.accuracy is not None:
            lines += table(self.accuracy, f"Top-1 accuracy (unmasked: {self.clean_accuracy:.3f})")
        if "center" in self.strategies:
            i = self.strategies.index("center")
            lines += ["Centre square: actual masked ratio per column: "
                      + ", ".join(f"{float(v):.3f}" for v in self.actual_ratio[i]), ""]
        return "\n".join(lines)


def masking_sweep(
    model: nn.Module,
    inputs: Tensor | np.ndarray | tuple[Tensor | np.ndarray, ...],
    labels: Tensor | np.ndarray | Sequence[int] | None = None,
    *,
    strategies: Sequence[str] = ("random", "center", "rollout_most", "rollout_least"),
    ratios: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    replacement: str = "zero",
    scores: Tensor | np.ndarray | None = None,
    batch_size: int = 32,
    seed: int = 0,
    show_progress: bool = True,
    adapter: ViTAdapter | None = None,
) -> MaskingSweepResult:
    r"""How predictions survive masking a growing fraction of patch tokens.

    For every strategy and ratio each image is masked (token level, see
    :mod:`captum_vit._token_masking`) and its top-1 compared with its unmasked top-1
    (*agreement*) and, when ``labels`` are given, with its label (*accuracy*).

    Strategies:

    * ``"random"``: :func:`captum_vit.masking.random_mask`, exact count per image;
      the masks of image ``n`` depend only on ``seed``, the ratio and ``n`` (not on
      ``batch_size``), so a sweep is repeatable.
    * ``"center"``: :func:`captum_vit.masking.center_mask`, the centred square
      nearest the ratio (``actual_ratio`` reports what was masked).
    * ``"rollout_most"`` / ``"rollout_least"``: the patches with the highest / lowest
      :class:`captum_vit.AttentionRollout` score (default settings) of the unmasked
      image masked first (:func:`captum_vit.masking.score_mask`).
    * ``"score_most"`` / ``"score_least"``: the same with your own ``scores``.

    Args:
        model (nn.Module): a ViT supported by :func:`captum_vit.adapt`.
        inputs (Tensor or ndarray): images ``(N, C, H, W)``, processed in batches
            (a 1-tuple of them, Captum style, too). A numpy array is taken as a CPU
            tensor as every ``attribute()`` takes it: float32 / float16 kept,
            float64 made float32, other dtypes refused.
        labels (Tensor, ndarray or Sequence[int], optional): integer class per
            image (checked against the model's classes as a Captum ``target``).
            Default: None
        strategies (Sequence[str], optional): from :data:`STRATEGIES`.
            Default: ("random", "center", "rollout_most", "rollout_least")
        ratios (Sequence[float], optional): fractions of patches masked, in [0, 1].
            Default: 0.1, 0.2, ..., 0.9
        replacement (str, optional): ``"zero"``, ``"mean"`` or ``"drop"``.
            Default: "zero"
        scores (Tensor or ndarray, optional): ``(N, P)``, ``(N, gh, gw)`` or
            ``(N, 1, gh, gw)`` per-patch scores for the ``"score_*"`` strategies.
            Default: None
        batch_size (int, optional): images per forward pass. Default: 32
        seed (int, optional): seed of the random masks. Default: 0
        show_progress (bool, optional): progress bar over batches. Default: True
        adapter (ViTAdapter, optional): a prebuilt adapter. Default: None

    Returns:
        MaskingSweepResult: ``agreement``, ``accuracy``, ``actual_ratio`` ``(S, R)``;
        ``.to_markdown()`` for a table.

    Example::

        >>> result = masking_sweep(model, images, labels, ratios=[0.3, 0.6])
        >>> print(result.to_markdown())
    """
    adapter = resolve_adapter(model, adapter)
    replacement = check_replacement(replacement)
    inputs, _ = _unpack_inputs(inputs)
    if inputs.ndim != 4:
        raise ValueError(f"inputs must be a tensor of images (N, C, H, W), got shape {tuple(inputs.shape)}")
    strategies = list(strategies)
    if not strategies:
        raise ValueError("strategies is empty")
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"unknown strategy {s!r}; choose from {STRATEGIES}")
    ratio_list = [float(r) for r in ratios]
    if not ratio_list:
        raise ValueError("ratios is empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = int(inputs.shape[0])
    grid = adapter.grid_size(inputs)
    patches = grid[0] * grid[1]
    for r in ratio_list:
        mask_count(patches, r)  # validates the ratio
    # labels are checked (dtype, class range) and made a LongTensor as Captum targets
    # once the first batch gives the number of classes
    label_all: Tensor | np.ndarray | list[int] | None = None
    if labels is not None:
        label_all = labels.reshape(-1) if isinstance(labels, (Tensor, np.ndarray)) else list(labels)
        if len(label_all) != n:
            raise ValueError(f"got {len(label_all)} labels for {n} images")
    label_t: Tensor | None = None
    score_t: Tensor | None = None
    if any(s.startswith("score_") for s in strategies):
        if scores is None:
            raise ValueError("the 'score_most' / 'score_least' strategies need scores=")
        if isinstance(scores, np.ndarray):
            scores = torch.from_numpy(np.ascontiguousarray(scores))
        if not isinstance(scores, Tensor):
            raise TypeError(f"scores must be a tensor or numpy array, got {type(scores).__name__}")
        score_t = scores.reshape(scores.shape[0], -1) if scores.ndim > 2 else scores
        if score_t.shape != (n, patches):
            raise ValueError(
                f"scores has shape {tuple(scores.shape)}; expected ({n}, {patches}) per-patch scores"
            )
    rollout = None
    if any(s.startswith("rollout_") for s in strategies):
        rollout = AttentionRollout(model, adapter=adapter)

    # Random masks for all images, one generator stream per ratio: independent of batching.
    random_masks: list[Tensor] = []
    if "random" in strategies:
        for j, r in enumerate(ratio_list):
            g = torch.Generator().manual_seed(seed * 1000 + j)
            random_masks.append(random_mask(n, patches, r, generator=g))
    centre = [center_mask(grid, r, return_ratio=True) for r in ratio_list]

    s_count, r_count = len(strategies), len(ratio_list)
    agree = torch.zeros(s_count, r_count, dtype=torch.float64)
    correct = torch.zeros(s_count, r_count, dtype=torch.float64)
    masked_total = torch.zeros(s_count, r_count, dtype=torch.float64)
    clean_correct = 0
    starts = range(0, n, batch_size)
    bar = progress(desc="masking sweep", total=len(starts)) if show_progress else None
    try:
        for start in starts:
            x = inputs[start : start + batch_size]
            b = int(x.shape[0])
            with torch.no_grad():
                logits = masked_forward(adapter, x, None, replacement)
            pred = logits.argmax(1)
            if label_all is not None and label_t is None:
                label_t = _resolve_target(label_all, logits[:1].expand(n, -1))
            lab = None if label_t is None else label_t[start : start + b]
            if lab is not None:
                clean_correct += int((pred == lab).sum())
            guide: Tensor | None = None
            if rollout is not None:
                rolled = rollout.attribute(x, return_patch_grid=True)
                assert isinstance(rolled, Tensor)
                guide = rolled
            for i, s in enumerate(strategies):
                for j, r in enumerate(ratio_list):
                    if s == "random":
                        mask = random_masks[j][start : start + b].to(x.device)
                    elif s == "center":
                        mask = centre[j][0].to(x.device).unsqueeze(0).expand(b, -1)
                    else:
                        src = guide if s.startswith("rollout_") else score_t[start : start + b]  # type: ignore[index]
                        assert src is not None
                        mask = score_mask(src.to(x.device), r, largest=s.endswith("_most"))
                    with torch.no_grad():
                        out = masked_forward(adapter, x, mask, replacement).argmax(1)
                    agree[i, j] += float((out == pred).sum())
                    masked_total[i, j] += float(mask.sum()) / patches
                    if lab is not None:
                        correct[i, j] += float((out == lab).sum())
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return MaskingSweepResult(
        strategies=strategies,
        ratios=ratio_list,
        actual_ratio=(masked_total / n).float(),
        agreement=(agree / n).float(),
        accuracy=None if label_all is None else (correct / n).float(),
        clean_accuracy=None if label_all is None else clean_correct / n,
        num_images=n,
        replacement=replacement,
    )
