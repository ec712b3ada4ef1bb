"""Smoke test of an installed wheel, run from outside the source tree.

    python .ci/smoke_wheel.py WHEEL SOURCE_ROOT

Checks that ``torchcfm_nsgf`` is imported from the environment's site-packages (not from a source tree),
that the wheel holds every file of the source package, that every module imports, that ``__version__`` is
the wheel's version, and that one small ``SinkhornFlowMatcher`` call returns torchcfm's triple.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import sysconfig
import zipfile
from pathlib import Path

import torch

wheel, source = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
if Path.cwd().resolve().is_relative_to(source):
    raise SystemExit(f"run this from outside the source tree {source}, not from {Path.cwd()}")

import torchcfm_nsgf  # noqa: E402

site = Path(sysconfig.get_path("purelib")).resolve()
where = Path(torchcfm_nsgf.__file__).resolve()
if not where.is_relative_to(site):
    raise SystemExit(f"torchcfm_nsgf was imported from {where}, not from the installed wheel in {site}")

# Every file of the source package (Python modules and package data) is in the wheel.
in_source = {
    p.relative_to(source).as_posix()
    for p in (source / "torchcfm_nsgf").rglob("*")
    if p.is_file() and "__pycache__" not in p.parts
}
in_wheel = set(zipfile.ZipFile(wheel).namelist())
missing = sorted(in_source - in_wheel)
if missing:
    raise SystemExit(f"the wheel lacks package files: {missing}")

# Every module imports from the installed copy.
for module in pkgutil.walk_packages(torchcfm_nsgf.__path__, "torchcfm_nsgf."):
    importlib.import_module(module.name)

version = wheel.name.split("-")[1]
if torchcfm_nsgf.__version__ != version:
    raise SystemExit(f"torchcfm_nsgf.__version__ is {torchcfm_nsgf.__version__!r}, the wheel is {version!r}")

gen = torch.Generator().manual_seed(0)
x0, x1 = torch.randn(64, 2, generator=gen), torch.randn(64, 2, generator=gen) + 3.0
FM = torchcfm_nsgf.SinkhornFlowMatcher(generator=gen)
t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)
assert t.shape == (64,) and xt.shape == ut.shape == (64, 2), (t.shape, xt.shape, ut.shape)
assert torch.isfinite(xt).all() and torch.isfinite(ut).all()
print(
    f"wheel smoke test passed: torchcfm_nsgf {torchcfm_nsgf.__version__} from {where.parent}, "
    f"{len(in_source)} package files, one matcher call (t {tuple(t.shape)}, xt {tuple(xt.shape)})"
)
