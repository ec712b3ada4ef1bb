"""Class-conditional NSGF++ and networks: labels reach every network, pairs stay within their class, NFE."""

from __future__ import annotations

import math

import pytest
import torch
from _spies import LabelSpy
from torch import nn

from torchcfm_nsgf import (
    PHASE2_VARIANTS,
    NSGFPlusPlus,
    NSGFPlusPlusObjective,
    SinkhornFlowMatcher,
    SinkhornOptions,
    TimePredictorCNN,
    TimePredictorMLP,
    VelocityMLP,
)
from torchcfm_nsgf.nsgfpp import PREDICTOR_VARIANTS

CENTRES = torch.tensor([[-8.0, 0.0], [8.0, 0.0]])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(n: int = 400, seed: int = 0):
    g = _gen(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    return torch.randn(n, 2, generator=g), CENTRES[y] + 0.5 * torch.randn(n, 2, generator=g), y


def _model(phase2: str, seed: int = 0) -> NSGFPlusPlus:
    torch.manual_seed(seed)
    return NSGFPlusPlus(
        VelocityMLP(2, 16, num_classes=2),
        TimePredictorMLP(2, 16, num_classes=2) if phase2 in PREDICTOR_VARIANTS else None,
        VelocityMLP(2, 16, num_classes=2),
        phase2=phase2,
        flow_steps=2,
        step_size=1.0,
        sinkhorn=SinkhornOptions(blur=0.5, relative_blur=False),
        refresh_every=2,
        generator=_gen(seed),
    )


@pytest.mark.parametrize("phase2", PHASE2_VARIANTS)
def test_2d_conditional_nsgfpp_trains_and_labels_reach_every_network(phase2):
    src, tgt, labels = _data()
    model = _model(phase2)
    history = model.fit(src, tgt, 3, batch_size=32, target_labels=labels)
    assert all(len(v) == 3 and all(math.isfinite(x) for x in v) for v in history.values())
    spies = nn.ModuleDict({k: LabelSpy(v) for k, v in model.nets.items()})
    y = torch.tensor([0, 1, 1, 0, 1])
    for solver, steps in (("euler", 3), ("dopri5", None)):
        for spy in spies.values():
            spy.labels.clear()
        out = model.objective.sample(
            spies, torch.randn(5, 2, generator=_gen(1)), solver=solver, straight_steps=steps, y=y
        )
        calls = {k: len(s.labels) for k, s in spies.items()}
        assert out.nfe == {"predictor": 0, **calls}
        assert all(seen is y for spy in spies.values() for seen in spy.labels)
    # without the labels the class-conditional networks refuse to run
    with pytest.raises(ValueError, match="y must be integer labels"):
        model.sample(torch.randn(5, 2))
    # the trainer passes the labels as well
    assert model.sample(torch.randn(5, 2), y=y, straight_steps=2).samples.shape == (5, 2)


def test_training_calls_give_each_network_the_class_of_its_item():
    """The NSGF field sees the served rows' classes, the straight flow and predictor their segments' classes."""
    x0, x1, y1 = _data(64, seed=3)
    for phase2 in PHASE2_VARIANTS:
        matcher = SinkhornFlowMatcher(
            flow_steps=1,
            sinkhorn=SinkhornOptions(blur=0.5, relative_blur=False),
            pool=None,
            generator=_gen(2),
        )
        objective = NSGFPlusPlusObjective(matcher, phase2=phase2, generator=_gen(3), endpoints="simulated")
        seen = {}

        def recorder(name, seen=seen):
            def field(*args, y=None):
                x = args[1] if len(args) == 2 else args[0]
                seen[name] = (x.detach(), y)
                return x * 0.0 + 0.0 * x.sum() if len(args) == 2 else torch.zeros(len(x))

            return field

        nets = {k: recorder(k) for k in objective.net_names}
        objective.losses(nets, x0, x1, y1)
        for name, (x, given) in seen.items():
            assert given is not None and given.shape == (x.shape[0],), name
        # the NSGF field's rows sit on their class's side (step 1 of size 1: near the class's centre at t = 1)
        _, served = seen["nsgf"]
        assert torch.equal(torch.sort(served).values, torch.sort(y1).values)
        if phase2 in ("ot", "ot-source"):
            # straight-flow segments start at phase-1 end points of their class: near that class's centre
            xs, served = seen["straight"]
            assert bool((xs[:, 0].sign() == (2 * served - 1).float()).all())


@pytest.mark.parametrize("phase2", ["ot", "ot-source"])
def test_ot_pairs_join_end_points_and_data_of_the_same_class(phase2):
    x0, x1, y1 = _data(48, seed=4)
    matcher = SinkhornFlowMatcher(
        flow_steps=1, sinkhorn=SinkhornOptions(blur=0.5, relative_blur=False), pool=None, generator=_gen(5)
    )
    objective = NSGFPlusPlusObjective(matcher, phase2=phase2, generator=_gen(6), endpoints="simulated")
    a, b, y = objective.phase2_pairs(x0, x1, y1)
    assert torch.equal(torch.bincount(y), torch.bincount(y1))  # the batch's class counts
    assert bool(((b - CENTRES[y]).norm(dim=1) < 3).all())  # the data end is of the pair's class
    assert bool(((a - CENTRES[y]).norm(dim=1) < 3).all())  # so is the phase-1 end point
    # every data point is used once (the within-class plans are permutations)
    assert len({tuple(r.tolist()) for r in b}) == 48
    if phase2 == "ot-source":
        # the end points are the call's own: the guided flow of (x0, x1) with source i in class y1[i]
        own = matcher.simulate_guided(x0, x1, y1, y0=y1)[0].xs[-1]
        torch.testing.assert_close(
            a[torch.argsort(a[:, 0])], own[torch.argsort(own[:, 0])], atol=1e-5, rtol=0
        )
        assert objective.n_endpoints == 0  # no buffer
        with pytest.raises(ValueError, match="same batch size"):
            objective.phase2_pairs(x0[:40], x1, y1)
        return
    state = objective.state_dict()
    copy = NSGFPlusPlusObjective(matcher, phase2="ot", generator=_gen(6), endpoints="simulated")
    copy.load_state_dict(state)
    assert torch.equal(copy.buffer.labels, objective.buffer.labels)
    with pytest.raises(ValueError, match="y1 must be given"):
        objective.phase2_pairs(x0, x1)


def test_conditional_networks_use_their_labels_and_keep_the_unconditional_layout():
    torch.manual_seed(0)
    net = VelocityMLP(2, 16, num_classes=3)
    x, t = torch.randn(4, 2), torch.rand(4)
    a = net(t, x, y=torch.tensor([0, 0, 0, 0]))
    b = net(t, x, y=torch.tensor([2, 2, 2, 2]))
    assert not torch.allclose(a, b)
    assert list(VelocityMLP(2, 16).state_dict()) == [
        "mlp.net.0.weight",
        "mlp.net.0.bias",
        "mlp.net.2.weight",
        "mlp.net.2.bias",
        "mlp.net.4.weight",
        "mlp.net.4.bias",
        "mlp.net.6.weight",
        "mlp.net.6.bias",
    ]
    cnn = TimePredictorCNN(1, 8, num_classes=10)
    tau = cnn(torch.randn(2, 1, 28, 28), torch.tensor([3, 4]))
    assert tau.shape == (2,) and bool(((tau >= 0) & (tau <= 1)).all())
    with pytest.raises(ValueError, match=r"y must lie in \[0, 3\)"):
        net(t, x, y=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="y must be None"):
        VelocityMLP(2, 8)(t, x, y=torch.zeros(4, dtype=torch.long))
