"""The capture layer: the only place in captum_vit that knows about timm, Hugging Face
and torchvision.

:func:`adapt` turns a model into a :class:`ViTAdapter` that knows

* which modules produce each layer's attention probabilities ``(B, heads, N, N)``,
* how many prefix tokens (CLS, distillation, registers) precede the patch tokens,
* the patch size and hence the patch grid of any input the model accepts,
* which token rows the model's head pools (the *query rows* of every map),
* where the patch embeddings and the full token sequence can be reached (used by
  token-level masking), and whether tokens can be dropped (no rotary embedding),
* where the final token states are read and how the classifier head scores them
  (``pooling_path``, used by :func:`captum_vit.compare_pooling`).

No other module of captum_vit tests a model's class, class name or family: what they
need is a field of :class:`ViTAdapter`.

:meth:`ViTAdapter.capture` is a context manager that records the attention of each
layer while the model runs. It switches timm's fused attention off and Hugging Face's
attention implementation to eager only for its duration and only for the thread that
opened it; its changes to the model are shared and reference-counted, so many threads
may capture the same model at once, and the last one to leave removes every hook and
restores every flag, also when the forward pass raises (see the section
"thread-dispatched patches" below for the mechanism other methods reuse).

:meth:`ViTAdapter.stream_attention_grads` serves methods that need each layer's
attention *and its gradient* (GradientRollout): the model keeps its fused attention,
and each layer's probabilities and gradient are handed over one layer at a time during
the backward pass (section "streamed attention gradients").
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionGradStream",
    "AttentionRecorder",
    "LayerGrad",
    "Pooling",
    "PoolingPath",
    "StopForward",
    "TokenLayout",
    "UnsupportedModelError",
    "ViTAdapter",
    "adapt",
]

Pooling = Literal["cls", "cls_dist", "mean_patch", "cls_mean_patch"]
_POOLINGS: tuple[str, ...] = ("cls", "cls_dist", "mean_patch", "cls_mean_patch")

#: Tolerance on attention row sums when validating captured probabilities.
_ROW_SUM_TOL = 1e-2


class UnsupportedModelError(TypeError):
    """Raised when :func:`adapt` cannot find global self-attention in a model.

    The message says what was missing and how to describe the model by hand
    (``attention_modules=``, ``num_prefix_tokens=``, ``patch_size=``).
    """


@dataclass(frozen=True)
class TokenLayout:
    """How the token sequence of one input is laid out.

    Attributes:
        num_tokens (int): ``N``, the sequence length seen by attention.
        num_prefix_tokens (int): tokens before the patches (CLS, distillation,
            registers).
        grid (tuple[int, int]): the patch grid ``(gh, gw)``; ``gh * gw`` patch tokens.
    """

    num_tokens: int
    num_prefix_tokens: int
    grid: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    items = tuple(int(v) for v in value)
    if len(items) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {value!r}")
    return (items[0], items[1])


class StopForward(BaseException):
    """Raised by a capture hook to end the forward pass once ``stop_after`` has run.

    Derives from ``BaseException`` so that ``except Exception`` blocks inside a
    model's forward do not swallow it. It is raised only in the thread whose
    capture passed ``stop_after`` and is swallowed by that capture when it leaves
    its ``with`` block (or earlier by a caller catching it around the forward call).

    Attributes:
        recorder (AttentionRecorder | None): the recorder that asked for the stop.
    """

    def __init__(self, recorder: AttentionRecorder | None = None) -> None:
        super().__init__("forward pass stopped after the last needed attention layer")
        self.recorder = recorder


class AttentionRecorder:
    """Receives each layer's attention probabilities during a captured forward pass.

    Attributes:
        attentions (list[Tensor | None]): per layer (depth order), the probability
            tensor ``(B, heads, N, N)`` exactly as used by the model (still attached
            to the autograd graph when grad is enabled), or ``None`` when
            ``keep=False`` or the layer did not run.
        num_tokens (int | None): ``N`` of the last recorded layer.
        seen (set[int]): the layers recorded so far.
    """

    def __init__(
        self,
        num_layers: int,
        *,
        keep: bool = True,
        on_attention: Callable[[int, Tensor], None] | None = None,
        validate: bool = True,
        stop_after: int | None = None,
        stop_rows: Callable[[int], Tensor] | None = None,
    ) -> None:
        self.attentions: list[Tensor | None] = [None] * num_layers
        self.num_tokens: int | None = None
        self.seen: set[int] = set()
        self._keep = keep
        self._on_attention = on_attention
        self._validate = validate
        self._stop_after = stop_after
        self._stop_rows = stop_rows if stop_after is not None else None

    def record(self, layer: int, attn: Tensor, *, check_rows: bool) -> None:
        if self._validate:
            _validate_attention(layer, attn, check_rows=check_rows)
        if self._stop_rows is not None and layer == self._stop_after:
            attn = attn.index_select(-2, self._stop_rows(int(attn.shape[-1])).to(attn.device))
        self._deliver(layer, attn)

    def record_rows(self, layer: int, rows: Tensor) -> None:
        """Record the stop layer's query rows ``(B, heads, rows, N)``, computed by the
        capture itself (only those rows of the scores), and end the forward pass."""
        assert self._stop_rows is not None and layer == self._stop_after
        self._deliver(layer, rows)

    def _deliver(self, layer: int, attn: Tensor) -> None:
        self.num_tokens = int(attn.shape[-1])
        self.seen.add(layer)
        if self._keep:
            self.attentions[layer] = attn
        if self._on_attention is not None:
            self._on_attention(layer, attn)
        if self._stop_after is not None and layer == self._stop_after:
            raise StopForward(self)

    def kept(self) -> list[Tensor]:
        """The recorded attention of every layer; raises if a layer did not run."""
        missing = [i for i, a in enumerate(self.attentions) if a is None]
        if missing:
            raise RuntimeError(
                f"no attention was captured for layer(s) {missing}: the forward pass did "
                "not run those attention modules (are they part of the model's forward?)"
            )
        return [a for a in self.attentions if a is not None]


def _validate_attention(layer: int, attn: Any, *, check_rows: bool) -> None:
    if not isinstance(attn, Tensor):
        raise ValueError(
            f"attention module of layer {layer} produced {type(attn).__name__}, expected "
            "the attention-probability tensor (B, heads, N, N) (or a tuple whose second "
            "item is that tensor)"
        )
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(
            f"attention of layer {layer} has shape {tuple(attn.shape)}; expected "
            "(B, heads, N, N) attention probabilities. Pass the modules whose output is "
            "the post-softmax attention of global self-attention."
        )
    if check_rows:
        with torch.no_grad():
            sums = attn.detach().float().sum(-1)
            dev = (sums - 1).abs().amax()
            # one synchronising check; the details only on failure (NaN fails `<=`)
            if bool((dev <= _ROW_SUM_TOL) & (attn.detach().amin() >= 0)):
                return
            if not torch.isfinite(sums).all():
                raise ValueError(f"attention of layer {layer} contains NaN or Inf")
            if (sums - 1).abs().max().item() > _ROW_SUM_TOL or attn.min().item() < 0:
                raise ValueError(
                    f"attention of layer {layer} is not row-stochastic (rows sum to "
                    f"{sums.min().item():.4g}..{sums.max().item():.4g}, min entry "
                    f"{attn.min().item():.4g}); expected post-softmax probabilities"
                )


def _to_output_tensor(out: Any) -> Tensor:
    """Unwrap a model output (Hugging Face ``ModelOutput``, dict, tuple) to a tensor.

    Prefers ``logits``, then ``image_embeds``, then ``pooler_output``.
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("logits", "image_embeds", "pooler_output"):
            value = out.get(key)
            if isinstance(value, Tensor):
                return value
        raise TypeError(
            f"model returned a mapping with keys {list(out.keys())}; expected 'logits', "
            "'image_embeds' or 'pooler_output'"
        )
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot read a score tensor from a model output of type {type(out)}")


