"""Token-level masking of a Vision Transformer's patch tokens.

The one place where patch tokens are hidden from a model. It is used by
:class:`captum_vit.PatchOcclusion`, :func:`captum_vit.masking_sweep`, the perturbation
curves of :mod:`captum_vit.metrics` and Mask-as-Prompt of the SIFT method.

A mask is a bool tensor ``(B, gh*gw)`` over the patch grid in row-major order,
``True`` = masked. Three replacements are supported:

* ``"zero"``: the masked patch embeddings are set to 0 *before* position embeddings
  are added, so the token keeps its position embedding (and, through it, its
  position). Implemented by a forward hook on ``adapter.patch_embed``.
* ``"mean"``: the masked patch embeddings are replaced by the mean patch embedding of
  the same image (the mean over *all* its ``gh*gw`` patch embeddings, masked or not,
  so the replacement does not depend on the mask), before position embeddings.
* ``"drop"``: the masked tokens are removed from the sequence after position
  embeddings were added (hook on ``adapter.token_module``): the sequence is shorter and
  the forward pass cheaper. Samples of a batch with different numbers of masked
  patches are run in groups of equal count. Models whose position information is
  built for the full grid inside the blocks (rotary embeddings, e.g. timm EVA) cannot
  drop tokens and raise :class:`ValueError`.

Every hook is removed in ``finally``, also when the forward pass raises. A mask with
nothing masked reproduces the model's logits exactly (the hooks then return the
unchanged values).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ._capture import ViTAdapter, _thread_forward_hook
from ._utils import _slice_args, _unpack_inputs

__all__ = [
    "REPLACEMENTS",
    "Replacement",
    "check_mask",
    "check_replacement",
    "masked_forward",
    "token_masking",
]

Replacement = Literal["zero", "mean", "drop"]
#: The supported replacements, in documentation order.
REPLACEMENTS: tuple[str, ...] = ("zero", "mean", "drop")


def check_replacement(replacement: str) -> Replacement:
    """Validate a replacement name; returns it unchanged.

    Raises:
        ValueError: when it is not one of ``"zero"``, ``"mean"``, ``"drop"``.
    """
    if replacement not in REPLACEMENTS:
        raise ValueError(f"replacement must be one of {REPLACEMENTS}, got {replacement!r}")
    return replacement  # type: ignore[return-value]


def check_mask(mask: Tensor, batch: int, grid: tuple[int, int]) -> Tensor:
    """Validate a patch mask and bring it to shape ``(batch, gh*gw)``.

    Args:
        mask (Tensor): bool, ``(B, gh*gw)``, ``(B, gh, gw)`` or ``(gh*gw,)`` (the same
            mask for every sample). ``True`` = masked.
        batch (int): ``B``.
        grid (tuple[int, int]): the patch grid ``(gh, gw)`` of the inputs.

    Returns:
        Tensor: bool ``(batch, gh*gw)``, contiguous.

    Raises:
        TypeError: when ``mask`` is not a bool tensor.
        ValueError: when its shape does not fit ``batch`` and ``grid``.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool tensor (B, gh*gw), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor (True = masked), got dtype {mask.dtype}; "
            "use mask.bool() or a comparison"
        )
    patches = grid[0] * grid[1]
    if mask.ndim == 1 and mask.shape[0] == patches:
        mask = mask.unsqueeze(0).expand(batch, -1)
    elif mask.ndim == 3 and tuple(mask.shape[1:]) == grid:
        mask = mask.reshape(mask.shape[0], patches)
    if mask.ndim != 2 or mask.shape[1] != patches or mask.shape[0] != batch:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; expected ({batch}, {patches}) for a batch "
            f"of {batch} with a {grid[0]}x{grid[1]} patch grid"
        )
    return mask.contiguous()


def _check_droppable(adapter: ViTAdapter) -> None:
    if not adapter.droppable:
        raise ValueError(
            f"replacement='drop' is not possible for {type(adapter.model).__name__}: its "
            f"rotary position embeddings ({adapter.rotary}) are built for the full patch "
            "grid inside the attention blocks, so tokens cannot be removed from the "
            "sequence. Use replacement='zero' or 'mean'."
        )


