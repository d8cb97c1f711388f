"""The one registry of attribution methods, used by ``captum-vit explain`` / ``demo``,
:func:`captum_vit.evaluation.evaluate` and the speed benchmark.

Every method has one name (the key of :data:`METHODS`); older command-line spellings
stay accepted as *aliases* that print a deprecation warning
(:func:`resolve_name`).

Adding a method is one file under ``captum_vit/attr/`` (the class, exported from
``captum_vit.attr``) plus one :class:`MethodEntry` in :data:`_BUILTIN` below::

    MethodEntry(
        "attn_lrp",                 # the one name (snake_case)
        "AttnLRP",                  # title used in figures and tables
        cls="AttnLRP",              # class name in captum_vit.attr
        class_specific=True,        # does the map depend on the target class?
        init=("epsilon",),          # constructor keywords read from the options
        call=(),                    # attribute() keywords read from the options
        defaults={"epsilon": 1e-6}, # used when the options lack a keyword
    )

An entry builds ``cls(model, adapter=adapter, **constructor_kwargs)`` and explains
with ``attribute(x, target=t, return_patch_grid=True, **attribute_kwargs)``. The
keyword ``k`` is looked up in the options mapping as ``"<name>_<k>"``, then
``"<alias>_<k>"`` for each alias, then ``"k"``; when none is present the entry's
``defaults`` apply, then the class's own default. ``defaults`` keys that are neither
in ``init`` nor in ``call`` are fixed constructor keywords. The command line passes
its method options (``--head-fusion`` -> ``head_fusion``, ``--layer``,
``--discard-ratio``, ``--window``, ``--stride``, ``--perturbations-per-eval``,
``--gamma``, plus ``show_progress`` and ``unnormalize``) and every entry takes the ones
it declares. Methods that are not one class of :mod:`captum_vit.attr` (baselines, your
own) give ``make=`` instead, or use :func:`register_method`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import attr
from ._capture import ViTAdapter

__all__ = [
    "METHODS",
    "Explainer",
    "MethodEntry",
    "MethodFactory",
    "available_methods",
    "get_method",
    "register_method",
    "resolve_name",
]

#: ``(inputs, target, index) -> (B, 1, gh, gw)`` patch grid: one method, ready to run.
#: ``target`` is a LongTensor ``(B,)``; ``index`` the samples' dataset indices
#: ``(B,)`` (used by stochastic baselines to stay reproducible under sharding).
Explainer = Callable[[Tensor, Tensor, Tensor], Tensor]
#: ``(model, adapter, options) -> Explainer``; ``options`` holds method settings.
MethodFactory = Callable[[nn.Module, ViTAdapter, Mapping[str, Any]], Explainer]


def _grid_of(out: Tensor | tuple[Tensor, ...]) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class MethodEntry:
    """One method of the registry.

    Attributes:
        name (str): the method's one name.
        title (str): human-readable name for figures and tables.
        cls (str, optional): class name in :mod:`captum_vit.attr`; ``None`` with
            ``make``.
        class_specific (bool): whether the map depends on the target class.
        init (tuple[str, ...]): constructor keywords read from the options.
        call (tuple[str, ...]): ``attribute()`` keywords read from the options.
        defaults (Mapping[str, Any]): values used when the options lack a keyword;
            keys in neither ``init`` nor ``call`` are fixed constructor keywords.
        aliases (tuple[str, ...]): deprecated names still accepted.
        make (MethodFactory, optional): builds the explainer instead of ``cls``.
        description (str): one line for ``--help`` and docs.
        requires (str, optional): a class name of :mod:`captum_vit.attr` without
            which the method is unavailable (``cls`` implies it).
    """

    name: str
    title: str
    cls: str | None = None
    class_specific: bool = True
    init: tuple[str, ...] = ()
    call: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    make: MethodFactory | None = None
    description: str = ""
    requires: str | None = None

    @property
    def available(self) -> bool:
        """Whether the classes the method needs are present in :mod:`captum_vit.attr`."""
        need = self.requires or self.cls
        return need is None or hasattr(attr, need)

    def _lookup(self, key: str, options: Mapping[str, Any]) -> tuple[bool, Any]:
        for prefix in (self.name, *self.aliases):
            spelled = f"{prefix.replace('-', '_')}_{key}"
            if spelled in options:
                return True, options[spelled]
        if key in options:
            return True, options[key]
        if key in self.defaults:
            return True, self.defaults[key]
        return False, None

    def _kwargs(self, keys: tuple[str, ...], options: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in keys:
            found, value = self._lookup(key, options)
            if found:
                out[key] = value
        return out

    def build(self, model: nn.Module, adapter: ViTAdapter, options: Mapping[str, Any]) -> Explainer:
        """The explainer ``(inputs, target, index) -> (B, 1, gh, gw)`` of this method."""
        if self.make is not None:
            return self.make(model, adapter, options)
        if self.cls is None or not self.available:
            raise RuntimeError(f"method {self.name!r} ({self.cls}) is not available in this install")
        fixed = {k: v for k, v in self.defaults.items() if k not in self.init and k not in self.call}
        method = getattr(attr, self.cls)(model, adapter=adapter, **fixed, **self._kwargs(self.init, options))
        call = self._kwargs(self.call, options)

        def explain(x: Tensor, t: Tensor, idx: Tensor) -> Tensor:
            return _grid_of(method.attribute(x, target=t, return_patch_grid=True, **call))

        return explain

    @property
    def factory(self) -> MethodFactory:
        """:meth:`build` as a ``(model, adapter, options) -> Explainer`` factory."""
        return self.build


def _random_map(model: nn.Module, adapter: ViTAdapter, options: Mapping[str, Any]) -> Explainer:
    seed = int(options.get("seed", 0))

    def run(x: Tensor, t: Tensor, idx: Tensor) -> Tensor:
        gh, gw = adapter.grid_size(x)
        maps = []
        for i in idx.tolist():
            g = torch.Generator().manual_seed(seed * 1_000_003 + int(i))
            maps.append(torch.rand(1, gh, gw, generator=g))
        return torch.stack(maps).to(x.device)

    return run



def _rollout(fusion: str, title: str, aliases: tuple[str, ...] = ()) -> MethodEntry:
    return MethodEntry(f"rollout_{fusion}", title, cls="AttentionRollout", class_specific=False,
                       init=("head_fusion", "discard_ratio"), defaults={"head_fusion": fusion},
                       aliases=aliases, description=f"AttentionRollout, {fusion} head fusion")

_BUILTIN: tuple[MethodEntry, ...] = (
    MethodEntry("raw_attention", "raw attention", cls="RawAttention", class_specific=False,
                init=("layer", "head_fusion"), aliases=("raw",),
                description="RawAttention (default: last layer, mean of heads)"),
    _rollout("mean", "attention rollout", aliases=("rollout",)),
    _rollout("max", "attention rollout (max)"),
    _rollout("min", "attention rollout (min)"),
    MethodEntry("grad_rollout", "gradient rollout", cls="GradientRollout",
                init=("head_fusion", "discard_ratio"), defaults={"variant": "rollout"},
                aliases=("grad-rollout",),
                description="GradientRollout variant='rollout' (jacobgil / Das & Huddar)"),
    MethodEntry("grad_rollout_chefer", "Chefer relevance", cls="GradientRollout",
                defaults={"variant": "chefer"}, aliases=("chefer",),
                description="GradientRollout variant='chefer' (Chefer et al. 2021)"),
    MethodEntry("lrp", "AttnLRP", cls="AttnLRP",
                description="AttnLRP (CP-LRP attention, identity rules, Gamma on patch embedding / MLPs / head)"),
    MethodEntry("patch_occlusion", "patch occlusion", cls="PatchOcclusion", init=("replacement",),
                call=("window", "stride", "perturbations_per_eval", "show_progress"),
                defaults={"perturbations_per_eval": 16}, aliases=("occlusion",),
                description="PatchOcclusion (token-level)"),
    MethodEntry("sift", "SIFT interrelation", cls="SiftInterrelation", class_specific=False,
                init=("gamma", "unnormalize"), description="SiftInterrelation patch scores"),
    MethodEntry("vit_gradcam", "ViT Grad-CAM", cls="ViTGradCam", init=("layer",),
                description="ViTGradCam (default: last block)"),
    MethodEntry("attention_flow", "attention flow", cls="AttentionFlow", class_specific=False,
                init=("head_fusion", "discard_ratio"), call=("show_progress",),
                description="AttentionFlow (max-flow from the query rows)"),
    MethodEntry("random", "random baseline", class_specific=False, make=_random_map,
                description="uniform random map (baseline)"),
)

#: name -> entry, in display order (built-in methods first, then registered ones).
METHODS: dict[str, MethodEntry] = {e.name: e for e in _BUILTIN}


def _aliases() -> dict[str, str]:
    return {alias: e.name for e in METHODS.values() for alias in e.aliases}


def resolve_name(name: str) -> str:
    """The registry name of ``name``; a deprecated alias warns and maps to its method.

    Raises:
        KeyError: when ``name`` is neither a method nor an alias.
    """
    if name in METHODS:
        return name
    target = _aliases().get(name)
    if target is None:
        raise KeyError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    warnings.warn(
        f"method name {name!r} is deprecated, use {target!r}", DeprecationWarning, stacklevel=2
    )
    return target


def get_method(name: str) -> MethodEntry:
    """The entry of ``name`` (aliases accepted, with a deprecation warning)."""
    return METHODS[resolve_name(name)]


def available_methods() -> list[str]:
    """Registered methods whose attribution classes are present, in registry order."""
    return [n for n, e in METHODS.items() if e.available]


def register_method(
    name: str,
    factory: MethodFactory,
    *,
    description: str = "",
    requires: str | None = None,
    overwrite: bool = False,
) -> None:
    """Add a method built by a factory to the registry.

    Args:
        name (str): the method's name (row name in the evaluation table).
        factory (MethodFactory): ``(model, adapter, options) -> explainer`` where the
            explainer maps ``(inputs, target, index)`` to a ``(B, 1, gh, gw)`` patch
            grid (any map whose spatial size is a multiple of the grid is pooled).
        description (str, optional): one line for ``--help`` / docs. Default: ""
        requires (str, optional): a class name of :mod:`captum_vit.attr` without which
            the method is unavailable. Default: None
        overwrite (bool, optional): replace an existing entry. Default: False

    Example::

        >>> def my_factory(model, adapter, options):
        ...     ig = captum.attr.IntegratedGradients(model)
        ...     return lambda x, t, idx: ig.attribute(x, target=t).abs().sum(1, keepdim=True)
        >>> register_method("integrated_gradients", my_factory)
    """
    if not isinstance(name, str) or not name:
        raise ValueError("method name must be a non-empty string")
    if (name in METHODS or name in _aliases()) and not overwrite:
        raise ValueError(f"method {name!r} is already registered (pass overwrite=True)")
    if not callable(factory):
        raise TypeError("factory must be callable (model, adapter, options) -> explainer")
    METHODS[name] = MethodEntry(name, name, make=factory, description=description, requires=requires)