@dataclass
class ViTAdapter:
    """Everything captum_vit needs to know about one Vision Transformer.

    Build it with :func:`adapt`; the attribution classes call it for you.

    Attributes:
        model (nn.Module): the wrapped model (not copied).
        attention_modules (list[nn.Module]): one module per layer, depth order.
        patch_size (tuple[int, int]): patch height and width in pixels.
        num_prefix_tokens (int | None): prefix tokens before the patches; ``None``
            means "sequence length minus patches", read at capture time.
        pooling (str): which rows the head reads: ``"cls"`` (row 0), ``"cls_dist"``
            (mean of rows 0 and 1), ``"mean_patch"`` (mean of the patch rows) or
            ``"cls_mean_patch"`` (half CLS row, half mean patch row: heads that
            concatenate both, e.g. Hugging Face Dinov2).
        family (str): ``"timm"``, ``"hf"``, ``"torchvision"`` or ``"custom"``.
        img_size (tuple[int, int] | None): the only input size the model accepts, or
            ``None`` when any multiple of the patch size works.
        patch_embed (nn.Module | None): module whose output holds the patch
            embeddings before position embeddings are added ((B, P, D) tokens, or
            (B, D, gh, gw) for torchvision's ``conv_proj``).
        token_module (nn.Module | None): module whose output is the full token
            sequence ``(B, N, D)`` (prefix + patches, position embeddings added)
            entering the first block.
        blocks (list[nn.Module] | None): the transformer blocks, depth order, one per
            attention module; each block's output (or its first item, when a tuple)
            is the token sequence ``(B, N, D)`` leaving that block (used by Grad-CAM).
        out_projections (list[nn.Module] | None): per layer, the attention's output
            projection (a linear layer whose input is the heads' outputs concatenated
            head by head, ``(B, N, heads * head_dim)``): timm ``attn.proj``, Hugging
            Face ``o_proj`` / ``out_proj`` / ``*SelfOutput.dense``, torchvision
            ``out_proj`` (called as a module only inside :meth:`capture`). Used to
            zero attention heads.
        pooling_path (PoolingPath | None): the final token states and classifier
            head (timm, Hugging Face, torchvision), for
            :func:`captum_vit.compare_pooling`; ``None`` with the reason in
            ``pooling_path_error``.
        pooling_path_error (str | None): why there is no ``pooling_path``.
        rotary (str | None): the class name of the model's rotary position embedding
            (e.g. timm EVA), or ``None``. Tokens can be dropped from the sequence
            (token masking ``"drop"``) only without one; see :attr:`droppable`.
    """

    model: nn.Module
    attention_modules: list[nn.Module]
    patch_size: tuple[int, int]
    num_prefix_tokens: int | None
    pooling: Pooling = "cls"
    family: str = "custom"
    img_size: tuple[int, int] | None = None
    patch_embed: nn.Module | None = None
    token_module: nn.Module | None = None
    blocks: list[nn.Module] | None = None
    out_projections: list[nn.Module] | None = None
    pooling_path: PoolingPath | None = field(default=None, repr=False)
    pooling_path_error: str | None = field(default=None, repr=False)
    rotary: str | None = None
    _capture_kind: str = field(default="module_output", repr=False)
    _dynamic_pad: bool = field(default=False, repr=False)
    #: what depends only on the model and the input size (layouts, query weights,
    #: the modules holding ``fused_attn``), keyed by everything it depends on
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def droppable(self) -> bool:
        """Whether patch tokens can be removed from the sequence (no rotary embedding)."""
        return self.rotary is None

    # ------------------------------------------------------------------ geometry
    @property
    def num_layers(self) -> int:
        return len(self.attention_modules)

    def grid_size(self, inputs: Tensor) -> tuple[int, int]:
        """Patch grid ``(gh, gw)`` of a batch ``(B, C, H, W)`` (its shape validated;
        the values are checked once per call by :meth:`check_inputs`)."""
        self._check_shape(inputs)
        return self._grid(int(inputs.shape[-2]), int(inputs.shape[-1]))

    def _grid(self, h: int, w: int) -> tuple[int, int]:
        ph, pw = self.patch_size
        if self._dynamic_pad:
            return (math.ceil(h / ph), math.ceil(w / pw))
        return (h // ph, w // pw)

    def check_inputs(self, inputs: Tensor) -> None:
        """Raise ``ValueError`` for inputs this model cannot take (shape, size, NaN / Inf)."""
        self._check_shape(inputs)
        if inputs.is_floating_point() and inputs.numel():
            # one vectorised pass: a NaN or Inf makes the sum non-finite; only then (or
            # when large finite values overflow it) look at every value
            if not bool(torch.isfinite(inputs.detach().sum())):
                if not bool(torch.isfinite(inputs.detach()).all()):
                    raise ValueError("inputs contain NaN or Inf")

    def _check_shape(self, inputs: Tensor) -> None:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
        if inputs.ndim != 4:
            raise ValueError(
                f"inputs must be a batch of images (B, C, H, W); got shape {tuple(inputs.shape)}"
            )
        if inputs.shape[0] == 0:
            raise ValueError("inputs is an empty batch")
        h, w = int(inputs.shape[-2]), int(inputs.shape[-1])
        if self.img_size is not None and (h, w) != self.img_size:
            hint = (
                " (create the timm model with dynamic_img_size=True to accept other sizes)"
                if self.family == "timm"
                else ""
            )
            raise ValueError(
                f"this model takes {self.img_size[0]}x{self.img_size[1]} inputs, got "
                f"{h}x{w}; resize or crop the images first{hint}"
            )
        ph, pw = self.patch_size
        if not self._dynamic_pad and (h < ph or w < pw):
            raise ValueError(f"inputs of {h}x{w} are smaller than one {ph}x{pw} patch")

    def layout(self, inputs: Tensor, num_tokens: int) -> TokenLayout:
        """The token layout of ``inputs`` given the sequence length seen by attention.

        Depends only on the model and the input size: computed once per size and
        cached on the adapter.
        """
        self._check_shape(inputs)
        h, w = int(inputs.shape[-2]), int(inputs.shape[-1])
        key = ("layout", h, w, int(num_tokens), self.num_prefix_tokens, self.pooling,
               self.patch_size, self._dynamic_pad)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._layout(h, w, int(num_tokens))
        return cached  # type: ignore[no-any-return]

    def _layout(self, h: int, w: int, num_tokens: int) -> TokenLayout:
        grid = self._grid(h, w)
        patches = grid[0] * grid[1]
        prefix = self.num_prefix_tokens
        if prefix is None:
            prefix = num_tokens - patches
            if prefix < 0:
                raise ValueError(
                    f"attention has {num_tokens} tokens but the {grid[0]}x{grid[1]} patch "
                    f"grid of a {(h, w)} input needs {patches}: check patch_size"
                )
        elif prefix + patches != num_tokens:
            raise ValueError(
                f"attention has {num_tokens} tokens, but {prefix} prefix tokens + a "
                f"{grid[0]}x{grid[1]} patch grid make {prefix + patches}: check "
                "num_prefix_tokens and patch_size"
            )
        if self.pooling in ("cls", "cls_dist", "cls_mean_patch") and prefix < (
            2 if self.pooling == "cls_dist" else 1
        ):
            raise ValueError(f"pooling {self.pooling!r} needs prefix tokens; the model has {prefix}")
        return TokenLayout(num_tokens=num_tokens, num_prefix_tokens=prefix, grid=grid)

    def query_weights(self, layout: TokenLayout, device: torch.device | None = None) -> Tensor:
        """Weights ``(N,)`` over token rows that the model's head pools (sum to 1)."""
        return self._query_weights(layout, device).clone()

    def _query_weights(self, layout: TokenLayout, device: torch.device | str | None = None) -> Tensor:
        """:meth:`query_weights`, cached per layout, pooling and device (read only)."""
        key = ("query", layout, self.pooling, str(device))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._make_query_weights(layout, device)
        return cached  # type: ignore[no-any-return]

    def _make_query_weights(self, layout: TokenLayout, device: torch.device | str | None) -> Tensor:
        w = torch.zeros(layout.num_tokens, dtype=torch.float32, device=device)
        p = layout.num_prefix_tokens
        if self.pooling == "cls":
            w[0] = 1.0
        elif self.pooling == "cls_dist":
            w[0] = 0.5
            w[1] = 0.5
        elif self.pooling == "mean_patch":
            w[p:] = 1.0 / layout.num_patches
        else:  # cls_mean_patch
            w[0] = 0.5
            w[p:] += 0.5 / layout.num_patches
        return w

    # ------------------------------------------------------------------ running
    def forward(self, inputs: Tensor, *args: Any) -> Tensor:
        """Run the model and return its score tensor (logits; HF outputs unwrapped)."""
        return _to_output_tensor(self.model(inputs, *args))

    @contextlib.contextmanager
    def capture(
        self,
        *,
        keep: bool = True,
        on_attention: Callable[[int, Tensor], None] | None = None,
        validate: bool = True,
        stop_after: int | None = None,
        stop_rows: Callable[[int], Tensor] | None = None,
    ) -> Iterator[AttentionRecorder]:
        """Record every layer's attention probabilities while the model runs.

        Only forward passes run *by the thread that opened the capture* are recorded
        and altered. The mechanism, shared by every method and by every thread that
        uses the same model:

        * Everything a capture changes on the model (timm's ``fused_attn`` flags,
          Hugging Face's attention implementation, the forward hooks on the
          attention modules, torchvision's patched ``nn.MultiheadAttention``
          forward) is installed once per module and shared, under one re-entrant
          lock with a reference count: the first capture open on a module installs
          it, the last one to close removes it and restores the exact previous
          state (also when the forward pass raises).
        * The installed hooks, patched forwards and flags dispatch on the current
          thread: they act for the innermost capture open on *this* thread and are
          inert for every other thread. ``fused_attn`` is replaced by a flag whose
          truth value is ``False`` only in capturing threads; Hugging Face modules
          read a dispatching attention function that runs the eager kernel only in
          capturing threads and the model's own implementation otherwise. A plain
          ``model(x)`` from another thread while a capture is open therefore runs
          exactly the unmodified model (same kernels, same logits) and records
          nothing.
        * Captures nest: on one thread the innermost open capture records; the
          outer one records again once the inner one has closed.
        * :class:`StopForward` is raised only in the thread whose capture asked
          for it (``stop_after``) and is swallowed when it leaves this ``with``
          block, so it never reaches a caller.

        Other parts of captum_vit (Grad-CAM's block hook, head and token masking)
        and new methods install their own hooks and forward patches through the
        same mechanism: :func:`_thread_forward_hook`, :func:`_thread_forward_pre_hook`,
        :func:`_thread_forward` and :func:`_thread_flag` in this module.

        Args:
            keep (bool, optional): keep each layer's tensor in
                ``recorder.attentions`` (needed for gradients). Default: True
            on_attention (Callable[[int, Tensor], None], optional): called with
                ``(layer, attention)`` as each layer runs, e.g. to multiply a rollout
                without holding every layer. Default: None
            validate (bool, optional): check shape and row sums (rows sum to 1 when
                the model is in eval mode). Default: True
            stop_after (int, optional): raise :class:`StopForward` right after this
                layer's attention is recorded, ending the forward pass early (for
                methods that need no output scores). The capture swallows it when it
                leaves the ``with`` block (statements after the forward call inside
                the block are skipped; catch it around the call to continue).
                Default: None
            stop_rows (Callable[[int], Tensor], optional): with ``stop_after``, deliver
                only some rows of the stop layer's attention: called with the token
                count ``N``, it returns the row indices (e.g. the query rows), and that
                layer is recorded as ``(B, heads, rows, N)``. timm attention computes
                only those rows of its scores (the queries of the other tokens, the
                values and the softmax of the other rows are skipped); other modules
                are run in full and their map sliced. Default: None

        Yields:
            AttentionRecorder: filled during forward passes run by this thread
            inside the block.

        Raises:
            UnsupportedModelError: when an ``nn.MultiheadAttention`` layer is called
                as cross-attention (key or value different from the query) or with
                attention masks.

        Example::

            >>> with adapter.capture() as rec:
            ...     logits = adapter.forward(x)
            >>> rec.attentions[0].shape   # (B, heads, N, N)
        """
        recorder = AttentionRecorder(
            self.num_layers,
            keep=keep,
            on_attention=on_attention,
            validate=validate,
            stop_after=stop_after,
            stop_rows=stop_rows,
        )
        with contextlib.ExitStack() as stack:
            if self._capture_kind == "timm":
                for m in self._fused_flag_modules():
                    if isinstance(getattr(m, "fused_attn", None), (bool, _ThreadFlag)):
                        stack.enter_context(_thread_flag(m, "fused_attn", False))
            elif self._capture_kind == "hf":
                per_thread, configs = self._hf_switch()
                for cfg in configs:
                    stack.enter_context(_hf_thread_eager(cfg, per_thread=per_thread))
            for layer, module in enumerate(self.attention_modules):
                stack.enter_context(self._hook_layer(layer, module, recorder))
            if stop_rows is not None and stop_after is not None and self._timm_rows_ok(stop_after):
                module = self.attention_modules[stop_after]
                stack.enter_context(
                    _thread_forward(module, _timm_rows_forward(module, recorder, stop_after, stop_rows))
                )
            try:
                yield recorder
            except StopForward as stop:
                if stop.recorder is not recorder:
                    raise

    def _cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per ``key`` and kept on the adapter."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _timm_rows_ok(self, layer: int) -> bool:
        """Whether layer ``layer`` is timm's standard ``Attention`` (its own class
        forward, a packed ``qkv`` linear), so that :func:`_timm_rows_forward` can
        compute some rows of its map (the class test is cached)."""
        if self._capture_kind != "timm":
            return False
        module = self.attention_modules[layer]
        with _LOCK:  # a consistent view of the forward slots of other threads
            if "forward" in module.__dict__:  # replaced by the user, or by an open capture
                slot = _SLOTS.get((id(module), "forward", ""))
                if slot is None or slot.data is not False:  # the user's own forward
                    return False
        return self._cached(("timm_rows", layer), lambda: _is_timm_attention(module))  # type: ignore[no-any-return]

    def _hf_switch(self) -> tuple[bool, list[Any]]:
        """(whether HF eager attention can be dispatched per thread, the configs) (cached)."""
        return self._cached(  # type: ignore[no-any-return]
            "hf_switch",
            lambda: (_hf_has_eager(self.attention_modules), _hf_configs(self.attention_modules)),
        )

    def _fused_flag_modules(self) -> list[nn.Module]:
        """The modules of a timm model that have a ``fused_attn`` attribute (cached)."""
        mods = self._cache.get("fused_flag_modules")
        if mods is None:
            mods = self._cache["fused_flag_modules"] = [
                m for m in self.model.modules() if hasattr(m, "fused_attn")
            ]
        return mods  # type: ignore[no-any-return]

    def _hook_layer(
        self, layer: int, module: nn.Module, recorder: AttentionRecorder
    ) -> contextlib.AbstractContextManager[_Slot]:
        if self._capture_kind == "timm":
            target = module.get_submodule("attn_drop")

            def timm_hook(m: nn.Module, _args: Any, out: Any) -> None:
                _record(recorder, layer, out, m)

            return _thread_forward_hook(target, timm_hook, channel="capture")
        if self._capture_kind == "torchvision":
            return _torchvision_mha_patch(
                module, lambda attn: _record(recorder, layer, attn, module), layer
            )

        # hf and custom: the module's output (or its second item) is the attention.
        custom = self._capture_kind == "module_output"

        def output_hook(m: nn.Module, _args: Any, out: Any) -> None:
            _record(recorder, layer, _second_if_tuple(out, layer), m, rows=custom)

        return _thread_forward_hook(module, output_hook, channel="capture")

    @contextlib.contextmanager
    def stream_attention_grads(
        self,
        on_layer: Callable[[LayerGrad], None],
        *,
        first_layer: int = 0,
        validate: bool = True,
        materialize: bool = False,
    ) -> Iterator[AttentionGradStream]:
        """Deliver each layer's attention and its gradient during the backward pass.

        Inside the block, run the forward pass on this thread (grad enabled), then
        call ``stream.backward(score)``: ``on_layer`` receives one
        :class:`LayerGrad` per layer from ``first_layer`` on, as the backward pass
        reaches it (normally from the last layer down); a layer whose attention has
        no gradient (it does not depend on the input or on any parameter, or the
        score does not depend on it) is not delivered. The backward pass stops at the
        lowest delivered layer and computes no parameter gradients.

        The model keeps its fused attention: a layer that calls
        ``F.scaled_dot_product_attention`` (timm with ``fused_attn``, Hugging Face
        ``sdpa``, torchvision) runs that kernel unchanged and keeps only its q, k, v
        (saved by SDPA for its own backward anyway); :meth:`LayerGrad.chunks` then
        recomputes the probabilities from q and k and takes ``G = dO · Vᵀ`` from the
        gradient ``dO`` of the attention output, a few heads at a time. Layers that
        materialise their probabilities (timm with ``fused_attn`` off, custom
        attention modules, attention dropout in training mode) deliver those and
        their gradient. Hooks and patches follow the rules of :meth:`capture` (this
        thread only, shared and restored by the last user).

        Args:
            on_layer (Callable[[LayerGrad], None]): called in the backward pass.
            first_layer (int, optional): lowest layer delivered. Default: 0
            validate (bool, optional): check materialised probabilities (shape; row
                sums for custom attention modules in eval mode). Default: True
            materialize (bool, optional): switch timm's ``fused_attn`` off and Hugging
                Face attention to eager for this thread, as :meth:`capture` does, so
                that every layer materialises its probabilities (for attention
                modules that neither call SDPA nor expose them otherwise, e.g. HF
                flash attention). Default: False

        Yields:
            AttentionGradStream: call ``backward(score)`` on it after the forward.

        Example::

            >>> with adapter.stream_attention_grads(lambda g: print(g.layer)) as s:
            ...     score = adapter.forward(x)[:, 3].sum()
            ...     s.backward(score)          # prints 11, 10, ..., 0
        """
        stream = AttentionGradStream(self.num_layers, on_layer, first_layer, validate)
        custom = self._capture_kind == "module_output"
        with contextlib.ExitStack() as stack:
            if materialize and self._capture_kind == "timm":
                for m in self._fused_flag_modules():
                    if isinstance(getattr(m, "fused_attn", None), (bool, _ThreadFlag)):
                        stack.enter_context(_thread_flag(m, "fused_attn", False))
            elif materialize and self._capture_kind == "hf":
                per_thread, configs = self._hf_switch()
                for cfg in configs:
                    stack.enter_context(_hf_thread_eager(cfg, per_thread=per_thread))
            for layer, module in enumerate(self.attention_modules):
                if self._capture_kind == "torchvision":
                    stack.enter_context(
                        _thread_forward(module, _torchvision_sdpa_forward(module, stream, layer))
                    )
                    continue
                if self._capture_kind in ("timm", "hf"):
                    stack.enter_context(_thread_forward(module, _sdpa_wrapped(module, stream, layer)))
                if self._capture_kind == "timm":
                    target = module.get_submodule("attn_drop")

                    def timm_hook(m: nn.Module, _args: Any, out: Any, layer: int = layer) -> Any:
                        return stream.attention(layer, out, check_rows=False)

                    stack.enter_context(_thread_forward_hook(target, timm_hook, channel="stream"))
                elif self._capture_kind == "hf":

                    def hf_hook(m: nn.Module, _args: Any, out: Any, layer: int = layer) -> None:
                        if layer in stream.seen:  # already streamed through SDPA
                            return
                        if not materialize and isinstance(out, (tuple, list)) and (
                            len(out) < 2 or out[1] is None
                        ):
                            return  # neither SDPA nor weights: the caller reruns materialised
                        stream.watch(layer, _second_if_tuple(out, layer), check_rows=False)

                    stack.enter_context(_thread_forward_hook(module, hf_hook, channel="stream"))
                else:

                    def custom_hook(m: nn.Module, _args: Any, out: Any, layer: int = layer) -> Any:
                        rows = custom and not m.training
                        if isinstance(out, (tuple, list)):  # the module used it already
                            stream.watch(layer, _second_if_tuple(out, layer), check_rows=rows)
                            return None
                        return stream.attention(layer, out, check_rows=rows)

                    stack.enter_context(_thread_forward_hook(module, custom_hook, channel="stream"))
            yield stream


def _is_timm_attention(module: nn.Module) -> bool:
    try:
        from timm.layers.attention import Attention
    except ImportError:  # pragma: no cover - timm models imply timm
        return False
    return (
        type(module).forward is Attention.forward
        and isinstance(getattr(module, "qkv", None), nn.Linear)
        and all(hasattr(module, a) for a in ("q_norm", "k_norm", "scale", "num_heads", "head_dim"))
    )


def _timm_rows_forward(
    module: nn.Module, recorder: AttentionRecorder, layer: int, rows_of: Callable[[int], Tensor]
) -> Callable[..., Any]:
    """A forward for timm's ``Attention`` that computes only the rows ``rows_of(N)`` of
    its probabilities, records them and ends the forward pass: the keys of every
    token, the queries of those rows, their scores and softmax (the values, the other
    rows and the output projection are not computed). Calls with a mask, causal
    attention or in training mode (dropout) run the module's own forward."""
    own = type(module).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs.get("x")
        extra = [*args[1:], *(v for k, v in kwargs.items() if k != "x")]
        if (
            module.training
            or not isinstance(x, Tensor)
            or x.ndim != 3
            or any(v is not None and v is not False for v in extra)
        ):
            return own(module, *args, **kwargs)
        b, n, _ = x.shape
        attn_module: Any = module
        heads, dim = int(attn_module.num_heads), int(attn_module.head_dim)
        width = heads * dim
        weight, bias = attn_module.qkv.weight, attn_module.qkv.bias
        rows = rows_of(n).to(x.device)
        k = F.linear(x, weight[width : 2 * width], None if bias is None else bias[width : 2 * width])
        # one small matmul per sample (a linear over all samples' few rows at once picks
        # its kernel by the row count, so a sample's result would depend on the batch)
        q = torch.bmm(x.index_select(1, rows), weight[:width].t().expand(b, -1, -1))
        if bias is not None:
            q = q + bias[:width]
        k = attn_module.k_norm(k.view(b, n, heads, dim).transpose(1, 2))
        q = attn_module.q_norm(q.view(b, -1, heads, dim).transpose(1, 2))
        attn = (q * attn_module.scale) @ k.transpose(-2, -1)
        recorder.record_rows(layer, attn.softmax(dim=-1))  # raises StopForward
        raise AssertionError("unreachable: record_rows ends the forward pass")

    return forward


def _second_if_tuple(out: Any, layer: int) -> Any:
    if isinstance(out, (tuple, list)):
        if len(out) < 2 or out[1] is None:
            raise ValueError(
                f"attention module of layer {layer} returned a tuple without attention "
                "weights in its second item (Hugging Face returns them only with eager "
                "attention)"
            )
        return out[1]
    return out


def _record(
    recorder: AttentionRecorder, layer: int, attn: Any, module: nn.Module, *, rows: bool = False
) -> None:
    """Record one layer. Row sums are checked for custom attention modules in eval
    mode only (``rows``): known families compute their probabilities by softmax, and
    the methods check their results for NaN / Inf once."""
    recorder.record(layer, attn, check_rows=rows and not module.training)


# ------------------------------------------------------- thread-dispatched patches
#
# How captum_vit changes a model that other threads may be using at the same time.
#
# Every change (a forward hook, a pre-hook, a replaced ``forward``, a flag) lives in a
# *slot* keyed by (object, kind, channel). The first context that needs a slot
# installs the change on the object; later ones only push their value onto their own
# thread's stack in the slot; the last one to leave undoes the change exactly. The
# installed hook / forward / flag reads the innermost value pushed by the *calling*
# thread and does nothing (plain behaviour) for threads that pushed none. Bookkeeping
# runs under one re-entrant lock; the dispatch on the forward path takes no lock (it
# reads a dict entry only the calling thread writes). Slots exist only while some
# context holds them, so a model that no capture is using carries nothing of ours.
#
# A new method (e.g. an LRP rule set) uses the same helpers:
#
#     with contextlib.ExitStack() as stack:
#         stack.enter_context(_thread_forward(ln, my_layernorm_forward))
#         stack.enter_context(_thread_forward_hook(block, my_hook, channel="lrp"))
#         ...  # run the model on this thread
#
# Hooks on one module with different channels all run; within one channel only the
# innermost context of the calling thread runs. ``_thread_forward`` has a single
# channel per module: the innermost replacement of the calling thread is used.
#
# Dispatch is by the thread that runs the *forward* pass. Backward passes are not
# dispatched (on CUDA, autograd runs them on its own threads): to act on gradients,
# register tensor hooks (``tensor.register_hook``) from a dispatched forward hook or
# forward, or use ``torch.autograd.Function`` inside a dispatched forward; those belong
# to the calling thread's graph. Forwards run on other threads on the caller's behalf
# (``nn.DataParallel`` replicas) are not seen.

_LOCK = threading.RLock()
_SLOTS: dict[tuple[int, str, str], _Slot] = {}
_NOTHING: Any = object()


class _Slot:
    """One shared change on one object, with each thread's stack of values."""

    __slots__ = ("data", "owner", "refcount", "stacks", "undo")

    def __init__(self, owner: Any) -> None:
        self.owner = owner  # kept alive while installed; dropped with the slot
        self.refcount = 0
        self.stacks: dict[int, list[list[Any]]] = {}
        self.undo: Callable[[], None] = _do_nothing
        self.data: Any = None

    def current(self, default: Any = None) -> Any:
        """The innermost value pushed by the calling thread, else ``default``."""
        stack = self.stacks.get(threading.get_ident())
        return stack[-1][0] if stack else default


def _do_nothing() -> None:
    return None


def _slots_in_use() -> int:
    """How many shared changes are installed right now (0 when nothing is open)."""
    with _LOCK:
        return len(_SLOTS)


@contextlib.contextmanager
def _thread_slot(
    owner: Any, kind: str, channel: str, value: Any, install: Callable[[_Slot], Callable[[], None]]
) -> Iterator[_Slot]:
    """Push ``value`` for the calling thread on the slot (installing it if new)."""
    key = (id(owner), kind, channel)
    ident = threading.get_ident()
    box = [value]  # a fresh object per context: popped by identity
    with _LOCK:
        slot = _SLOTS.get(key)
        if slot is None:
            slot = _Slot(owner)
            slot.undo = install(slot)
            _SLOTS[key] = slot
        slot.refcount += 1
        slot.stacks.setdefault(ident, []).append(box)
    try:
        yield slot
    finally:
        with _LOCK:
            stack = slot.stacks[ident]
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is box:
                    del stack[i]
                    break
            if not stack:
                del slot.stacks[ident]
            slot.refcount -= 1
            if slot.refcount == 0:
                del _SLOTS[key]
                slot.owner = None
                slot.undo()


ForwardHook = Callable[[nn.Module, Any, Any], Any]
ForwardPreHook = Callable[[nn.Module, Any], Any]


def _thread_forward_hook(
    module: nn.Module, hook: ForwardHook, *, channel: str
) -> contextlib.AbstractContextManager[_Slot]:
    """A forward hook ``hook(module, args, output)`` that runs only for this thread.

    While the context is open, forward passes of ``module`` run by the calling thread
    call ``hook`` (a non-``None`` return value replaces the output, as in PyTorch);
    other threads are not affected. Nested contexts on one thread with the same
    ``channel`` replace each other (innermost wins).
    """

    def install(slot: _Slot) -> Callable[[], None]:
        def dispatch(m: nn.Module, args: Any, out: Any) -> Any:
            fn = slot.current() if m is slot.owner else None  # not on deep copies
            return None if fn is None else fn(m, args, out)

        return module.register_forward_hook(dispatch).remove

    return _thread_slot(module, "forward_hook", channel, hook, install)


def _thread_forward_pre_hook(
    module: nn.Module, hook: ForwardPreHook, *, channel: str
) -> contextlib.AbstractContextManager[_Slot]:
    """A forward pre-hook ``hook(module, args)`` that runs only for this thread.

    Same rules as :func:`_thread_forward_hook`; a non-``None`` return value replaces
    the positional arguments.
    """

    def install(slot: _Slot) -> Callable[[], None]:
        def dispatch(m: nn.Module, args: Any) -> Any:
            fn = slot.current() if m is slot.owner else None  # not on deep copies
            return None if fn is None else fn(m, args)

        return module.register_forward_pre_hook(dispatch).remove

    return _thread_slot(module, "forward_pre_hook", channel, hook, install)


def _thread_forward(
    module: nn.Module, forward: Callable[..., Any]
) -> contextlib.AbstractContextManager[_Slot]:
    """Replace ``module.forward`` with ``forward`` for the calling thread only.

    ``forward`` is called with the module's arguments (not with ``module``); other
    threads run the module's own forward. While installed, ``module.__dict__``
    holds a dispatching ``forward``; on the last exit the previous state (no
    instance ``forward``, or the one the user had set) is restored.
    """

    def install(slot: _Slot) -> Callable[[], None]:
        had_own = slot.data = "forward" in module.__dict__
        previous = module.__dict__.get("forward")
        cls_forward = type(module).forward

        def dispatch(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            fn = slot.current() if self is module_ref() else None
            if fn is not None:
                return fn(*args, **kwargs)
            if had_own and self is module_ref():
                return previous(*args, **kwargs)  # type: ignore[misc]
            return cls_forward(self, *args, **kwargs)

        module_ref = weakref.ref(module)
        # a bound method: a deep copy of the model taken meanwhile rebinds it to the copy,
        # whose forward then runs its own class forward
        module.forward = types.MethodType(dispatch, module)  # type: ignore[method-assign]

        def undo() -> None:
            if had_own:
                module.forward = previous  # type: ignore[method-assign,assignment]
            else:
                del module.forward

        return undo

    return _thread_slot(module, "forward", "", forward, install)


class _ThreadFlag:
    """A stand-in for a bool attribute whose truth value depends on the thread.

    ``bool(flag)`` is the innermost value set by the calling thread through
    :func:`_thread_flag`, or the attribute's original value for other threads.
    """

    __slots__ = ("_original", "_slot")

    def __init__(self, slot: _Slot, original: bool) -> None:
        self._slot = slot
        self._original = original

    def __bool__(self) -> bool:
        return bool(self._slot.current(self._original))

    def __reduce__(self) -> tuple[type, tuple[bool]]:
        # copies and pickles of a model taken while a capture is open get the plain flag
        return (bool, (self._original,))

    def __repr__(self) -> str:
        return f"_ThreadFlag(original={self._original}, this_thread={bool(self)})"


def _thread_flag(module: nn.Module, name: str, value: bool) -> contextlib.AbstractContextManager[_Slot]:
    """Make ``bool(module.<name>)`` equal ``value`` for the calling thread only.

    For boolean switches a module tests by truth value (timm's ``fused_attn``).
    The original attribute (instance or class level) is restored exactly on the
    last exit.
    """

    def install(slot: _Slot) -> Callable[[], None]:
        had_own = name in module.__dict__
        previous = module.__dict__.get(name)
        object.__setattr__(module, name, _ThreadFlag(slot, bool(getattr(module, name))))

        def undo() -> None:
            if had_own:
                object.__setattr__(module, name, previous)
            else:
                object.__delattr__(module, name)

        return undo

    return _thread_slot(module, "flag", name, value, install)


def _hf_configs(attention_modules: Sequence[nn.Module]) -> list[Any]:
    """The distinct configs read by Hugging Face attention modules."""
    configs: dict[int, Any] = {}
    for m in attention_modules:
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            configs.setdefault(id(cfg), cfg)
    return list(configs.values())


#: The key under which captum_vit registers its dispatching attention function with
#: Hugging Face's ``AttentionInterface``.
_HF_DISPATCH = "captum_vit_thread_dispatch"
_HF_REGISTERED = False


def _plain_value(value: Any) -> Any:
    return value


class _DispatchName(str):
    """The attention implementation name set while captures are open (``_HF_DISPATCH``).

    Remembers the implementation it replaced; copies and pickles of the config (a
    model copied while a capture is open) get that original name back.
    """

    original: Any

    def __new__(cls, original: Any) -> _DispatchName:
        obj = super().__new__(cls, _HF_DISPATCH)
        obj.original = original
        return obj

    def __reduce__(self) -> tuple[Any, tuple[Any]]:  # type: ignore[override]
        return (_plain_value, (self.original,))


def _hf_dispatch_attention(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Eager attention for capturing threads, the model's own kernel for others."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cfg = getattr(module, "config", None)
    slot = _SLOTS.get((id(cfg), "hf_attn", ""))
    if slot is not None:
        original = slot.data
        eager_here = bool(slot.current(False))
    else:  # the slot was removed between the module's lookup and this call, or a copy
        name = getattr(cfg, "_attn_implementation_internal", "eager")
        original = getattr(name, "original", name)
        eager_here = False
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if eager_here or original in (None, "eager", _HF_DISPATCH):
        return eager(module, *args, **kwargs)
    return ALL_ATTENTION_FUNCTIONS.get_interface(original, eager)(module, *args, **kwargs)


def _hf_thread_eager(config: Any, *, per_thread: bool = True) -> contextlib.AbstractContextManager[_Slot]:
    """Run Hugging Face attention eagerly (probabilities returned) for this thread only.

    With ``per_thread=False`` (modules whose code has no ``eager_attention_forward``
    to dispatch to) the config is switched to ``"eager"`` for every thread while any
    capture is open, and restored on the last exit.
    """

    def install(slot: _Slot) -> Callable[[], None]:
        global _HF_REGISTERED
        from transformers.modeling_utils import AttentionInterface

        original = config._attn_implementation_internal
        slot.data = original
        if per_thread and not _HF_REGISTERED:
            AttentionInterface.register(_HF_DISPATCH, _hf_dispatch_attention)
            _HF_REGISTERED = True
        config._attn_implementation_internal = _DispatchName(original) if per_thread else "eager"

        def undo() -> None:
            config._attn_implementation_internal = original

        return undo

    return _thread_slot(config, "hf_attn", "", True, install)


def _hf_has_eager(attention_modules: Sequence[nn.Module]) -> bool:
    return all(
        callable(getattr(sys.modules.get(type(m).__module__), "eager_attention_forward", None))
        for m in attention_modules
    )


def _check_packed_mha(mha: nn.MultiheadAttention) -> None:
    """Refuse an ``nn.MultiheadAttention`` whose forward captum_vit cannot write out."""
    if mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
        raise UnsupportedModelError(
            "captum_vit captures nn.MultiheadAttention with a packed in-projection "
            "(kdim == vdim == embed_dim), no bias_k/bias_v and add_zero_attn=False only; "
            "pass attention_modules= pointing at modules that output the probabilities"
        )


def _check_self_attention_call(
    layer: int,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
) -> None:
    """Refuse an ``nn.MultiheadAttention`` call that is not unmasked self-attention."""
    if key_padding_mask is not None or attn_mask is not None or is_causal:
        raise UnsupportedModelError(
            f"nn.MultiheadAttention of layer {layer} is called with an attention mask; "
            "captum_vit captures unmasked self-attention only"
        )
    if not (_same_tensor(key, query) and _same_tensor(value, query)):
        raise UnsupportedModelError(
            f"nn.MultiheadAttention of layer {layer} is called as cross-attention (its "
            "key or value is not its query): attention rollout and the other "
            "attention-based methods need self-attention over the image tokens, so "
            "captum_vit refuses to explain it"
        )


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b)))


