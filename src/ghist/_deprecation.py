"""Renamed keyword arguments: the old name keeps working for one release, with a ``FutureWarning``.

The glossary of ARCHITECTURE.md gives each concept one parameter name; a function whose parameter drifted from it is
renamed, and :func:`renamed_arguments` keeps the old keyword working meanwhile. The function's signature (and so its
documentation) shows the new name only.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["renamed_arguments"]


def renamed_arguments(**old_to_new: str) -> Callable[[F], F]:
    """Let keyword ``old`` stand for ``new`` (``old_to_new``), with a ``FutureWarning`` saying what to write instead.

    Passing both names is a ``TypeError``, as passing one argument twice is.

    Examples
    --------
    >>> @renamed_arguments(true_key="table_key")
    ... def evaluate(sdata, *, table_key="table"):
    ...     return table_key
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     evaluate(None, true_key="counts")
    'counts'

    """

    def decorate(func: F) -> F:
        public = _public_name(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{public}() got both `{old}` and its new name `{new}`; pass only `{new}`.")
                warnings.warn(
                    f"`{public}({old}=...)` is deprecated and will be removed in the next release; "
                    f"use `{new}=...` (the same meaning).",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        wrapper.__renamed_arguments__ = dict(old_to_new)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def _public_name(func: Callable[..., Any]) -> str:
    """``ghist.tl.evaluate`` for ``ghist.tl._evaluate.evaluate``: the name a user calls it by."""
    parts = [p for p in func.__module__.split(".") if not p.startswith("_")]
    return ".".join([*parts, func.__qualname__])
