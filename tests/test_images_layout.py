"""The image package's rooms: one record per dataset, the method registry, NSGF++'s options in the image
settings and on the command line, and the names of earlier releases (with a DeprecationWarning)."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

import torchcfm_nsgf
from torchcfm_nsgf import NSGFPlusPlusOptions
from torchcfm_nsgf.images import NSGFSettings, TrainConfig
from torchcfm_nsgf.images.cli import build_parser, config_from_args
from torchcfm_nsgf.images.data import DATASETS, NUM_CLASSES, expected_files
from torchcfm_nsgf.images.registry import METHODS, available_methods
from torchcfm_nsgf.images.settings import IMAGE_NSGFPP
from torchcfm_nsgf.images.unet import UNET_PRESETS


def test_each_dataset_record_is_what_the_loop_and_the_command_line_use():
    for name, record in DATASETS.items():
        assert record.name == name and NUM_CLASSES[name] == record.classes
        assert record.unet_preset in UNET_PRESETS
        config = TrainConfig(dataset=name, conditional=True)
        assert (config.resolved_preset, config.resolved_hflip, config.num_classes) == (
            record.unet_preset,
            record.hflip,
            record.classes,
        )
        args = build_parser(name).parse_args([])
        assert (args.train_steps, args.unet) == (record.default_steps, record.unet_preset)
        assert hasattr(args, "verify_checksums") == record.checksums
        assert [p.split("/")[-1] for p in expected_files(name, "/r")] == list(record.files)
    # the recipe's facts as the README states them
    assert DATASETS["cifar10"].hflip and not DATASETS["mnist"].hflip
    assert DATASETS["cifar10"].inception_score and not DATASETS["mnist"].inception_score
    assert (DATASETS["mnist"].shape, DATASETS["cifar10"].shape) == ((1, 28, 28), (3, 32, 32))


def test_the_registry_lists_and_builds_every_method():
    assert (
        available_methods()
        == tuple(METHODS)
        == ("nsgf", "nsgf++", "coupling", "otcfm", "icfm", "fm", "rf", "drift", "meanflow")
    )


def _imports(path: Path, package: str) -> set[str]:
    """The modules of the package that the file at ``path`` (module ``package``) imports, at any depth of its
    code (function-level imports included, those for type checkers only left out)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports for type checkers only are not run
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - (1 if path.name == "__init__.py" else 0))[0]
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchcfm_nsgf"):
            found.add(node.module)
    return found