def _mha_in_projection(mha: nn.MultiheadAttention, query: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``(B, heads, N, head_dim)`` of a packed ``nn.MultiheadAttention``'s
    self-attention call on ``query`` (its layout per ``batch_first``)."""
    x = query if mha.batch_first else query.transpose(0, 1)
    b, n, d = x.shape
    h = mha.num_heads
    in_w = mha.in_proj_weight
    assert isinstance(in_w, Tensor)
    q, k, v = F.linear(x, in_w, mha.in_proj_bias).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    return q, k, v


def _mha_out_projection(mha: nn.MultiheadAttention, heads_out: Tensor) -> Tensor:
    """The output projection of per-head outputs ``(B, heads, N, head_dim)``, in the
    module's layout (``batch_first`` or not)."""
    b, h, n, dh = heads_out.shape
    out = mha.out_proj(heads_out.transpose(1, 2).reshape(b, n, h * dh))
    return out if mha.batch_first else out.transpose(0, 1)


def _torchvision_mha_patch(
    mha: nn.Module, fn: Callable[[Tensor], None], layer: int = 0
) -> contextlib.AbstractContextManager[_Slot]:
    """Run an ``nn.MultiheadAttention`` through an explicit implementation (this thread).

    ``nn.MultiheadAttention`` returns a *view* of its probabilities that is not on the
    autograd path of its output, so gradients w.r.t. it cannot be taken. For the
    capturing thread the instance's ``forward`` is replaced by the same computation
    written out (in-projection of the real query, key and value, softmax, dropout,
    out-projection), whose probability tensor is the one the output depends on.
    Cross-attention (key or value not equal to the query) is refused: the methods
    need self-attention over the image tokens.
    """
    assert isinstance(mha, nn.MultiheadAttention)
    _check_packed_mha(mha)

    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        _check_self_attention_call(layer, query, key, value, key_padding_mask, attn_mask, is_causal)
        q, k, v = _mha_in_projection(mha, query)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = F.dropout(attn, p=mha.dropout, training=mha.training)
        fn(attn)
        out = _mha_out_projection(mha, attn @ v)
        weights = (attn.mean(1) if average_attn_weights else attn) if need_weights else None
        return out, weights

    return _thread_forward(mha, forward)

# ----------------------------------------------------- streamed attention gradients
#
# GradientRollout needs, per layer, the attention probabilities A and G = dy/dA. The
# stream delivers them one layer at a time *during the backward pass*, so that no
# more than one layer's (heads x N x N) maps live at once, and lets the model keep
# its fused attention: where a layer calls ``F.scaled_dot_product_attention`` the call
# runs as is and only its q, k, v (which SDPA saves for its own backward anyway) are
# kept; in the backward, A is recomputed from q and k and G = dO · Vᵀ from the
# gradient dO of the attention output. Layers that materialise A themselves (timm with
# ``fused_attn`` off, custom attention modules, training-mode dropout) deliver that A
# and its gradient. Each layer's tensor passes through :class:`_Tap`, an identity
# whose backward hands the gradient over; all taps share one scalar *anchor* leaf, and
# the backward is ``torch.autograd.grad(score, anchor)``: it runs exactly the part of
# the graph between the score and the lowest tapped layer.


class LayerGrad:
    """One layer's attention probabilities and their gradient, in the backward pass.

    Attributes:
        layer (int): the layer index (depth order).
        shape (tuple[int, int, int, int]): ``(B, heads, N, N)``.
    """

    layer: int
    shape: tuple[int, int, int, int]

    def chunks(self, max_elements: int = 1 << 22) -> Iterator[tuple[Tensor, Tensor]]:
        """``(A, G)`` for consecutive groups of heads, float32 ``(B, h, N, N)`` each.

        ``h`` is the largest head count with ``B·h·N·N <= max_elements`` (at least
        one head). The tensors may alias the model's own: do not modify them.
        """
        raise NotImplementedError

    def _heads_per_chunk(self, max_elements: int) -> int:
        b, h, n, m = self.shape
        return max(1, min(h, max_elements // max(1, b * n * m)))


class _FusedLayerGrad(LayerGrad):
    """A layer run through SDPA, in the backward pass of :class:`_FusedAttention`.

    Its chunks are produced by the attention's own backward: each group of heads'
    probabilities ``P = softmax(q kᵀ · scale + mask)`` and ``G = dO · Vᵀ`` are
    computed once, handed out, then used for the gradients of q, k and v (unless
    ``need_input_grads`` is False: nothing below this layer is needed).
    """

    def __init__(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, out: Tensor, scale: float,
        mask: Tensor | None, d_out: Tensor, need_input_grads: bool,
    ) -> None:
        self.layer = layer
        self._q, self._k, self._v, self._out, self._scale, self._mask = q, k, v, out, scale, mask
        self._d_out = d_out
        b, h, n, _ = q.shape
        self.shape = (b, h, n, int(k.shape[-2]))
        self._need = need_input_grads
        self.grads: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None)
        self._gen: Iterator[tuple[Tensor, Tensor]] | None = None
        self._max = 1 << 22

    def chunks(self, max_elements: int = 1 << 22) -> Iterator[tuple[Tensor, Tensor]]:
        if self._gen is not None:
            raise RuntimeError("LayerGrad.chunks() of a fused layer can be iterated once")
        self._max = max_elements
        self._gen = self._run()
        return self._gen

    def _finish(self) -> None:
        """Run the remaining chunks (the gradients need them all)."""
        if self._gen is None:
            self._gen = self._run()
        for _ in self._gen:
            pass

    def _run(self) -> Iterator[tuple[Tensor, Tensor]]:
        q, k, v, scale = self._q, self._k, self._v, self._scale
        heads = self.shape[1]
        step = self._heads_per_chunk(self._max)
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        for h0 in range(0, heads, step):
            sl = slice(h0, h0 + step)
            qc, kc, vc = q[:, sl].float(), k[:, sl].float(), v[:, sl].float()
            doc = self._d_out[:, sl].float()
            probs = _probabilities(qc, kc, scale, _mask_heads(self._mask, sl, heads))
            dp = torch.matmul(doc, vc.transpose(-2, -1))
            yield probs, dp
            if not self._need:
                continue
            # softmax backward: dS = P ⊙ (dP - rowsum(dO ⊙ O)); the scale goes on dq, dk
            delta = (doc * self._out[:, sl].float()).sum(dim=-1, keepdim=True)
            dv = torch.matmul(probs.transpose(-2, -1), doc)
            ds = dp.sub_(delta).mul_(probs)
            del probs
            parts.append((torch.matmul(ds, kc).mul_(scale),
                          torch.matmul(ds.transpose(-2, -1), qc).mul_(scale), dv))
            del ds
        if parts:
            if len(parts) == 1:
                self.grads = parts[0]
            else:
                self.grads = tuple(torch.cat(p, dim=1) for p in zip(*parts, strict=True))  # type: ignore[assignment]


class _FusedAttention(torch.autograd.Function):
    """``F.scaled_dot_product_attention`` in the forward (the model's fused kernel);
    in the backward, the layer is delivered to the stream and the gradients of q, k
    and v come from the same probabilities (see :class:`_FusedLayerGrad`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, anchor: Tensor, run: Callable[[], Tensor],
        finish: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], _FusedLayerGrad],
    ) -> Tensor:
        out = run()
        ctx.save_for_backward(q, k, v, out)
        ctx.finish = finish
        return out

    @staticmethod
    def backward(ctx: Any, d_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out = ctx.saved_tensors
        finish, ctx.finish = ctx.finish, None
        grad = finish(q, k, v, out, d_out)
        dq, dk, dv = grad.grads
        return (
            None if dq is None else dq.to(q.dtype),
            None if dk is None else dk.to(k.dtype),
            None if dv is None else dv.to(v.dtype),
            None, None, None,
        )


class _EagerLayerGrad(LayerGrad):
    """A layer whose probabilities the model materialised: A and its gradient."""

    def __init__(self, layer: int, attn: Tensor, grad: Tensor) -> None:
        self.layer, self.attn, self.grad = layer, attn, grad
        self.shape = tuple(int(s) for s in attn.shape)  # type: ignore[assignment]

    def chunks(self, max_elements: int = 1 << 22) -> Iterator[tuple[Tensor, Tensor]]:
        step = self._heads_per_chunk(max_elements)
        for h0 in range(0, self.shape[1], step):
            sl = slice(h0, h0 + step)
            yield self.attn[:, sl].float(), self.grad[:, sl].float()


def _mask_heads(mask: Tensor | None, sl: slice, heads: int) -> Tensor | None:
    if mask is not None and mask.ndim == 4 and mask.shape[1] == heads and heads > 1:
        return mask[:, sl]
    return mask


def _probabilities(q: Tensor, k: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """``softmax((q · scale) kᵀ + mask)`` as SDPA computes it (bool masks: False = -inf)."""
    logits = torch.matmul(q * scale, k.transpose(-2, -1))
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.to(logits.dtype)
    return logits.softmax(dim=-1)


class _Tap(torch.autograd.Function):
    """Identity in the forward; hands its gradient to ``deliver`` in the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, anchor: Tensor, deliver: Callable[[Tensor], None]) -> Tensor:
        ctx.deliver = deliver
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        deliver, ctx.deliver = ctx.deliver, None
        if deliver is not None:
            deliver(grad)
        return grad, None, None


class AttentionGradStream:
    """Collects what :meth:`ViTAdapter.stream_attention_grads` needs from the forward
    pass and runs the backward pass that delivers each layer's :class:`LayerGrad`.

    Attributes:
        num_tokens (int | None): ``N`` of the recorded layers (after the forward).
        seen (set[int]): layers whose attention ran in the forward pass.
        delivered (set[int]): layers handed to ``on_layer`` by :meth:`backward`.
    """

    def __init__(
        self, num_layers: int, on_layer: Callable[[LayerGrad], None], first_layer: int,
        validate: bool,
    ) -> None:
        self.num_layers = num_layers
        self.num_tokens: int | None = None
        self.seen: set[int] = set()
        self.delivered: set[int] = set()
        self._on_layer = on_layer
        self._first = first_layer
        self._validate = validate
        self._anchor: Tensor | None = None
        self._watched: list[Tensor] = []

    def _note(self, layer: int, n: int) -> bool:
        """Record that ``layer`` ran with ``n`` tokens; whether it is streamed."""
        self.num_tokens = n
        self.seen.add(layer)
        return layer >= self._first

    def _deliver(self, grad: LayerGrad) -> None:
        self.delivered.add(grad.layer)
        self._on_layer(grad)

    def _tap(self, tensor: Tensor, make: Callable[[Tensor], LayerGrad]) -> Tensor:
        if not tensor.requires_grad:
            return tensor
        if self._anchor is None:
            self._anchor = torch.zeros((), requires_grad=True)
        box = [make]

        def deliver(grad: Tensor) -> None:
            self._deliver(box.pop()(grad))

        out: Tensor = _Tap.apply(tensor, self._anchor, deliver)
        return out

    def sdpa(self, layer: int, func: Callable[..., Tensor], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Tensor:
        """Run one ``scaled_dot_product_attention`` call of ``layer`` (from its wrapper)."""
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, args, strict=False))
        bound.update(kwargs)
        q, k, v = bound["query"], bound["key"], bound["value"]
        mask: Tensor | None = bound.get("attn_mask")
        p = float(bound.get("dropout_p", 0.0) or 0.0)
        causal = bool(bound.get("is_causal", False))
        gqa = bool(bound.get("enable_gqa", False))
        if q.ndim != 4 or k.shape[-2] != q.shape[-2]:
            raise UnsupportedModelError(
                f"attention of layer {layer} is not self-attention over one token sequence "
                f"(query {tuple(q.shape)}, key {tuple(k.shape)}); captum_vit explains "
                "global self-attention only"
            )
        scale = bound.get("scale")
        scale = float(q.shape[-1] ** -0.5) if scale is None else float(scale)
        streamed = self._note(layer, int(q.shape[-2]))
        if not streamed:
            return func(*args, **kwargs)
        if gqa and k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        if causal:
            n = q.shape[-2]
            keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            mask = keep if mask is None else (mask & keep if mask.dtype == torch.bool
                                              else mask.masked_fill(~keep, float("-inf")))
        if p == 0.0:
            if not (q.requires_grad or k.requires_grad or v.requires_grad):
                return func(*args, **kwargs)
            if self._anchor is None:
                self._anchor = torch.zeros((), requires_grad=True)
            need = layer > self._first  # nothing below the lowest streamed layer is needed

            def finish(q: Tensor, k: Tensor, v: Tensor, out: Tensor, d_out: Tensor) -> _FusedLayerGrad:
                grad = _FusedLayerGrad(layer, q, k, v, out, scale, mask, d_out, need)
                self._deliver(grad)
                grad._finish()
                return grad

            result: Tensor = _FusedAttention.apply(
                q, k, v, self._anchor, lambda: func(*args, **kwargs), finish
            )
            return result
        # dropout on the probabilities: materialise them, as the unfused kernel does
        attn = F.dropout(_probabilities(q, k, scale, mask).to(q.dtype), p=p, training=True)
        tapped = self._tap(attn, lambda g: _EagerLayerGrad(layer, attn, g))
        return torch.matmul(tapped, v)

    def attention(self, layer: int, attn: Any, *, check_rows: bool) -> Tensor:
        """A materialised probability tensor of ``layer`` (used downstream as returned)."""
        if self._validate:
            _validate_attention(layer, attn, check_rows=check_rows)
        if not self._note(layer, int(attn.shape[-1])):
            return attn
        return self._tap(attn, lambda g: _EagerLayerGrad(layer, attn, g))

    def watch(self, layer: int, attn: Any, *, check_rows: bool) -> None:
        """A probability tensor that cannot be replaced downstream (a module's second
        output): its gradient is taken directly (kept until the backward ends)."""
        if self._validate:
            _validate_attention(layer, attn, check_rows=check_rows)
        if not self._note(layer, int(attn.shape[-1])) or not attn.requires_grad:
            return
        attn.register_hook(lambda g: self._deliver(_EagerLayerGrad(layer, attn.detach(), g)))
        self._watched.append(attn)

    def backward(self, score: Tensor) -> None:
        """Back-propagate ``score`` (a scalar) far enough to deliver every streamed layer."""
        inputs = ([self._anchor] if self._anchor is not None else []) + self._watched
        if inputs and score.requires_grad:
            torch.autograd.grad(score, inputs, allow_unused=True)
        self._watched = []
        self._anchor = None


