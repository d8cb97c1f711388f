"""The one module that touches Captum's private or untyped API.

Captum's ``log_usage`` decorator is untyped; :func:`log_usage` re-exports it with a
signature mypy understands. Every public ``attribute`` carries it, because Captum
composes methods (``NoiseTunnel``, ``Occlusion``) through ``attribute.__wrapped__``.
Progress bars live in :mod:`captum_vit._progress`; ``progress`` here is the same helper,
kept for callers that still import it from this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from captum.log import log_usage as _captum_log_usage

from ._progress import progress

__all__ = ["log_usage", "progress"]

_F = TypeVar("_F", bound=Callable[..., Any])


def log_usage(func: _F) -> _F:
    """Captum's ``log_usage()`` decorator, typed (sets ``func.__wrapped__``)."""
    return cast(_F, _captum_log_usage()(func))
