"""Sphinx configuration of the torchcfm_nsgf documentation.

Build (what CI runs, warnings as errors, the gallery executed)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The API reference (``api.rst``) lists every name of ``torchcfm_nsgf.__all__`` under its top-level path, so
it does not depend on which module defines a name; the build fails when a public name is missing from it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the source tree being documented, ahead of any installed copy
sys.path.insert(0, str(DOCS))

import _apidoc  # noqa: E402

import torchcfm_nsgf  # noqa: E402

project = "torchcfm-nsgf"
author = "torchcfm-nsgf contributors"
copyright = "2026, torchcfm-nsgf contributors"
release = torchcfm_nsgf.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "generated/README.rst", "gallery/README.rst"]
html_theme = "furo"
html_title = f"torchcfm-nsgf {release}"
html_static_path: list[str] = []
# The full measurement record and the changelog, served as they are next to the pages.
html_extra_path = ["../BENCHMARKS.md", "../BENCHMARKS_HISTORY.md", "../CHANGELOG.md"]

autosummary_generate = True
autosummary_imported_members = True
# members of the parts a class is built from (mixins) are its own; those of torch, torchcfm and Python are not
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
    "inherited-members": "ConditionalFlowMatcher,Module,BaseException,object",
}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_class_signature = "mixed"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

# The gallery: every ``plot_*.py`` of docs/gallery runs at build time and its figures are embedded.
# DOCS_GALLERY=0 builds the pages without running the examples (their code only).
sphinx_gallery_conf = {
    "examples_dirs": "gallery",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "plot_gallery": os.environ.get("DOCS_GALLERY", "1") != "0",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "show_memory": False,
    "min_reported_time": 1,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib", "seaborn", _apidoc.reset_torch),
}

suppress_warnings = ["config.cache"]


def setup(app):  # noqa: D103 - Sphinx entry point
    app.connect("autodoc-process-docstring", _apidoc.escape_shape_stars, priority=100)  # before napoleon
    app.connect("autodoc-process-docstring", _apidoc.constant_docstring)
    app.connect("builder-inited", _apidoc.check_reference)
