"""The output of the table-writing benchmark scripts: the table, then the command that made it."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def emit(
    script: str,
    args: argparse.Namespace,
    lines: list[str],
    positional: tuple[str, ...] = (),
    *,
    data: Any = None,
) -> None:
    """Print ``lines`` and the command line of ``benchmarks/<script>`` that reproduces them (every option of
    ``args`` but ``out``, a true store_true option as its bare flag and a list as its values, then the
    ``positional`` arguments), and write both to ``args.out`` if it is set;
    with ``data``, also ``{"args": ..., "rows": data}`` as JSON beside it (``args.out`` with ``.json``)."""
    options = []
    for k, v in vars(args).items():
        if v is None or v is False or k == "out" or k in positional:
            continue
        flag = f"--{k.replace('_', '-')}"
        if v is True:  # a store_true flag
            options.append(flag)
        elif isinstance(v, list):  # nargs: the values after the flag (none for an empty "*" list)
            options.append(" ".join([flag, *map(str, v)]))
        else:
            options.append(f"{flag} {v}")
    values = [
        str(v)
        for k in positional
        for v in (getattr(args, k) if isinstance(getattr(args, k), list) else [getattr(args, k)])
    ]
    cmd = " ".join(["python", f"benchmarks/{script}", *options, *values])
    text = "\n".join([*lines, "", f"Command: `{cmd}`", ""])
    if args.out:
        with open(os.fspath(args.out), "w") as f:
            f.write(text)
        if data is not None:
            Path(args.out).with_suffix(".json").write_text(
                json.dumps(dict(args=vars(args), rows=data), indent=1)
            )
    print(text)


def publish(lines: list[str], out: str | os.PathLike | None = None) -> str:
    """Print ``lines`` as one text (a trailing newline) and write it to ``out`` when given; returns the text."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)
    return text


def command_line(script: str, argv: list[str] | None = None) -> str:
    """``python benchmarks/<script> ARGS``: the command as given (``argv``, or this process's arguments)."""
    return " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def table_head(columns: list[str], align: str = "---") -> list[str]:
    """The two header lines of a markdown table: ``| a | b |`` and ``|---|---|`` (``align`` per column)."""
    return ["| " + " | ".join(columns) + " |", "|" + f"{align}|" * len(columns)]


def machine() -> str:
    """The processor (or architecture) and torch version, as the tables' setup lines name the machine."""
    import torch

    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}"


def table_row(cells: list[object]) -> str:
    """One markdown table row ``| a | b |`` of already formatted cells."""
    return "| " + " | ".join(map(str, cells)) + " |"
