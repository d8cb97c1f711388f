"""The private floor of captum_vit: small helpers shared across modules.

Everything here depends only on torch and numpy (no other captum_vit module), so any
module may import it: Captum-style input / target / forward-argument handling (numpy
images and targets accepted), per-sample argument slicing and repetition, and splitting
a data-loader batch.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__: list[str] = []

TargetType = int | Sequence[int] | Tensor | np.ndarray | None


def _unpack_inputs(inputs: Tensor | np.ndarray | tuple[Tensor | np.ndarray, ...]) -> tuple[Tensor, bool]:
    """Accept a tensor or a 1-tuple (Captum style); return (tensor, was_tuple).

    A numpy array (as Quantus and scikit-style callers pass) is taken as that tensor on
    the CPU: float32 / float16 keep their dtype, float64 (numpy's default) becomes
    float32 (the dtype of the models' weights); other dtypes are refused. The result
    is a tensor, as for tensor inputs.
    """
    if isinstance(inputs, tuple):
        if len(inputs) != 1 or not isinstance(inputs[0], (Tensor, np.ndarray)):
            raise ValueError(
                "captum_vit methods explain one image tensor: pass a tensor (B, C, H, W) or a "
                f"1-tuple of it, got a tuple of {len(inputs)} item(s)"
            )
        return _as_input_tensor(inputs[0]), True
    if not isinstance(inputs, (Tensor, np.ndarray)):
        raise TypeError(f"inputs must be a tensor (B, C, H, W), got {type(inputs).__name__}")
    return _as_input_tensor(inputs), False


def _as_input_tensor(inputs: Tensor | np.ndarray) -> Tensor:
    if isinstance(inputs, Tensor):
        return inputs
    if inputs.dtype == np.float64:
        inputs = inputs.astype(np.float32)
    elif inputs.dtype not in (np.float32, np.float16):
        raise TypeError(f"numpy inputs must be floating point images (B, C, H, W), got dtype {inputs.dtype}")
    return torch.from_numpy(np.ascontiguousarray(inputs))


def _forward_args(additional_forward_args: Any) -> tuple[Any, ...]:
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def _resolve_target(target: TargetType, scores: Tensor) -> Tensor:
    """Captum-style target -> LongTensor (B,), validated against ``scores`` (B, C).

    ``None`` picks each sample's highest score (the predicted class); a numpy integer
    array is taken like an integer tensor.
    """
    if scores.ndim != 2:
        raise ValueError(
            f"the model's output has shape {tuple(scores.shape)}; class targets need (B, classes)"
        )
    batch, classes = scores.shape
    if target is None:
        return scores.detach().argmax(dim=1)
    if isinstance(target, bool):
        raise TypeError("target must be an int, a list of ints or a tensor, not bool")
    if isinstance(target, np.ndarray):  # numpy targets take the tensor path
        if target.dtype == np.bool_:
            raise TypeError("target array must hold integers, not bool")
        target = torch.from_numpy(np.ascontiguousarray(target))
    if isinstance(target, numbers.Integral):  # int, numpy integers
        t = torch.full((batch,), int(target), dtype=torch.long, device=scores.device)
    elif isinstance(target, Tensor):
        if target.is_floating_point():
            raise TypeError("target tensor must hold integers")
        t = target.to(device=scores.device, dtype=torch.long).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
    elif isinstance(target, Sequence) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in target
    ):
        t = torch.tensor([int(v) for v in target], dtype=torch.long, device=scores.device)
    else:
        raise TypeError(
            f"target must be None, an int, a list of ints or an integer tensor, got {target!r}"
        )
    if t.numel() != batch:
        raise ValueError(f"got {t.numel()} targets for a batch of {batch}")
    if (t < 0).any() or (t >= classes).any():
        bad = t[(t < 0) | (t >= classes)][0].item()
        raise ValueError(f"target {bad} is out of range for a model with {classes} outputs")
    return t.contiguous()


def _per_sample(a: Any, batch: int) -> bool:
    """Whether a forward argument is per sample (a tensor whose first dim is ``batch``)."""
    return isinstance(a, Tensor) and a.ndim > 0 and a.shape[0] == batch


def _slice_args(args: tuple[Any, ...], index: Tensor, batch: int) -> tuple[Any, ...]:
    """The samples ``index`` of the per-sample forward arguments; others unchanged."""
    return tuple(a[index.to(a.device)] if _per_sample(a, batch) else a for a in args)


def _repeat_args(args: tuple[Any, ...], batch: int, times: int) -> tuple[Any, ...]:
    """Per-sample forward arguments repeated ``times`` times along dim 0 (the batch
    repeated as a block, as ``Tensor.repeat``); others unchanged."""
    return tuple(a.repeat(times, *([1] * (a.ndim - 1))) if _per_sample(a, batch) else a for a in args)


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(images, labels, masks, indices)`` of one data-loader batch.

    Accepts an image tensor, a tuple / list ``(images[, labels[, masks[, indices]]])``,
    or a dict with ``"image"`` (or Hugging Face's ``"pixel_values"``) and optional
    ``"label"`` (``"labels"``), ``"mask"``, ``"index"``. Missing items are ``None``.
    """
    if isinstance(batch, Tensor):
        return batch, None, None, None
    if isinstance(batch, Mapping):
        key = "image" if "image" in batch else "pixel_values"
        if isinstance(batch.get(key), Tensor):
            label = batch.get("label", batch.get("labels"))
            return batch[key], label, batch.get("mask"), batch.get("index")
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        items = [v if isinstance(v, Tensor) else None for v in list(batch)[:4]]
        items += [None] * (4 - len(items))
        return batch[0], items[1], items[2], items[3]
    raise TypeError(
        "each batch must be images (B, C, H, W), (images, labels[, masks[, indices]]) or a "
        "dict with 'image' (or 'pixel_values') and optional 'label', 'mask', 'index'; got "
        f"{type(batch).__name__}"
    )


def _weighted_rows(weights: Tensor, matrix: Tensor) -> Tensor:
    """``Σ_n w_n · matrix[..., n, :]``: the query-weighted row of a ``(..., N, N)``
    matrix, float32, shape ``(..., N)`` (``weights`` ``(N,)``, moved to its device)."""
    return torch.einsum("n,...nm->...m", weights.to(matrix.device), matrix.float())


def _single_tensor(value: Any, name: str = "attributions") -> Tensor:
    """A tensor, or the tensor of a 1-tuple (Captum's tuple outputs); else one clear error."""
    if isinstance(value, tuple):
        if len(value) != 1:
            raise ValueError(f"{name}: expected a tensor or a 1-tuple, got a tuple of {len(value)}")
        value = value[0]
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    return value