def test_no_module_of_the_package_imports_in_a_circle():
    root = Path(torchcfm_nsgf.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {
        name: {m for m in _imports(path, name) if m in modules and m != name and not name.startswith(m + ".")}
        for name, path in modules.items()
    }
    # a package's __init__ re-exports its children: not an edge back up
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
    assert "torchcfm_nsgf.images.registry" in graph["torchcfm_nsgf.images.training"]


def test_nsgfpp_flags_are_generated_from_the_options_and_the_old_flags_still_work():
    parser = build_parser("mnist")
    config = config_from_args(parser.parse_args([]))
    assert config.nsgf.nsgfpp == IMAGE_NSGFPP
    argv = ["--nsgfpp-flow-steps", "3", "--nsgfpp-phase2", "paper", "--nsgfpp-endpoints", "simulated"]
    config = config_from_args(parser.parse_args(argv))
    assert config.nsgf.nsgfpp == IMAGE_NSGFPP.replace(flow_steps=3, phase2="paper", endpoints="simulated")
    with pytest.warns(DeprecationWarning) as caught:
        old = parser.parse_args(["--phase1-steps", "3", "--phase1-step-size", "0.25", "--phase2", "paper"])
    assert "--phase1-steps is renamed --nsgfpp-flow-steps" in {str(w.message).split(";")[0] for w in caught}
    assert config_from_args(old).nsgf.nsgfpp == IMAGE_NSGFPP.replace(
        flow_steps=3, step_size=0.25, phase2="paper"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--nsgfpp-phase2", "noise"])
    # the shared pool flags reach NSGF++'s matcher, as before
    config = config_from_args(parser.parse_args(["--refresh-every", "7", "--pool-capacity", "99"]))
    assert (config.nsgf.nsgfpp_options().refresh_every, config.nsgf.nsgfpp_options().pool_capacity) == (7, 99)


def test_old_nsgf_settings_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning) as caught:
        s = NSGFSettings(phase1_steps=3, phase2="paper", endpoints="simulated")
    assert any("'phase1_steps' is renamed 'nsgfpp.flow_steps'" in str(w.message) for w in caught)
    assert s.nsgfpp == IMAGE_NSGFPP.replace(flow_steps=3, phase2="paper", endpoints="simulated")
    with pytest.warns(
        DeprecationWarning, match="NSGFSettings.phase1_step_size is now NSGFSettings.nsgfpp.step_size"
    ):
        assert s.phase1_step_size == 0.5
    with pytest.warns(DeprecationWarning):
        s.phase1_batch_fraction = 1.0
    assert s.nsgfpp.phase1_batch_fraction == 1.0
    # the nsgf settings of a checkpoint's config, written before (old keys) and after (a nested dict)
    with pytest.warns(DeprecationWarning):
        assert NSGFSettings(**{"phase1_steps": 2, "refresh_every": 4}).nsgfpp.flow_steps == 2
    from dataclasses import asdict

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert NSGFSettings(**asdict(s)).nsgfpp == s.nsgfpp


def test_moved_image_names_import_from_their_old_module_with_a_deprecation_warning():
    from torchcfm_nsgf.images import methods, registry, unet

    with pytest.warns(DeprecationWarning, match="methods.make_method moved to torchcfm_nsgf.images.registry"):
        assert methods.make_method is registry.make_method
    with pytest.warns(DeprecationWarning, match="moved to torchcfm_nsgf.images.unet"):
        assert methods.build_unet is unet.build_unet


def test_old_nsgfpp_options_reach_the_image_objective():
    from torchcfm_nsgf.images import make_method

    settings = NSGFSettings(nsgfpp=NSGFPlusPlusOptions(flow_steps=2, phase2="ot-source"), refresh_every=3)
    method = make_method("nsgf++", (1, 8, 8), preset="tiny", nsgf=settings)
    m = method.objective.matcher
    assert (m.flow_steps, m.refresh_every, m.path, method.objective.phase2) == (2, 3, "grid", "ot-source")


def test_the_run_length_is_train_steps_and_the_old_names_still_work():
    with pytest.warns(DeprecationWarning, match="'total_steps' is renamed 'train_steps'"):
        config = TrainConfig(total_steps=300)
    assert config.train_steps == 300
    with pytest.warns(DeprecationWarning, match="renamed train_steps"):
        assert config.total_steps == 300
    parser = build_parser("mnist")
    with pytest.warns(DeprecationWarning, match="--total-steps is renamed --train-steps"):
        args = parser.parse_args(["--total-steps", "300"])
    assert args.train_steps == 300
    # a preset does not override the old flag either
    with pytest.warns(DeprecationWarning):
        assert parser.parse_args(["--preset", "quick", "--total-steps", "300"]).train_steps == 300
    assert parser.parse_args(["--preset", "quick"]).train_steps == 800


def test_the_run_flags_are_generated_from_train_config():
    from dataclasses import fields

    from torchcfm_nsgf._cli import field_flag

    parser = build_parser("cifar10")
    flags = {s for a in parser._actions for s in a.option_strings}
    with_flags = [f for f in fields(TrainConfig) if "help" in f.metadata]
    assert {f.name for f in fields(TrainConfig)} - {f.name for f in with_flags} == {
        "dataset",
        "method",
        "sample_steps",
        "nsgf",
    }
    assert {field_flag(f) for f in with_flags} <= flags
    # no flag given: the dataclass's defaults, but the dataset's run length and UNet preset
    config = config_from_args(parser.parse_args([]))
    assert config == TrainConfig(dataset="cifar10", train_steps=400_000, preset="cifar10")
    argv = [
        "--time-budget",
        "5",
        "--unet",
        "tiny",
        "--no-progress",
        "--resume",
        "--ckpt-dir",
        "x",
        "--seed",
        "3",
    ]
    config = config_from_args(parser.parse_args(argv))
    assert (config.time_budget_s, config.preset, config.progress, config.resume, config.seed) == (
        5.0,
        "tiny",
        False,
        True,
        3,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch-size", "0"])
