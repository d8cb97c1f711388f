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

__all__ = ["explain_func"]

#: ``explain_func(model, inputs, targets, **kwargs) -> numpy (B, 1, H, W)``.
QuantusExplainFunc = Callable[..., np.ndarray]


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
                return out.detach().float()[:, :1]

            return run

        return build_class
    raise TypeError(f"method must be a registry name (str) or a captum_vit attribution class, got {type(method).__name__}")


def explain_func(method: str | type, **options: Any) -> QuantusExplainFunc:
    """An ``explain_func`` for Quantus metrics that runs a captum_vit method.

    Args:
        method (str or type): a name of the evaluation registry
            (:func:`captum_vit.evaluation.available_methods`, e.g.
            ``"grad_rollout_chefer"``, ``"rollout_mean"``, ``"random"``; ``options``
            are its ``method_options``) or an attribution class such as
            :class:`captum_vit.GradientRollout` (``options`` go to its constructor).
        **options (Any): method settings, see above.

    Returns:
        Callable: ``explain_func(model, inputs, targets, **kwargs)`` taking numpy
        (or tensor) images ``(B, C, H, W)`` and targets ``(B,)`` (``None``: the
        predicted class), returning a float32 numpy array ``(B, 1, H, W)``: the
        method's patch map at the input size. ``kwargs`` may carry ``device``; other
        keys are ignored.

    Example::

        >>> import quantus
        >>> from captum_vit.integrations.quantus import explain_func
        >>> metric = quantus.RegionPerturbation(patch_size=16, regions_evaluation=10)
        >>> scores = metric(model=model, x_batch=x, y_batch=y, a_batch=None,
        ...                 explain_func=explain_func("grad_rollout_chefer"), device="cpu")
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
