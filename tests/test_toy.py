"""The 2D task samplers (torchcfm_nsgf.datasets), the exact W2 metric (torchcfm_nsgf.metrics) against closed forms,
and the training harness of the benchmarks (benchmarks/toy_harness.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torchcfm.utils import torch_wrapper

from torchcfm_nsgf import SinkhornFlowMatcher, euler_sample
from torchcfm_nsgf.datasets import TASKS, get_task, sample_checkerboard, sample_scurve
from torchcfm_nsgf.metrics import w2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from toy_harness import make_model, train_flow_matching, train_nsgf, train_nsgfpp  # noqa: E402


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_sample_shapes_and_reproducibility(name: str) -> None:
    task = get_task(name)
    for draw in (task.source, task.target):
        a = draw(50, torch.Generator().manual_seed(3))
        b = draw(50, torch.Generator().manual_seed(3))
        assert a.shape == (50, 2) and a.dtype == torch.float32
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)  # the generator fixes the draw, torchcfm samplers included


def test_seeded_torchcfm_sampler_leaves_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    get_task("8gaussians-moons").target(20, torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.rand(3), expected)


def test_checkerboard_occupies_the_black_squares() -> None:
    x = sample_checkerboard(4000, torch.Generator().manual_seed(0))
    assert x.abs().max() <= 4
    cell = torch.floor(x / 2).long()  # 4 x 4 cells of side 2 on [-4, 4]^2
    assert bool(((cell[:, 0] + cell[:, 1]) % 2 == 0).all())  # one colour only
    assert len({tuple(c) for c in cell.tolist()}) == 8


def test_scurve_lies_near_its_curve() -> None:
    x = sample_scurve(2000, torch.Generator().manual_seed(0), noise=0.0)
    s = torch.asin((x[:, 0] / 1.5).clamp(-1, 1))  # |x| <= 1.5, |y| <= 3 and (x/1.5)^2 + (|y|/1.5 - 1)^2 = 1
    assert x[:, 0].abs().max() <= 1.5 + 1e-5 and x[:, 1].abs().max() <= 3 + 1e-5
    radius = (x[:, 0] / 1.5) ** 2 + (x[:, 1].abs() / 1.5 - 1) ** 2
    torch.testing.assert_close(radius, torch.ones_like(radius), atol=1e-4, rtol=0)
    assert s.numel() == 2000


def test_unknown_task_raises() -> None:
    with pytest.raises(ValueError, match="unknown task 'spirals'"):
        get_task("spirals")


def test_w2_two_point_masses() -> None:
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    assert w2(a, b) == pytest.approx(5.0, abs=1e-12)


def test_w2_shifted_identical_clouds_is_the_shift() -> None:
    # For the squared cost, W2(mu, mu + c) = |c| exactly (the translation is optimal).
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([0.3, -0.4])
    assert w2(x, x + shift) == pytest.approx(0.5, rel=1e-6)  # float32 inputs
    assert w2(x, x[torch.randperm(200)]) == pytest.approx(0.0, abs=1e-9)


def test_w2_two_against_one_point() -> None:
    # Half the mass at distance 1, half at distance 3: W2^2 = (1 + 9) / 2.
    x = torch.tensor([[1.0, 0.0], [-3.0, 0.0]])
    assert w2(x, torch.zeros(1, 2)) == pytest.approx(math.sqrt(5.0), rel=1e-12)


def test_w2_rejects_mismatched_clouds() -> None:
    with pytest.raises(ValueError, match="clouds"):
        w2(torch.zeros(3, 2), torch.zeros(3, 3))


def test_train_flow_matching_needs_one_stop_rule() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        train_flow_matching(make_model(), None, lambda n: None, train_steps=None)
    with pytest.raises(ValueError, match="exactly one"):
        train_flow_matching(make_model(), None, lambda n: None, train_steps=5, time_budget_s=1.0)


def test_short_nsgf_run_in_the_few_step_regime_beats_the_untrained_field() -> None:
    # The default regime (two Sinkhorn steps of size 1): the trained field must beat the untrained one at
    # NFE 1, 2 and 10 by a wide margin.
    torch.manual_seed(0)
    task = get_task("gaussian-moons")
    gen = torch.Generator().manual_seed(0)
    matcher = SinkhornFlowMatcher(refresh_every=20, generator=torch.Generator().manual_seed(1))
    untrained = make_model()
    result = train_nsgf(task, matcher, train_steps=400, generator=gen, batch_size=128)
    assert result.n_opt_steps == 400 and result.train_time_s > 0 and matcher.n_flows == 20
    x0, y = task.source(500, gen), task.target(500, gen)
    for nfe in (1, 2, 10):
        samples, used = result.sample(x0, nfe)
        before = euler_sample(torch_wrapper(untrained), x0, n_steps=nfe).samples
        assert used == nfe and samples.shape == (500, 2)
        assert w2(samples, y) < 0.5 * w2(before, y), nfe
        assert w2(samples, y) < 0.4 * w2(x0, y), nfe


def test_moons_prefix_is_a_fair_sample() -> None:
    # torchdyn's generate_moons returns the upper moon first; the task's target must be shuffled.
    y = get_task("gaussian-moons").target(2000, torch.Generator().manual_seed(0))
    assert (y[:200].mean(0) - y.mean(0)).norm() < 0.3


# --------------------------------------------------------------------------- class-conditional task
def test_labelled_8gaussians_is_torchcfms_distribution_with_its_modes() -> None:
    from torchcfm.utils import sample_8gaussians

    from torchcfm_nsgf.datasets import sample_8gaussians_labelled

    x, y = sample_8gaussians_labelled(4000, torch.Generator().manual_seed(0))
    assert x.shape == (4000, 2) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=8).min() > 400  # uniform over the 8 modes (500 expected)
    torch.manual_seed(1)
    ref = sample_8gaussians(4000)
    # the label is the mode the point was drawn from: torchcfm's mode order, its noise (covariance sqrt(0.1) I)
    assert float((_nearest(x) == y).float().mean()) > 0.99
    for cloud in (x, ref):
        noise = cloud - _centres()[_nearest(cloud)]
        cov = torch.cov(noise.T)
        torch.testing.assert_close(cov, math.sqrt(0.1) * torch.eye(2), atol=0.03, rtol=0)


def _centres() -> torch.Tensor:
    s = 1 / math.sqrt(2)
    return 5 * torch.tensor([[1, 0], [-1, 0], [0, 1], [0, -1], [s, s], [s, -s], [-s, s], [-s, -s]])


def _nearest(x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of torchcfm's 8 centres (its list order), written out independently."""
    return torch.cdist(x, _centres().float()).argmin(1)