def _patch_hook_output(out: Tensor, mask: Tensor, grid: tuple[int, int], replacement: str,
                       conv: bool) -> Tensor:
    """Replace masked patch embeddings in one ``patch_embed`` output."""
    b = mask.shape[0]
    gh, gw = grid
    if out.ndim == 4 and (conv or tuple(out.shape[1:3]) != grid) and tuple(out.shape[-2:]) == grid:
        # (B, D, gh, gw): torchvision conv_proj, CLIP patch_embedding
        layout = "nchw"
        tokens = out.flatten(2).transpose(1, 2)
    elif out.ndim == 4 and tuple(out.shape[1:3]) == grid:
        layout = "nhwc"  # timm dynamic_img_size
        tokens = out.reshape(out.shape[0], gh * gw, out.shape[-1])
    elif out.ndim == 3:
        layout = "nld"
        tokens = out
    else:
        raise ValueError(
            f"the patch embedding module produced shape {tuple(out.shape)}; expected patch "
            f"tokens (B, {gh * gw}, D), (B, D, {gh}, {gw}) or (B, {gh}, {gw}, D). Pass the "
            "module that outputs the patch embeddings as adapt(..., patch_embed=)"
        )
    if tokens.shape[0] != b or tokens.shape[1] != gh * gw:
        raise ValueError(
            f"the patch embedding module produced {tokens.shape[1]} patch tokens for a batch "
            f"of {tokens.shape[0]}, but the mask covers a {gh}x{gw} grid for a batch of {b}"
        )
    m = mask.to(tokens.device).unsqueeze(-1)
    if replacement == "zero":
        new = tokens.masked_fill(m, 0)
    else:
        mean = tokens.mean(dim=1, keepdim=True)
        new = torch.where(m, mean.expand_as(tokens), tokens)
    if layout == "nchw":
        return new.transpose(1, 2).reshape(out.shape)
    if layout == "nhwc":
        return new.reshape(out.shape)
    return new


def _drop_tokens(out: Tensor, mask: Tensor, adapter: ViTAdapter) -> Tensor:
    """Remove the masked patch tokens from a full token sequence ``(B, N, D)``."""
    if out.ndim != 3:
        raise ValueError(
            f"the token module produced shape {tuple(out.shape)}; expected the token sequence "
            "(B, N, D). Pass the module whose output is that sequence as adapt(..., token_module=)"
        )
    b, n, d = out.shape
    patches = mask.shape[1]
    prefix = adapter.num_prefix_tokens if adapter.num_prefix_tokens is not None else n - patches
    if b != mask.shape[0] or prefix < 0 or prefix + patches != n:
        raise ValueError(
            f"the token sequence has shape {tuple(out.shape)}, which does not fit a mask over "
            f"{patches} patches for a batch of {mask.shape[0]} ({prefix} prefix tokens)"
        )
    counts = mask.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(
            "replacement='drop' inside one forward pass needs the same number of masked "
            "patches in every sample; masked_forward groups samples for you"
        )
    keep = torch.cat(
        [torch.ones(b, prefix, dtype=torch.bool, device=mask.device), ~mask], dim=1
    ).to(out.device)
    return out[keep].reshape(b, n - int(counts[0]), d)


