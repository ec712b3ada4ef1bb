"""The documentation covers the public API: every name of ``__all__`` has a docstring and a reference entry.

The API reference (``docs/api.rst``) lists names as ``torchcfm_nsgf.<name>``; the same helper decides
both what the Sphinx build checks and what these tests check (``docs/_apidoc.py``). The gallery imports
public names only, so that moving a name between modules does not break the documentation.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from importlib import metadata

import pytest
import tomllib
from _env import ROOT

import torchcfm_nsgf

DOCS = ROOT / "docs"


def _apidoc():
    spec = importlib.util.spec_from_file_location("_apidoc", DOCS / "_apidoc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


apidoc = _apidoc()


@pytest.mark.parametrize("name", torchcfm_nsgf.__all__)
def test_public_name_has_a_docstring(name):
    doc = apidoc.docstring(name)
    assert doc, (
        f"torchcfm_nsgf.{name} is public (in __all__) but has no docstring (a constant: no #: comment)"
    )
    assert len(doc.split()) >= 3, f"torchcfm_nsgf.{name}'s docstring is a stub: {doc!r}"


def test_every_public_name_is_in_the_api_reference():
    listed = apidoc.reference_names()
    missing = sorted(set(torchcfm_nsgf.__all__) - listed)
    assert not missing, f"public names missing from docs/api.rst: {missing}"
    extra = sorted(listed - set(torchcfm_nsgf.__all__))
    assert not extra, f"docs/api.rst lists names that are not in __all__: {extra}"


def test_reference_parser_sees_entries_and_ignores_prose():
    text = """Title
=====

Prose mentions torchcfm_nsgf.Hidden inline, which is not an entry.

.. autosummary::
   :toctree: generated

   torchcfm_nsgf.SinkhornFlowMatcher
   torchcfm_nsgf.sinkhorn_velocity
"""
    assert apidoc.reference_names(text) == {"SinkhornFlowMatcher", "sinkhorn_velocity"}


def test_constant_documentation_comes_from_its_defining_module():
    # A constant's value has no docstring of its own; the #: comment next to its assignment is its doc.
    doc = apidoc.docstring("PHASE2_VARIANTS")
    assert doc is not None and "phase" in doc.lower()
    assert apidoc.docstring("SinkhornFlowMatcher").startswith(
        torchcfm_nsgf.SinkhornFlowMatcher.__doc__.split()[0]
    )


def test_gallery_imports_only_public_names():
    examples = sorted((DOCS / "gallery").glob("plot_*.py"))
    assert len(examples) >= 5
    public = set(torchcfm_nsgf.__all__)
    for path in examples:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchcfm_nsgf"):
                assert node.module == "torchcfm_nsgf", f"{path.name} imports from {node.module}"
                names = {alias.name for alias in node.names}
                assert names <= public, f"{path.name} imports non-public {sorted(names - public)}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("torchcfm_nsgf."), f"{path.name} imports {alias.name}"


def test_version_is_the_package_metadata():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert torchcfm_nsgf.__version__ == metadata.version("torchcfm-nsgf") == pyproject["project"]["version"]


README_COMMANDS = (
    'python3 -m venv .venv && .venv/bin/pip install -e ".[examples]" && .venv/bin/python examples/two_dim.py',
    'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/python -m pytest -q',
)


def test_readme_commands_and_ci_run_the_same_test_command():
    readme = (ROOT / "README.md").read_text()
    for command in README_COMMANDS:
        assert command in readme, f"README.md lost the command {command!r}"
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    steps = [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]
    assert steps[0] == README_COMMANDS[1], ".ci/run's first step must be README's test command"


def test_readme_code_imports_only_public_names():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks, "README.md has no Python example"
    public = set(torchcfm_nsgf.__all__)
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchcfm_nsgf"):
                assert node.module == "torchcfm_nsgf", f"README.md imports from {node.module}"
                assert {a.name for a in node.names} <= public
