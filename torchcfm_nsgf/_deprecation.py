"""Renamed keywords and moved names, kept working for one release with a ``DeprecationWarning`` (private)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def rename_keywords(kwargs: dict[str, Any], renamed: Mapping[str, str], where: str) -> dict[str, Any]:
    """``kwargs`` with every old keyword of ``renamed`` (old -> new) moved to its new name, warning once per
    keyword; giving both names is a ``TypeError``."""
    for old, new in renamed.items():
        if old in kwargs:
            if new in kwargs:
                raise TypeError(f"{where} got both {old!r} and its new name {new!r}; give {new!r} only")
            warnings.warn(
                f"{where}: the keyword {old!r} is renamed {new!r}; {old!r} will be removed in the next release",
                DeprecationWarning,
                stacklevel=3,
            )
            kwargs[new] = kwargs.pop(old)
    return kwargs


def renamed_keywords(**renamed: str) -> Callable[[F], F]:
    """Decorator: the function also accepts the old keyword names ``old=new`` (with a ``DeprecationWarning``)."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            return func(*args, **rename_keywords(kwargs, renamed, func.__qualname__))

        return inner  # type: ignore[return-value]

    return wrap


def moved(old_module: str, names: Mapping[str, Callable[[], Any]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``names`` (name -> loader of its new home) with a ``DeprecationWarning``."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        value, new_home = names[name]()
        warnings.warn(
            f"{old_module}.{name} moved to {new_home}; the old name will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    return __getattr__