@contextlib.contextmanager
def token_masking(
    adapter: ViTAdapter, mask: Tensor, replacement: str = "zero", *,
    grid: tuple[int, int] | None = None,
) -> Iterator[None]:
    """Context manager: every forward pass of ``adapter.model`` inside is masked.

    Low-level building block of :func:`masked_forward`: each forward pass inside the
    block must be on a batch of exactly ``mask.shape[0]`` images, and for ``"drop"``
    every sample must mask the same number of patches.

    Args:
        adapter (ViTAdapter): the model's adapter (from :func:`captum_vit.adapt`).
        mask (Tensor): bool ``(B, gh*gw)``, ``True`` = masked.
        replacement (str, optional): ``"zero"``, ``"mean"`` or ``"drop"``.
            Default: "zero"
        grid (tuple[int, int], optional): the patch grid ``(gh, gw)``; needed for
            ``"zero"``/``"mean"`` when the patch embedding module outputs
            ``(B, D, gh, gw)`` or ``(B, gh, gw, D)`` maps. Default: a square grid
            inferred from ``mask.shape[1]``.

    Example::

        >>> with token_masking(adapter, mask, "zero", grid=(14, 14)):
        ...     logits = adapter.forward(images)
    """
    replacement = check_replacement(replacement)
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError("token_masking needs a bool mask (B, gh*gw); see check_mask")
    if grid is None:
        side = round(mask.shape[1] ** 0.5)
        grid = (side, mask.shape[1] // max(side, 1))
    if grid[0] * grid[1] != mask.shape[1]:
        raise ValueError(f"grid {grid} does not have {mask.shape[1]} patches")
    if replacement == "drop":
        module = adapter.token_module
        if module is None:
            raise ValueError(
                f"replacement='drop' needs the module whose output is the token sequence of "
                f"{type(adapter.model).__name__}: pass adapt(model, ..., token_module=...)"
            )
        _check_droppable(adapter)

        def hook(_m: nn.Module, _args: Any, out: Any) -> Tensor:
            if not isinstance(out, Tensor):
                raise ValueError(
                    f"the token module returned {type(out).__name__}; expected the token "
                    "sequence tensor (B, N, D)"
                )
            return _drop_tokens(out, mask, adapter)
    else:
        module = adapter.patch_embed
        if module is None:
            raise ValueError(
                f"replacement={replacement!r} needs the module whose output is the patch "
                f"embeddings of {type(adapter.model).__name__} (before position embeddings): "
                "pass adapt(model, ..., patch_embed=...)"
            )
        conv = isinstance(module, nn.Conv2d)
        g = grid

        def hook(_m: nn.Module, _args: Any, out: Any) -> Tensor:
            if not isinstance(out, Tensor):
                raise ValueError(
                    f"the patch embedding module returned {type(out).__name__}; expected a "
                    "tensor of patch embeddings"
                )
            return _patch_hook_output(out, mask, g, replacement, conv)

    with _thread_forward_hook(module, hook, channel="token_mask"):
        yield


def masked_forward(
    adapter: ViTAdapter,
    inputs: Tensor | np.ndarray,
    mask: Tensor | None,
    replacement: str = "zero",
    additional_forward_args: tuple[Any, ...] = (),
) -> Tensor:
    """Scores of the model with the masked patch tokens replaced or removed.

    Args:
        adapter (ViTAdapter): the model's adapter (from :func:`captum_vit.adapt`).
        inputs (Tensor or ndarray): images ``(B, C, H, W)``; a numpy array is taken
            as a CPU tensor as by every ``attribute()`` (float64 made float32,
            non-float dtypes refused).
        mask (Tensor or None): bool ``(B, gh*gw)`` (also ``(B, gh, gw)``, or
            ``(gh*gw,)`` for the same mask on every sample), ``True`` = masked.
            ``None`` masks nothing.
        replacement (str, optional): ``"zero"`` (patch embedding set to 0 before
            position embeddings), ``"mean"`` (the image's mean patch embedding) or
            ``"drop"`` (token removed after position embeddings). Default: "zero"
        additional_forward_args (tuple, optional): extra positional arguments of the
            model. For ``"drop"`` with different masked counts per sample, tensors
            whose first dimension is ``B`` are split with the batch; others are
            passed unchanged. Default: ()

    Returns:
        Tensor: the model's scores (logits; Hugging Face outputs unwrapped), ``(B, ...)``.
        Runs with the caller's grad mode.

    Raises:
        ValueError: bad mask shape, unknown replacement, a model whose patch
            embedding / token module is unknown, or ``"drop"`` on a model with rotary
            position embeddings.

    Example::

        >>> adapter = captum_vit.adapt(model)
        >>> mask = captum_vit.masking.random_mask(4, 196, 0.3)
        >>> logits = masked_forward(adapter, images, mask, "drop")
    """
    x, _ = _unpack_inputs(inputs)
    adapter.check_inputs(x)
    return _masked_forward(adapter, x, mask, replacement, additional_forward_args)


def _masked_forward(
    adapter: ViTAdapter,
    inputs: Tensor,
    mask: Tensor | None,
    replacement: str = "zero",
    additional_forward_args: tuple[Any, ...] = (),
) -> Tensor:
    """:func:`masked_forward` for inputs the caller has checked with
    :meth:`ViTAdapter.check_inputs` (callers that run many masked passes on one batch
    validate it once)."""
    replacement = check_replacement(replacement)
    args = tuple(additional_forward_args)
    if mask is None:
        return adapter.forward(inputs, *args)
    grid = adapter.grid_size(inputs)
    batch = int(inputs.shape[0])
    mask = check_mask(mask, batch, grid).to(inputs.device)
    if replacement != "drop":
        with token_masking(adapter, mask, replacement, grid=grid):
            return adapter.forward(inputs, *args)
    counts = mask.sum(dim=1)
    values = torch.unique(counts)
    if values.numel() == 1:
        with token_masking(adapter, mask, "drop", grid=grid):
            return adapter.forward(inputs, *args)
    out: Tensor | None = None
    for value in values.tolist():
        index = torch.nonzero(counts == value).flatten()
        with token_masking(adapter, mask[index], "drop", grid=grid):
            part = adapter.forward(inputs[index], *_slice_args(args, index, batch))
        if out is None:
            out = part.new_empty((batch, *part.shape[1:]))
        out[index] = part
    assert out is not None
    return out

