"""Run captum_vit's methods inside Quantus metrics.

Quantus (Hedström et al., JMLR 2023; PyPI ``quantus``) evaluates explanations with an
``explain_func(model, inputs, targets, **kwargs)`` that takes numpy images
``(B, C, H, W)`` and integer targets and returns numpy attributions. :func:`explain_func`
builds one from a captum_vit method. The explainer is built from the ``model``
Quantus passes in (randomisation tests such as MPRT pass a randomised copy of the
model), and kept per model object while it lives.

This module needs no import of Quantus itself; install it with
``pip install captum-vit[quantus]``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import attr as _attr

__all__ = ["explain_func"]

#: ``explain_func(model, inputs, targets, **kwargs) -> numpy (B, 1, H, W)``.
QuantusExplainFunc = Callable[..., np.ndarray]

#: The captum_vit map methods: ``attribute()`` gives the patch map upsampled to the
#: input size and repeated in every channel, so one channel is the whole map. (Not
#: ``multiplies_by_inputs``: PatchOcclusion, a Captum ``PerturbationAttribution``, has
#: it True and still returns a map.) Every other class, AttnLRP included, is taken as
#: a per-pixel-and-channel attribution.
_MAP_METHODS: tuple[type, ...] = (
    _attr.AttentionFlow,
    _attr.AttentionRollout,
    _attr.GradientRollout,
    _attr.PatchOcclusion,
    _attr.RawAttention,
    _attr.SiftInterrelation,
    _attr.ViTGradCam,
)


def _one_channel(method: object, out: Tensor, x: Tensor) -> Tensor:
    """An input-shaped attribution ``(B, C, H, W)`` -> ``(B, 1, H, W)`` float32: channel 0
    of a map method's repeated map, else the sum over channels."""
    if out.ndim != 4 or out.shape[0] != x.shape[0] or tuple(out.shape[-2:]) != tuple(x.shape[-2:]):
        raise ValueError(
            f"explain_func: {type(method).__name__}.attribute returned shape {tuple(out.shape)}; "
            f"expected input-shaped attributions {tuple(x.shape)}"
        )
    out = out.detach().float()
    if isinstance(method, _MAP_METHODS):
        return out[:, :1]
    return out.sum(dim=1, keepdim=True)


def _as_tensor(inputs: Any, device: torch.device) -> Tensor:
    x = inputs if isinstance(inputs, Tensor) else torch.from_numpy(np.ascontiguousarray(inputs))
    if x.ndim != 4:
        raise ValueError(f"explain_func expects images (B, C, H, W), got shape {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.float32)


def _as_targets(targets: Any, batch: int, device: torch.device) -> Tensor | None:
    if targets is None:
        return None
    t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, Tensor) else targets).long().reshape(-1)
    if t.numel() == 1 and batch > 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"got {t.numel()} targets for {batch} images")
    return t.to(device)


def _builder(method: str | type, options: Mapping[str, Any]) -> Callable[[nn.Module], Callable[[Tensor, Tensor | None], Tensor]]:
    """``model -> run(x, target) -> (B, 1, H, W)`` for a registry name or a class."""
    if isinstance(method, str):
        from .._capture import resolve_adapter
        from ..evaluation import _factory, available_methods

        if method not in available_methods():
            raise ValueError(f"unknown method {method!r}; available: {', '.join(available_methods())}")
        factory = _factory(method)

        def build_named(model: nn.Module) -> Callable[[Tensor, Tensor | None], Tensor]:
            ad = resolve_adapter(model, None)
            explain = factory(model, ad, dict(options))

            def run(x: Tensor, t: Tensor | None) -> Tensor:
                if t is None:
                    with torch.no_grad():
                        t = ad.forward(x).argmax(dim=1)
                grid = explain(x, t, torch.arange(x.shape[0]))
                grid = grid if grid.ndim == 4 else grid[:, None]
                return F.interpolate(grid.detach().float(), size=tuple(x.shape[-2:]), mode="nearest")

            return run

        return build_named
    if isinstance(method, type):
        def build_class(model: nn.Module) -> Callable[[Tensor, Tensor | None], Tensor]:
            m = method(model, **options)

            def run(x: Tensor, t: Tensor | None) -> Tensor:
                out = m.attribute(x, target=t)
                out = out[0] if isinstance(out, tuple) else out
                return _one_channel(m, out, x)

            return run

        return build_class
    raise TypeError(f"method must be a registry name (str) or a captum_vit attribution class, got {type(method).__name__}")


