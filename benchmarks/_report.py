"""The output of the table-writing benchmark scripts: the table, then the command that made it."""

from __future__ import annotations

import argparse
import os


def emit(script: str, args: argparse.Namespace, lines: list[str], positional: tuple[str, ...] = ()) -> None:
    """Print ``lines`` and the command line of ``benchmarks/<script>`` that reproduces them (every option of
    ``args`` but ``out``, then the ``positional`` arguments), and write both to ``args.out`` if it is set."""
    options = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if v is not None and k != "out" and k not in positional
    ]
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
    print(text)
