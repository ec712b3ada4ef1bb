"""Command-line flags generated from a frozen options dataclass (private module).

One definition of each setting: the dataclass field gives the flag's name, type, default and help
(``metadata["help"]``), so scripts never re-list the fields.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any, TypeVar

T = TypeVar("T")


def add_option_flags(
    parser: Any, cls: type, *, prefix: str = "", defaults: Any = None, exclude: tuple[str, ...] = ()
) -> None:
    """Add ``--{prefix}{field-name}`` for every field of the dataclass ``cls`` but those in ``exclude`` to
    ``parser`` (or a group), with the values of ``defaults`` (default: ``cls()``) as the flags' defaults.

    A field's ``metadata`` gives the flag's ``help`` and, optionally, its ``choices``; either may be a
    function, called now (so that a registry lists what it holds when the parser is built)."""
    defaults = cls() if defaults is None else defaults
    for f in fields(cls):
        if f.name in exclude:
            continue
        default = getattr(defaults, f.name)
        flag = "--" + (prefix + f.name).replace("_", "-")
        help_text = f.metadata.get("help", "")
        help_text = help_text() if callable(help_text) else help_text
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        extra = {}
        if "choices" in f.metadata:
            choices = f.metadata["choices"]
            extra["choices"] = list(choices() if callable(choices) else choices)
        parser.add_argument(flag, type=type(default), default=default, help=help_text, **extra)


def options_from_args(
    args: argparse.Namespace,
    cls: type[T],
    *,
    prefix: str = "",
    defaults: Any = None,
    exclude: tuple[str, ...] = (),
) -> T:
    """The ``cls`` instance described by flags added with :func:`add_option_flags` (the fields in ``exclude``
    from ``defaults``)."""
    defaults = cls() if defaults is None and exclude else defaults
    return cls(
        **{
            f.name: getattr(defaults, f.name)
            if f.name in exclude
            else getattr(args, prefix.replace("-", "_") + f.name)
            for f in fields(cls)
        }
    )


class DeprecatedFlag(argparse.Action):
    """An old flag name: stores into the new flag's ``dest`` with a ``DeprecationWarning`` naming the new flag
    (hidden from ``--help``)."""

    def __init__(self, option_strings: list[str], dest: str, new_flag: str = "", **kwargs: Any) -> None:
        self.new_flag = new_flag
        kwargs["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        import warnings

        warnings.warn(
            f"{option_string} is renamed {self.new_flag}; the old flag will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        setattr(namespace, self.dest, values)


# ------------------------------------------------------------------------------ value types of flags
def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {value}")
    return number


def fraction(value: str) -> float:
    number = float(value)
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value}")
    return number


def probability(value: str) -> float:
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return number


def decay(value: str) -> float:
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return number


def resume_mode(value: str) -> str:
    """The value of ``--resume``: only ``auto`` (a bare ``--resume`` means resume)."""
    if value != "auto":
        raise argparse.ArgumentTypeError(f"must be 'auto' or nothing, got {value!r}")
    return value


# ------------------------------------------------------------------------------ flags of a settings dataclass
def field_flag(f: Any) -> str:
    """The flag of a dataclass field: ``metadata["flag"]``, else ``--field-name``."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def field_dest(f: Any) -> str:
    """The argparse ``dest`` of :func:`field_flag`."""
    return field_flag(f).lstrip("-").replace("-", "_")


def add_dataclass_flags(
    parser: Any,
    cls: type,
    *,
    groups: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """Add a flag for every field of the settings dataclass ``cls`` whose ``metadata`` has a ``help``.

    ``metadata`` may also give the flag's name (``"flag"``), its value type (``"type"``, a function such as
    :func:`positive_int`), ``"choices"`` (or a function returning them), ``"nargs"``, ``"const"``,
    ``"metavar"`` and the argument ``"group"`` (a key of ``groups``). A bool field that defaults to False is a switch (``--flag``); another bool is
    ``--flag/--no-flag``. ``defaults`` replace the dataclass defaults of the fields they name."""
    groups = groups or {}
    defaults = defaults or {}
    for f in fields(cls):
        meta = f.metadata
        if "help" not in meta or f.name in skip:
            continue
        if f.name in defaults:
            default = defaults[f.name]
        else:
            default = f.default if f.default is not MISSING else f.default_factory()
        help_text = meta["help"]() if callable(meta["help"]) else meta["help"]
        kwargs: dict[str, Any] = {"default": default, "help": help_text}
        annotation = str(f.type)
        if annotation in ("bool", "bool | None"):
            if default is False:
                kwargs["action"] = "store_true"
            else:
                kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kind = meta.get("type")
            if kind is None:
                kind = (
                    int if annotation.startswith("int") else float if annotation.startswith("float") else str
                )
            kwargs["type"] = kind
            if "choices" in meta:
                choices = meta["choices"]
                kwargs["choices"] = list(choices() if callable(choices) else choices)
            kwargs.update({k: meta[k] for k in ("nargs", "const", "metavar") if k in meta})
        groups.get(meta.get("group"), parser).add_argument(field_flag(f), **kwargs)


def dataclass_kwargs(args: argparse.Namespace, cls: type, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The values of the flags :func:`add_dataclass_flags` added for ``cls``, keyed by field name (fields
    without a flag, or whose flag the parser does not have, are left out)."""
    out = {}
    for f in fields(cls):
        if "help" in f.metadata and f.name not in skip and hasattr(args, field_dest(f)):
            out[f.name] = getattr(args, field_dest(f))
    return out


_MATCHER_FLAGS = {
    "flow_steps": "T, Euler steps of each simulated Sinkhorn flow",
    "step_size": "eta, the flow's Euler step (one value)",
    "path": "served targets: straight (X_0 -> X_T), polyline (Euler segments) or grid (paper)",
    "refresh_every": "simulate a new flow into the pool every N matcher calls",
    "flow_size": "particles of each simulated flow, from the latest calls' samples (default: one batch)",
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
        elif default is None:  # optional integers
            parser.add_argument(flag, type=int, default=None, help=help_text)
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