class _SdpaTap(torch.overrides.TorchFunctionMode):
    """Routes this thread's ``F.scaled_dot_product_attention`` calls to the stream."""

    def __init__(self, stream: AttentionGradStream, layer: int) -> None:
        super().__init__()
        self.stream, self.layer = stream, layer

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func is F.scaled_dot_product_attention:
            return self.stream.sdpa(self.layer, func, args, kwargs or {})
        return func(*args, **(kwargs or {}))


def _sdpa_wrapped(module: nn.Module, stream: AttentionGradStream, layer: int) -> Callable[..., Any]:
    """``module``'s class forward, with its SDPA calls routed to ``stream``."""
    cls_forward = type(module).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with _SdpaTap(stream, layer):
            return cls_forward(module, *args, **kwargs)

    return forward


def _torchvision_sdpa_forward(
    mha: nn.Module, stream: AttentionGradStream, layer: int
) -> Callable[..., Any]:
    """An ``nn.MultiheadAttention`` forward through SDPA, its call routed to ``stream``."""
    assert isinstance(mha, nn.MultiheadAttention)
    _check_packed_mha(mha)

    def forward(
        query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
        need_weights: bool = True, attn_mask: Tensor | None = None,
        average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        _check_self_attention_call(layer, query, key, value, key_padding_mask, attn_mask, is_causal)
        q, k, v = _mha_in_projection(mha, query)
        p = mha.dropout if mha.training else 0.0
        out = _mha_out_projection(
            mha, stream.sdpa(layer, F.scaled_dot_product_attention, (q, k, v), {"dropout_p": p})
        )
        if need_weights:
            weights = _probabilities(q, k, float(q.shape[-1] ** -0.5), None)
            return out, (weights.mean(1) if average_attn_weights else weights)
        return out, None

    return forward


# ---------------------------------------------------------------------- heads
@dataclass
class PoolingPath:
    """Where a model's final token states are read and how its head scores them.

    Attributes:
        module (nn.Module): module whose output holds the final token states
            (after the final norm: the tensor the head reads).
        read (Callable): output of ``module`` -> states ``(B, N, D)``.
        head (Callable): one pooled state ``(B, D)`` -> scores.
        cls_head (Callable): states ``(B, N, D)`` -> scores through the model's own
            prefix pooling (CLS, or CLS and distillation token).
        description (str): the head in words.
    """

    module: nn.Module
    read: Callable[[Any], Tensor]
    head: Callable[[Tensor], Tensor]
    cls_head: Callable[[Tensor], Tensor]
    description: str


def _identity_read(out: Any) -> Tensor:
    return out


def _last_hidden(out: Any) -> Tensor:
    value = getattr(out, "last_hidden_state", None)
    if not isinstance(value, Tensor):
        value = out[0]
    return value


def _pooling_path(model: Any, family: str) -> PoolingPath:
    """The final token states and classifier head of a known family (for
    :func:`captum_vit.compare_pooling`); raises ``ValueError`` where there is none."""
    name = type(model).__name__
    if family == "timm":
        if getattr(model, "attn_pool", None) is not None:
            raise ValueError(
                f"{name} pools with attention (global_pool='map'): it has no CLS state to compare"
            )
        fc_norm, head_drop, head = model.fc_norm, model.head_drop, model.head

        def timm_head(state: Tensor) -> Tensor:
            return head(head_drop(fc_norm(state)))

        if name == "VisionTransformerDistilled":
            head_dist = model.head_dist

            def dist_head(state: Tensor) -> Tensor:
                return (head(head_drop(state)) + head_dist(head_drop(state))) / 2

            def dist_cls(seq: Tensor) -> Tensor:
                return (head(head_drop(seq[:, 0])) + head_dist(head_drop(seq[:, 1]))) / 2

            return PoolingPath(model.norm, _identity_read, dist_head, dist_cls,
                                "timm distilled: (head(CLS) + head_dist(DIST)) / 2")
        return PoolingPath(model.norm, _identity_read, timm_head,
                            lambda seq: timm_head(seq[:, 0]), "timm: head(fc_norm(state))")
    if family == "torchvision":
        heads = model.heads
        return PoolingPath(model.encoder, _identity_read, heads, lambda seq: heads(seq[:, 0]),
                            "torchvision: heads(state)")
    if family == "hf":
        if name == "CLIPVisionModel":
            post = model.post_layernorm
            return PoolingPath(model, _last_hidden, post, lambda seq: post(seq[:, 0]),
                                "CLIP vision: post_layernorm(state) (the pooler output)")
        backbone_name = "vision_model" if name == "CLIPForImageClassification" else model.base_model_prefix
        backbone = getattr(model, backbone_name, None)
        if backbone is None:
            raise ValueError(f"cannot find the backbone of {name} ({backbone_name!r})")
        if name == "DeiTForImageClassificationWithTeacher":
            c, d = model.cls_classifier, model.distillation_classifier

            def deit_head(state: Tensor) -> Tensor:
                return (c(state) + d(state)) / 2

            return PoolingPath(backbone, _last_hidden, deit_head,
                                lambda seq: (c(seq[:, 0]) + d(seq[:, 1])) / 2,
                                "HF DeiT with teacher: (cls_classifier(CLS) + distillation_classifier(DIST)) / 2")
        classifier = getattr(model, "classifier", None)
        if not isinstance(classifier, nn.Module):
            raise ValueError(f"{name} has no classifier head to compare poolings with")
        if name.startswith("Dinov2") and name.endswith("ForImageClassification"):

            def concat_head(state: Tensor) -> Tensor:
                return classifier(torch.cat([state, state], dim=-1))

            return PoolingPath(backbone, _last_hidden, concat_head,
                                lambda seq: concat_head(seq[:, 0]),
                                "HF Dinov2: classifier([state, state]) (the model itself uses [CLS, mean])")
        return PoolingPath(backbone, _last_hidden, classifier,
                            lambda seq: classifier(seq[:, 0]), "HF: classifier(state)")
    raise ValueError(
        f"compare_pooling knows the heads of timm, Hugging Face and torchvision ViTs; "
        f"{name} is a custom model ({family})"
    )



def _family_fields(model: nn.Module, family: str) -> dict[str, Any]:
    """The family-derived :class:`ViTAdapter` fields: head path and rotary embedding."""
    fields: dict[str, Any] = {"rotary": _has_rotary(model)}
    try:
        fields.update(pooling_path=_pooling_path(model, family), pooling_path_error=None)
    except ValueError as err:
        fields.update(pooling_path=None, pooling_path_error=str(err))
    return fields


def _has_rotary(model: nn.Module) -> str | None:
    """The class name of a rotary position-embedding module of ``model``, if any."""
    for m in model.modules():
        name = type(m).__name__.lower()
        if "rope" in name or "rotary" in name:
            return type(m).__name__
    return None


# ---------------------------------------------------------------------- detection
def _unsupported_generic(model: nn.Module) -> UnsupportedModelError:
    name = type(model).__name__
    names = " ".join(type(m).__name__.lower() for m in model.modules())
    if "swin" in name.lower() or "windowattention" in names or "swin" in names:
        reason = (
            f"{name} uses windowed (local) self-attention, not global attention over all "
            "patch tokens, so attention rollout and the other attention-based methods "
            "are undefined for it"
        )
    elif "attention" not in names and "attn" not in names:
        reason = f"{name} has no self-attention modules (is it a CNN?)"
    else:
        reason = f"{name} is not a model captum_vit recognises"
    return UnsupportedModelError(
        f"cannot adapt {name}: {reason}. Supported automatically: timm VisionTransformer "
        "(incl. DeiT distilled, register models) and Eva, Hugging Face ViT / DeiT / Dinov2 / "
        "Dinov2WithRegisters / CLIP vision, torchvision VisionTransformer. For your own ViT "
        "pass attention_modules=[one module per layer whose output is the (B, heads, N, N) "
        "attention probabilities], num_prefix_tokens= and patch_size=."
    )


def _find_blocks(model: nn.Module, attns: Sequence[nn.Module]) -> list[nn.Module] | None:
    """The block holding each attention module: its ancestor that sits in a ModuleList."""
    parent: dict[int, nn.Module] = {}
    for mod in model.modules():
        for child in mod.children():
            parent.setdefault(id(child), mod)
    blocks: list[nn.Module] = []
    for attn in attns:
        node: nn.Module = attn
        while id(node) in parent and not isinstance(parent[id(node)], nn.ModuleList):
            node = parent[id(node)]
        if id(node) not in parent:
            return None
        blocks.append(node)
    return blocks


def _find_out_projections(attns: Sequence[nn.Module]) -> list[nn.Module] | None:
    """Each attention's output projection (``proj``, ``o_proj``, ``out_proj``, ``output.dense``)."""
    projs: list[nn.Module] = []
    for attn in attns:
        found = None
        for name in ("proj", "o_proj", "out_proj", "output.dense"):
            try:
                found = attn.get_submodule(name)
            except AttributeError:
                continue
            break
        if not isinstance(found, nn.Linear):
            return None
        projs.append(found)
    return projs


def _adapt_timm(model: nn.Module) -> ViTAdapter | None:
    try:
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if not isinstance(model, (VisionTransformer, Eva)):
        return None
    blocks = list(model.blocks)  # type: ignore[arg-type]
    attns = [getattr(b, "attn", None) for b in blocks]
    if not attns or any(a is None or not hasattr(a, "attn_drop") for a in attns):
        raise UnsupportedModelError(
            f"{type(model).__name__}: its blocks have no standard timm attention (attn.attn_drop);"
            " pass attention_modules= explicitly"
        )
    pe = model.patch_embed
    prefix = int(model.num_prefix_tokens)
    global_pool = str(getattr(model, "global_pool", "token"))
    pooling: Pooling
    distilled = type(model).__name__ == "VisionTransformerDistilled"
    if getattr(model, "attn_pool", None) is not None or global_pool in ("avg", "avgmax", "max", "map"):
        pooling = "mean_patch"
    elif distilled:
        pooling = "cls_dist"
    else:
        pooling = "cls" if prefix > 0 else "mean_patch"
    strict = bool(getattr(pe, "strict_img_size", True)) and pe.img_size is not None
    img_size = _pair(pe.img_size) if strict else None
    return ViTAdapter(
        model=model,
        attention_modules=attns,  # type: ignore[arg-type]
        patch_size=_pair(pe.patch_size),
        num_prefix_tokens=prefix,
        pooling=pooling,
        family="timm",
        **_family_fields(model, "timm"),
        img_size=img_size,
        patch_embed=pe,
        token_module=getattr(model, "pos_drop", None),
        blocks=blocks,
        out_projections=_find_out_projections(attns),  # type: ignore[arg-type]
        _capture_kind="timm",
        _dynamic_pad=bool(getattr(pe, "dynamic_img_pad", False)),
    )


_HF_SUPPORTED = ("ViT", "DeiT", "Dinov2", "Dinov2WithRegisters", "CLIPVision", "CLIP")


def _adapt_hf(model: nn.Module) -> ViTAdapter | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    name = type(model).__name__
    model_type = str(getattr(model.config, "model_type", ""))
    if model_type not in ("vit", "deit", "dinov2", "dinov2_with_registers", "clip", "clip_vision_model"):
        return None
    recordable = getattr(type(model), "_can_record_outputs", None) or {}
    attn_cls = recordable.get("attentions")
    if not isinstance(attn_cls, type):
        return None
    # CLIP's full model holds a text tower too: keep the vision tower's layers only.
    root: nn.Module = model
    if model_type == "clip":
        vision = getattr(model, "vision_model", None)
        if vision is None:
            return None
        root = vision
    attns = [m for m in root.modules() if isinstance(m, attn_cls)]
    if not attns:
        return None
    cfg = model.config
    vcfg = getattr(cfg, "vision_config", cfg) if model_type == "clip" else cfg
    patch = _pair(vcfg.patch_size)
    embeddings = next(
        (m for m in root.modules() if type(m).__name__.endswith("Embeddings") and hasattr(m, "position_embedding" if "clip" in model_type else "position_embeddings")),
        None,
    )
    patch_embed = None
    if embeddings is not None:
        patch_embed = getattr(embeddings, "patch_embeddings", None) or getattr(
            embeddings, "patch_embedding", None
        )
    pooling: Pooling = "cls"
    if name == "DeiTForImageClassificationWithTeacher":
        pooling = "cls_dist"
    elif name.startswith("Dinov2") and name.endswith("ForImageClassification"):
        pooling = "cls_mean_patch"
    elif name == "CLIPForImageClassification":
        pooling = "mean_patch"
    fixed = None if model_type.startswith("dinov2") else _pair(vcfg.image_size)
    return ViTAdapter(
        model=model,
        attention_modules=attns,
        patch_size=patch,
        num_prefix_tokens=None,
        pooling=pooling,
        family="hf",
        **_family_fields(model, "hf"),
        img_size=fixed,
        patch_embed=patch_embed,
        token_module=embeddings,
        blocks=_find_blocks(root, attns),
        out_projections=_find_out_projections(attns),
        _capture_kind="hf",
    )


def _adapt_torchvision(model: nn.Module) -> ViTAdapter | None:
    try:
        from torchvision.models.vision_transformer import VisionTransformer as TVViT
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(model, TVViT):
        return None
    layers = list(model.encoder.layers)  # type: ignore[arg-type]
    attns = [layer.self_attention for layer in layers]
    return ViTAdapter(
        model=model,
        attention_modules=attns,  # type: ignore[arg-type]
        patch_size=_pair(model.patch_size),
        num_prefix_tokens=1,
        pooling="cls",
        family="torchvision",
        **_family_fields(model, "torchvision"),
        img_size=_pair(model.image_size),
        patch_embed=model.conv_proj,
        token_module=model.encoder.dropout,
        blocks=layers,  # type: ignore[arg-type]
        out_projections=[a.out_proj for a in attns],  # type: ignore[misc]
        _capture_kind="torchvision",
    )


def adapt(
    model: nn.Module,
    *,
    attention_modules: Sequence[nn.Module] | None = None,
    num_prefix_tokens: int | None = None,
    patch_size: int | Sequence[int] | None = None,
    pooling: Pooling | None = None,
    patch_embed: nn.Module | None = None,
    token_module: nn.Module | None = None,
    blocks: Sequence[nn.Module] | None = None,
    out_projections: Sequence[nn.Module] | None = None,
    rotary: str | None = None,
    pooling_path: PoolingPath | None = None,
) -> ViTAdapter:
    """Describe a Vision Transformer so that captum_vit can capture its attention.

    timm ``VisionTransformer`` (and relatives: DeiT distilled with 2 prefix tokens,
    register models with ``1 + registers``, ``Eva``), Hugging Face ViT / DeiT /
    Dinov2 / Dinov2WithRegisters / CLIP vision models and torchvision
    ``VisionTransformer`` are recognised automatically. For any other model pass
    ``attention_modules``.

    Args:
        model (nn.Module): the model; it is used as is, never copied or modified
            outside a capture.
        attention_modules (Sequence[nn.Module], optional): one module per layer, in
            depth order, whose forward output is the attention-probability tensor
            ``(B, heads, N, N)`` (rows summing to 1), or a tuple whose second item is
            that tensor. Required for models that are not recognised. Default: None
        num_prefix_tokens (int, optional): tokens before the patch tokens. For a
            custom model, ``None`` means "sequence length minus number of patches".
            Overrides the detected value for known families. Default: None
        patch_size (int or (int, int), optional): patch size in pixels; required
            with ``attention_modules``. Default: None
        pooling (str, optional): which token rows the head reads: ``"cls"``,
            ``"cls_dist"``, ``"mean_patch"`` or ``"cls_mean_patch"``. Detected for
            known families; ``"cls"`` for custom models. Default: None
        patch_embed (nn.Module, optional): module whose output is the patch
            embeddings before position embeddings (for token masking). Default: None
        token_module (nn.Module, optional): module whose output is the full token
            sequence ``(B, N, D)`` entering the first block. Default: None
        blocks (Sequence[nn.Module], optional): the transformer blocks, one per
            layer, whose output is the token sequence ``(B, N, D)`` (for
            :class:`~captum_vit.ViTGradCam`). Detected for known families.
            Default: None
        out_projections (Sequence[nn.Module], optional): per layer, the attention's
            output projection (``nn.Linear`` taking the heads' outputs concatenated
            head by head), for head ablation. Detected for known families.
            Default: None
        rotary (str, optional): the name of the model's rotary position embedding
            (tokens then cannot be dropped), ``""`` for none. Default: None
            (detected from the module class names)
        pooling_path (PoolingPath, optional): the final token states and classifier
            head, for :func:`captum_vit.compare_pooling`. Detected for known
            families. Default: None

    Returns:
        ViTAdapter: the description used by every attribution class.

    Raises:
        UnsupportedModelError: for CNNs, windowed-attention models (Swin) and other
            models without detectable global self-attention, naming what to pass.

    Example::

        >>> import timm, captum_vit
        >>> model = timm.create_model("deit_tiny_patch16_224").eval()
        >>> adapter = captum_vit.adapt(model)
        >>> adapter.num_prefix_tokens, adapter.patch_size
        (1, (16, 16))
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if pooling is not None and pooling not in _POOLINGS:
        raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
    if num_prefix_tokens is not None and num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")

    if attention_modules is not None:
        modules = list(attention_modules)
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError("attention_modules must be a non-empty sequence of nn.Module")
        if patch_size is None:
            raise UnsupportedModelError(
                "a custom model needs patch_size= (the patch size in pixels) together with "
                "attention_modules="
            )
        kind = "torchvision" if all(isinstance(m, nn.MultiheadAttention) for m in modules) else "module_output"
        return ViTAdapter(
            model=model,
            attention_modules=modules,
            patch_size=_pair(patch_size),
            num_prefix_tokens=num_prefix_tokens,
            pooling=pooling or "cls",
            family="custom",
            rotary=_has_rotary(model) if rotary is None else (rotary or None),
            pooling_path=pooling_path,
            pooling_path_error=None if pooling_path is not None else (
                f"{type(model).__name__} is a custom model: pass adapt(..., pooling_path=PoolingPath(...)) "
                "to describe its final token states and head"
            ),
            patch_embed=patch_embed,
            token_module=token_module,
            blocks=_checked_per_layer(blocks, len(modules), "blocks"),
            out_projections=_checked_per_layer(out_projections, len(modules), "out_projections"),
            _capture_kind=kind,
        )

    adapter = _adapt_timm(model) or _adapt_hf(model) or _adapt_torchvision(model)
    if adapter is None:
        raise _unsupported_generic(model)
    if num_prefix_tokens is not None:
        adapter.num_prefix_tokens = num_prefix_tokens
    if patch_size is not None:
        adapter.patch_size = _pair(patch_size)
    if pooling is not None:
        adapter.pooling = pooling
    if patch_embed is not None:
        adapter.patch_embed = patch_embed
    if token_module is not None:
        adapter.token_module = token_module
    if blocks is not None:
        adapter.blocks = _checked_per_layer(blocks, adapter.num_layers, "blocks")
    if out_projections is not None:
        adapter.out_projections = _checked_per_layer(
            out_projections, adapter.num_layers, "out_projections"
        )
    if rotary is not None:
        adapter.rotary = rotary or None
    if pooling_path is not None:
        adapter.pooling_path, adapter.pooling_path_error = pooling_path, None
    return adapter


def _checked_per_layer(
    modules: Sequence[nn.Module] | None, num_layers: int, name: str
) -> list[nn.Module] | None:
    """Validate a per-layer module list passed to :func:`adapt` (one per attention layer)."""
    if modules is None:
        return None
    items = list(modules)
    if len(items) != num_layers or not all(isinstance(m, nn.Module) for m in items):
        raise ValueError(
            f"{name} must hold one nn.Module per attention layer ({num_layers}), got "
            f"{len(items)} item(s)"
        )
    return items


def resolve_adapter(model: nn.Module, adapter: ViTAdapter | None) -> ViTAdapter:
    """The adapter to use for ``model``: the given one (checked) or :func:`adapt`."""
    if adapter is None:
        return adapt(model)
    if not isinstance(adapter, ViTAdapter):
        raise TypeError(f"adapter must be a ViTAdapter (from captum_vit.adapt), got {type(adapter).__name__}")
    if adapter.model is not model:
        raise ValueError("adapter was built for a different model")
    return adapter
