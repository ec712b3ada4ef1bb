"""The public API as the documentation sees it: the names of ``torchcfm_nsgf.__all__`` and their docstrings.

Used by ``conf.py`` (the build fails when a public name is missing from ``api.rst``; constants get the
``#:`` comment of the module that defines them) and by ``tests/test_docs.py``. Names are looked up through
the top-level package, so moving a name between modules changes nothing here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import warnings
from pathlib import Path

PACKAGE = "torchcfm_nsgf"
API_RST = Path(__file__).resolve().parent / "api.rst"


def public_names() -> list[str]:
    """The names of ``torchcfm_nsgf.__all__``."""
    return list(importlib.import_module(PACKAGE).__all__)


def reference_names(text: str | None = None) -> set[str]:
    """The names that ``api.rst`` documents: entries ``torchcfm_nsgf.<name>`` of its autosummary tables."""
    text = API_RST.read_text() if text is None else text
    return set(re.findall(rf"^\s+{PACKAGE}\.(\w+)\s*$", text, flags=re.MULTILINE))


def _is_constant(obj: object) -> bool:
    return not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj))


def constant_comment(name: str) -> str | None:
    """The ``#:`` comment (or the string after the assignment) of a public constant, from its defining module.

    The constant's value carries no docstring of its own; the comment is found in whichever submodule of the
    package assigns the name at module level and holds the same object.
    """
    from sphinx.errors import PycodeError
    from sphinx.pycode import ModuleAnalyzer

    package = importlib.import_module(PACKAGE)
    obj = getattr(package, name)
    with warnings.catch_warnings():  # deprecated aliases warn on import; they are not what is looked for
        warnings.simplefilter("ignore")
        found = pkgutil.walk_packages(package.__path__, PACKAGE + ".", onerror=lambda _: None)
        modules = [PACKAGE] + [m.name for m in found]
    for modname in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(modname)
        except Exception:  # an optional module whose extra is not installed
            continue
        if getattr(module, name, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except PycodeError:
            continue
        lines = docs.get(("", name))
        if lines and any(line.strip() for line in lines):
            return "\n".join(lines).strip()
    return None


def docstring(name: str) -> str | None:
    """The documentation of a public name: the docstring of a class or function, the comment of a constant."""
    obj = getattr(importlib.import_module(PACKAGE), name)
    if _is_constant(obj):
        return constant_comment(name)
    doc = inspect.getdoc(obj)
    return doc if doc and doc.strip() else None


# ---------------------------------------------------------------------------------------- Sphinx hooks
_CODE = re.compile(r"(``.*?``|`[^`]*`)")
_STAR_SHAPE = re.compile(r"\*(\w+)(?=[,)])")


def escape_shape_stars(app, what, name, obj, options, lines) -> None:
    """``autodoc-process-docstring``, before napoleon: ``(n, *dim)`` outside code is a shape, not emphasis.

    NumPy docstrings write shapes as ``x : Tensor, shape (n, *dim)``; reStructuredText would read ``*dim``
    as the start of emphasis. Outside backquotes, ``*word`` followed by ``,`` or ``)`` is escaped.
    """
    for i, line in enumerate(lines):
        parts = _CODE.split(line)
        parts[::2] = [_STAR_SHAPE.sub(r"\\*\1", part) for part in parts[::2]]
        lines[i] = "".join(parts)


def constant_docstring(app, what, name, obj, options, lines) -> None:
    """``autodoc-process-docstring``: a public constant gets the comment of its defining module."""
    parts = name.split(".")
    if what not in ("data", "attribute") or len(parts) != 2 or parts[0] != PACKAGE:
        return
    comment = constant_comment(parts[1])
    if comment is not None:
        lines[:] = comment.splitlines() + [""]


def check_reference(app) -> None:
    """``builder-inited``: warn (an error under ``-W``) about public names missing from ``api.rst``."""
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    public, listed = set(public_names()), reference_names()
    for name in sorted(public - listed):
        logger.warning(f"{PACKAGE}.{name} is in __all__ but not in api.rst", location=str(API_RST))
    for name in sorted(listed - public):
        logger.warning(f"api.rst lists {PACKAGE}.{name}, which is not in __all__", location=str(API_RST))


def reset_torch(gallery_conf, fname) -> None:
    """Sphinx-gallery reset before each example: one seed, and one torch thread (the examples' tensors are
    small: on a loaded 2-core machine more threads made them up to 10x slower)."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
