"""The one module that touches Captum's private or untyped API.

Captum's ``log_usage`` decorator is untyped; :func:`log_usage` re-exports it with a
signature mypy understands. Every public ``attribute`` carries it, because Captum
composes methods (``NoiseTunnel``, ``Occlusion``) through ``attribute.__wrapped__``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from captum._utils.progress import progress as _captum_progress
from captum.log import log_usage as _captum_log_usage

__all__ = ["log_usage", "progress"]

_F = TypeVar("_F", bound=Callable[..., Any])


def log_usage(func: _F) -> _F:
    """Captum's ``log_usage()`` decorator, typed (sets ``func.__wrapped__``)."""
    return cast(_F, _captum_log_usage()(func))


def progress(*args: Any, **kwargs: Any) -> Any:
    """Captum's progress-bar helper (tqdm when installed, a simple fallback otherwise)."""
    return _captum_progress(*args, **kwargs)