def test_conditional_nsgf_on_the_2d_task_samples_each_class_at_its_mode() -> None:
    torch.manual_seed(0)
    task = get_task("gaussian-8gaussians-conditional")
    g = torch.Generator().manual_seed(1)
    field = train_nsgf(task, train_steps=150, generator=g, batch_size=128, width=32)
    y = torch.arange(8).repeat_interleave(25)
    for nfe in (1, 2):
        samples, used = field.sample(torch.randn(200, 2, generator=g), nfe, y=y)
        assert used == nfe
        # a field that ignored the labels would land at the asked mode for about 1 sample in 8
        assert float((_nearest(samples) == y).float().mean()) > 0.75
    with pytest.raises(ValueError, match="y must be integer labels"):
        field.sample(torch.randn(4, 2), 1)


def test_conditional_nsgfpp_on_the_2d_task_builds_label_taking_networks_and_samples_by_class() -> None:
    torch.manual_seed(0)
    task = get_task("gaussian-8gaussians-conditional")
    g = torch.Generator().manual_seed(1)
    model = train_nsgfpp(
        task, train_steps=150, generator=g, batch_size=128, width=32, flow_steps=2, step_size=1.0
    )
    assert model.nets["nsgf"].num_classes == model.nets["straight"].num_classes == 8
    y = torch.arange(8).repeat_interleave(25)
    out = model.sample(torch.randn(200, 2, generator=g), straight_steps=1, y=y)
    assert out.total_nfe == 3
    # a model that ignored the labels would land at the asked mode for about 1 sample in 8
    assert float((_nearest(out.samples) == y).float().mean()) > 0.75


def test_two_dim_example_prints_the_same_table_twice(tmp_path, monkeypatch, capsys) -> None:
    """The README's main job is reproducible: OT-CFM's pairs (NumPy's global RNG in torchcfm) are seeded too."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "two_dim.py"
    spec = importlib.util.spec_from_file_location("example_two_dim", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    tables = []
    for _ in range(2):
        argv = [
            "two_dim.py",
            "--train-steps",
            "40",
            "--n-eval",
            "200",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
        monkeypatch.setattr(sys, "argv", argv)
        example.main()
        rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
        assert [row.split(" |")[0] for row in rows] == ["| method", "| NSGF", "| OT-CFM"]
        tables.append(rows)
    assert tables[0] == tables[1]
