"""Helpers shared by every attribution class: inputs, targets and output shapes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._capture import StopForward, TokenLayout, ViTAdapter
from .._utils import _weighted_rows
from ._rollout import RolloutProduct

__all__: list[str] = []


def _query_rows(matrix: Tensor, adapter: ViTAdapter, layout: TokenLayout) -> Tensor:
    """Query rows of a (B, ..., N, N) matrix, patch columns only: (B, ..., gh, gw)."""
    return _patch_grid(_weighted_rows(adapter._query_weights(layout, matrix.device), matrix), layout)


def _patch_grid(rows: Tensor, layout: TokenLayout) -> Tensor:
    """The patch columns of token rows ``(B, ..., N)`` as a grid ``(B, ..., gh, gw)``."""
    patches = rows[..., layout.num_prefix_tokens :]
    return patches.reshape(*patches.shape[:-1], *layout.grid)


def _query_indices(adapter: ViTAdapter, layout: TokenLayout, device: torch.device) -> Tensor:
    """Indices of the token rows the head reads (where the query weights are > 0)."""
    def make() -> Tensor:
        return torch.nonzero(adapter._query_weights(layout, device) > 0).flatten()

    return adapter._cached(("query_indices", layout, adapter.pooling, str(device)), make)  # type: ignore[no-any-return]


def _format_output(
    maps: Tensor, inputs: Tensor, *, return_patch_grid: bool, as_tuple: bool
) -> Tensor | tuple[Tensor, ...]:
    """Patch maps (B, gh, gw) -> contiguous (B, 1, gh, gw) or input-shaped tensor.

    Input-shaped output upsamples with nearest neighbour (each pixel takes the value
    of its patch) and repeats the map in every channel.
    """
    grid = maps.unsqueeze(1)
    if return_patch_grid:
        out = grid.contiguous()
    else:
        up = F.interpolate(grid.float(), size=tuple(inputs.shape[-2:]), mode="nearest")
        out = up.expand(-1, inputs.shape[1], -1, -1).contiguous()
    if inputs.is_floating_point():
        out = out.to(inputs.dtype)
    return (out,) if as_tuple else out


def _check_fusion(head_fusion: str) -> str:
    if head_fusion not in ("mean", "max", "min"):
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    return head_fusion


def _check_layer_index(index: int, num_layers: int, name: str) -> int:
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"{name} must be an int, got {type(index).__name__}")
    if not -num_layers <= index < num_layers:
        raise ValueError(f"{name}={index} is out of range for a model with {num_layers} layers")
    return index % num_layers


def _run_captured(
    adapter: ViTAdapter,
    inputs: Tensor,
    args: tuple[Any, ...],
    *,
    keep: bool,
    on_attention: Any = None,
    validate: bool = True,
) -> tuple[Tensor, list[Tensor | None], TokenLayout]:
    """One forward pass under capture: (scores, per-layer attention or None, layout).

    ``validate=False`` skips the capture's full row-sum check (for callers that
    validate a cheaper part themselves).
    """
    adapter.check_inputs(inputs)
    with adapter.capture(keep=keep, on_attention=on_attention, validate=validate) as rec:
        scores = adapter.forward(inputs, *args)
    if rec.num_tokens is None:
        raise RuntimeError(
            "no attention was captured during the forward pass: the adapter's attention "
            "modules are not used by the model's forward"
        )
    if keep:
        rec.kept()
    return scores, rec.attentions, adapter.layout(inputs, rec.num_tokens)


def _run_attention_only(
    adapter: ViTAdapter,
    inputs: Tensor,
    args: tuple[Any, ...],
    *,
    on_attention: Any,
    first_layer: int = 0,
    last_layer: int = -1,
    query_rows: bool = False,
) -> TokenLayout:
    """A no-grad forward pass that stops right after ``last_layer``'s attention.

    For methods that need attention but no output scores (raw attention, rollout):
    the blocks after ``last_layer`` and the head are not run, which leaves the
    recorded attention identical. With ``query_rows``, ``last_layer``'s attention
    reaches ``on_attention`` as its query rows only, ``(B, heads, rows, N)`` in the
    order of :func:`_query_indices` (see ``stop_rows`` of
    :meth:`ViTAdapter.capture`). Raises if a layer in ``first_layer..last_layer``
    did not run. Returns the token layout.
    """
    adapter.check_inputs(inputs)
    last = last_layer % adapter.num_layers

    def rows_of(num_tokens: int) -> Tensor:
        return _query_indices(adapter, adapter.layout(inputs, num_tokens), inputs.device)

    with torch.no_grad(), adapter.capture(
        keep=False, on_attention=on_attention, stop_after=last,
        stop_rows=rows_of if query_rows else None,
    ) as rec:
        try:
            adapter.forward(inputs, *args)
        except StopForward:
            pass
    missing = [i for i in range(first_layer, last + 1) if i not in rec.seen]
    if rec.num_tokens is None or missing:
        raise RuntimeError(
            f"no attention was captured for layer(s) {missing or list(range(last + 1))}: the "
            "adapter's attention modules are not used by the model's forward"
        )
    return adapter.layout(inputs, rec.num_tokens)


def _lazy_product(
    state: dict[str, Any],
    adapter: ViTAdapter,
    inputs: Tensor,
    attn: Tensor,
    head_fusion: str,
    discard_ratio: float,
    residual_weight: float,
) -> RolloutProduct:
    """The :class:`RolloutProduct` kept in ``state["product"]``, built on the first
    captured layer (the query rows need the token count ``attn`` reveals); the
    layout goes in ``state["layout"]``."""
    if "product" not in state:
        layout = state["layout"] = adapter.layout(inputs, int(attn.shape[-1]))
        state["product"] = RolloutProduct(
            head_fusion, discard_ratio, residual_weight, _query_indices(adapter, layout, attn.device)
        )
    product: RolloutProduct = state["product"]
    return product


def _check_finite(maps: Tensor, method: str) -> None:
    """One finiteness check of a result (the attention of known families is not
    validated layer by layer: a NaN or Inf in it shows up here)."""
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(
            f"{method}: the model's attention contains NaN or Inf (check its weights and "
            "the input dtype)"
        )
