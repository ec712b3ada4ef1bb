"""Command-line flags generated from a frozen options dataclass (private module).

One definition of each setting: the dataclass field gives the flag's name, type, default and help
(``metadata["help"]``), so scripts never re-list the fields.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def add_option_flags(parser: Any, cls: type, *, prefix: str = "", defaults: Any = None) -> None:
    """Add ``--{prefix}{field-name}`` for every field of the dataclass ``cls`` to ``parser`` (or a group), with
    the values of ``defaults`` (default: ``cls()``) as the flags' defaults."""
    defaults = cls() if defaults is None else defaults
    for f in fields(cls):
        default = getattr(defaults, f.name)
        flag = "--" + (prefix + f.name).replace("_", "-")
        help_text = f.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)


def options_from_args(args: argparse.Namespace, cls: type[T], *, prefix: str = "") -> T:
    """The ``cls`` instance described by flags added with :func:`add_option_flags`."""
    return cls(**{f.name: getattr(args, prefix.replace("-", "_") + f.name) for f in fields(cls)})


_MATCHER_FLAGS = {
    "flow_steps": "T, Euler steps of each simulated Sinkhorn flow",
    "step_size": "eta, the flow's Euler step (one value)",
    "path": "served targets: straight (X_0 -> X_T), polyline (Euler segments) or grid (paper)",
    "refresh_every": "simulate a new flow into the pool every N matcher calls",
}


def add_matcher_flags(parser: Any) -> None:
    """Flags for :class:`~torchcfm_nsgf.SinkhornFlowMatcher`: its flow settings and the Sinkhorn options,
    with the constructor's own defaults."""
    import inspect

    from .matcher import PATHS, SinkhornFlowMatcher
    from .sinkhorn import SinkhornOptions

    params = inspect.signature(SinkhornFlowMatcher).parameters
    for name, help_text in _MATCHER_FLAGS.items():
        default = params[name].default
        flag = "--" + name.replace("_", "-")
        if name == "path":
            parser.add_argument(flag, default=default, choices=list(PATHS), help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)
    add_option_flags(parser, SinkhornOptions)


def matcher_from_args(args: argparse.Namespace, **kwargs: Any) -> Any:
    """The :class:`~torchcfm_nsgf.SinkhornFlowMatcher` described by :func:`add_matcher_flags`' flags.

    Sinkhorn flags all at their defaults leave the options to the matcher (``sinkhorn=None``: its blur
    follows the data's dimension); any other value gives explicit options, used as given."""
    from .matcher import SinkhornFlowMatcher
    from .sinkhorn import SinkhornOptions

    settings = {name: getattr(args, name) for name in _MATCHER_FLAGS}
    options = options_from_args(args, SinkhornOptions)
    sinkhorn = None if options == SinkhornOptions() else options
    return SinkhornFlowMatcher(sinkhorn=sinkhorn, **settings, **kwargs)