def explain_func(method: str | type, **options: Any) -> QuantusExplainFunc:
    """An ``explain_func`` for Quantus metrics that runs a captum_vit method.

    What comes back, always a float32 numpy array ``(B, 1, H, W)`` at the input size:

    * for a registry **name**: the method's patch grid (what
      :func:`captum_vit.evaluation.evaluate` scores) upsampled by nearest neighbour,
      so every pixel carries its patch's value (for ``"lrp"`` the patch's relevance
      summed over its pixels and channels);
    * for a **class**: ``attribute(x, target=t)`` reduced to one channel. The
      captum_vit map methods (:class:`~captum_vit.RawAttention`,
      :class:`~captum_vit.AttentionRollout`, :class:`~captum_vit.GradientRollout`,
      :class:`~captum_vit.AttentionFlow`, :class:`~captum_vit.PatchOcclusion`,
      :class:`~captum_vit.SiftInterrelation`, :class:`~captum_vit.ViTGradCam`)
      repeat one map in every channel: that channel comes back (with the same
      settings, the values of the matching registry name). :class:`~captum_vit.AttnLRP` gives signed relevance per
      pixel and channel, and so does any other class (e.g. Captum's own
      ``IntegratedGradients``): the relevance summed over channels comes back,
      ``attribute(x).sum(1, keepdim=True)``, as Captum's ``visualize_image_attr``
      reduces channels (the pixel's total relevance; nothing is dropped).

    Args:
        method (str or type): a name of the evaluation registry
            (:func:`captum_vit.evaluation.available_methods`, e.g.
            ``"grad_rollout_chefer"``, ``"rollout_mean"``, ``"random"``; ``options``
            are its ``method_options``) or an attribution class such as
            :class:`captum_vit.GradientRollout` or :class:`captum_vit.AttnLRP`
            (``options`` go to its constructor; its ``attribute(x, target=t)`` must
            return input-shaped attributions).
        **options (Any): method settings, see above.

    Returns:
        Callable: ``explain_func(model, inputs, targets, **kwargs)`` taking numpy
        (or tensor) images ``(B, C, H, W)`` and targets ``(B,)`` (``None``: the
        predicted class), returning a float32 numpy array ``(B, 1, H, W)`` as
        described above. ``kwargs`` may carry ``device``; other keys are ignored.

    Example::

        >>> import quantus
        >>> from captum_vit.integrations.quantus import explain_func
        >>> metric = quantus.RegionPerturbation(patch_size=16, regions_evaluation=10)
        >>> scores = metric(model=model, x_batch=x, y_batch=y, a_batch=None,
        ...                 explain_func=explain_func("grad_rollout_chefer"), device="cpu")
        >>> lrp = explain_func(AttnLRP)     # per-pixel relevance, summed over channels
    """
    build = _builder(method, options)
    cache: weakref.WeakKeyDictionary[nn.Module, Callable[[Tensor, Tensor | None], Tensor]] = weakref.WeakKeyDictionary()

    def quantus_explain(model: nn.Module, inputs: Any, targets: Any = None, **kwargs: Any) -> np.ndarray:
        if not isinstance(model, nn.Module):
            raise TypeError(f"explain_func needs a torch nn.Module, got {type(model).__name__}")
        device = kwargs.get("device")
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        run = cache.get(model)
        if run is None:
            run = build(model)
            cache[model] = run
        x = _as_tensor(inputs, dev)
        t = _as_targets(targets, int(x.shape[0]), dev)
        was_training = model.training
        model.eval()
        try:
            out = run(x, t)
        finally:
            model.train(was_training)
        return np.ascontiguousarray(out.cpu().numpy().astype(np.float32))

    return quantus_explain
