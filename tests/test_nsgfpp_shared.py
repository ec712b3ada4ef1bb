"""NSGF++ with one network for both phases (``network="shared"``): the same losses and samples as two views of
the network used separately, in one network call per training step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchcfm_nsgf import NSGFPlusPlus, NSGFPlusPlusObjective, NSGFPlusPlusOptions, SinkhornOptions
from torchcfm_nsgf.networks import TimePredictorMLP, VelocityMLP
from torchcfm_nsgf.nsgfpp.shared import PHASE1_TIME_SHIFT, PhaseOneView, fused_field_losses

SINKHORN = SinkhornOptions(blur=0.5, relative_blur=False, scaling=0.5)


class Counting(nn.Module):
    """``net`` that counts its calls and records the times it was given."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls, self.times = net, 0, []

    def forward(self, t, x, **kw):
        self.calls += 1
        self.times.append(torch.as_tensor(t).detach().clone())
        return self.net(t, x, **kw)


class Labelled(nn.Module):
    """A 2D field that also reads class labels (an embedding added to the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.emb = VelocityMLP(2, width=16), nn.Embedding(4, 2)

    def forward(self, t, x, y=None):
        return self.net(t, x) + (0 if y is None else self.emb(y))


def _objective(network: str, seed: int = 0, **kw) -> NSGFPlusPlusObjective:
    options = NSGFPlusPlusOptions(flow_steps=2, network=network, pool_capacity=256, refresh_every=3)
    return NSGFPlusPlusObjective.from_options(
        options, sinkhorn=SINKHORN, generator=torch.Generator().manual_seed(seed), **kw
    )


def _batches(step: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g) * 0.5 + 3.0


def test_the_phase_one_view_reads_the_network_at_shifted_times():
    torch.manual_seed(0)
    net = VelocityMLP(2, width=16).double()
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    view = PhaseOneView(net)
    torch.testing.assert_close(view(t, x), net(t - 2.0, x), rtol=0, atol=0)
    torch.testing.assert_close(view(0.25, x), net(torch.full((5,), 0.25 - 2.0, dtype=x.dtype), x))
    assert list(view.parameters()) == list(net.parameters())  # no parameters of its own
    assert PHASE1_TIME_SHIFT == 2.0


@pytest.mark.parametrize("labels", [False, True])
def test_fused_losses_equal_two_separate_calls_in_float64(labels):
    torch.manual_seed(1)
    net = (Labelled() if labels else VelocityMLP(2, width=16)).double()
    k, n = 3, 7
    t, s = torch.rand(k, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    xt, ut, xs, us = (torch.randn(m, 2, dtype=torch.float64) for m in (k, k, n, n))
    yt, ys = (torch.randint(0, 4, (k,)), torch.randint(0, 4, (n,))) if labels else (None, None)
    kw_t, kw_s = ({"y": yt}, {"y": ys}) if labels else ({}, {})
    counted = Counting(net)
    fused = fused_field_losses(counted, (t, xt, ut, yt), (s, xs, us, ys))
    assert counted.calls == 1
    torch.testing.assert_close(fused[0], ((net(t - 2.0, xt, **kw_t) - ut) ** 2).mean())
    torch.testing.assert_close(fused[1], ((net(s, xs, **kw_s) - us) ** 2).mean())
    with pytest.raises(ValueError, match="labels"):
        fused_field_losses(net, (t, xt, ut, yt), (s, xs, us, None if labels else torch.zeros(n).long()))
    with pytest.raises(ValueError, match="x's shape"):
        fused_field_losses(lambda t, x: x[:, :1], (t, xt, ut, None), (s, xs, us, None))


@pytest.mark.parametrize("phase2", ["ot", "paper"])
def test_shared_training_equals_the_views_trained_separately(phase2):
    """The shared objective's losses and gradients equal those of the separate objective given the network's
    two views (same generators, same batches), from one network call per step."""
    torch.manual_seed(2)
    net = VelocityMLP(2, width=16)
    predictor = TimePredictorMLP(2, width=8) if phase2 == "paper" else None
    options = dict(phase2=phase2)
    shared = NSGFPlusPlusObjective.from_options(
        NSGFPlusPlusOptions(flow_steps=2, network="shared", pool_capacity=256, refresh_every=3, **options),
        sinkhorn=SINKHORN,
        generator=torch.Generator().manual_seed(0),
    )
    separate = NSGFPlusPlusObjective.from_options(
        NSGFPlusPlusOptions(flow_steps=2, pool_capacity=256, refresh_every=3, **options),
        sinkhorn=SINKHORN,
        generator=torch.Generator().manual_seed(0),
    )
    assert shared.net_names == (("field", "predictor") if predictor else ("field",))
    counted = Counting(net)
    nets_shared = {"field": counted} | ({"predictor": predictor} if predictor else {})
    nets_separate = {"nsgf": PhaseOneView(net), "straight": net} | (
        {"predictor": predictor} if predictor else {}
    )
    for step in range(4):
        x0, x1 = _batches(step)
        before = counted.calls
        a = shared.losses(nets_shared, x0, x1)
        assert counted.calls == before + 1  # both phases in one call
        b = separate.losses(nets_separate, x0, x1)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key])
        ga = torch.autograd.grad(sum(a.values()), list(net.parameters()))
        gb = torch.autograd.grad(sum(b.values()), list(net.parameters()))
        for u, v in zip(ga, gb, strict=True):
            torch.testing.assert_close(u, v)
    # the network saw phase-1 times in [-2, -1) and phase-2 times in [0, 1) in the same call
    times = counted.times[-1]
    k = round(shared.phase1_batch_fraction * 24)
    assert ((times[:k] >= -2) & (times[:k] < -1)).all() and ((times[k:] >= 0) & (times[k:] <= 1)).all()


def test_shared_sampling_integrates_both_phases_with_the_one_network():
    torch.manual_seed(3)
    net = VelocityMLP(2, width=16)
    shared, separate = _objective("shared"), _objective("separate")
    x0 = torch.randn(9, 2)
    a = shared.sample({"field": net}, x0, straight_steps=3)
    b = separate.sample({"nsgf": PhaseOneView(net), "straight": net}, x0, straight_steps=3)
    torch.testing.assert_close(a.samples, b.samples)
    assert a.nfe == b.nfe == {"nsgf": 2, "predictor": 0, "straight": 3}
    # by hand: two Euler steps of the phase-1 view (dt 1/2), three of the network (dt 1/3)
    x = x0.clone()
    with torch.no_grad():
        for i in range(2):
            x = x + 0.5 * net(torch.full((9,), i / 2 - 2.0), x)
        for i in range(3):
            x = x + net(torch.full((9,), i / 3), x) / 3
    torch.testing.assert_close(a.samples, x)


def test_network_endpoints_come_from_the_phase_one_view():
    torch.manual_seed(4)
    net = Counting(VelocityMLP(2, width=16))
    objective = NSGFPlusPlusObjective.from_options(
        NSGFPlusPlusOptions(flow_steps=1, network="shared", endpoints="network", refresh_every=2),
        sinkhorn=SINKHORN,
        generator=torch.Generator().manual_seed(0),
    )
    x0, x1 = _batches(0)
    objective.losses({"field": net}, x0, x1)
    # the refresh's Euler step (no grad) and the training call
    assert net.calls == 2 and torch.all(net.times[0] == -2.0)
    with torch.no_grad():
        expected = x0 + net.net(torch.full((24,), -2.0), x0)
    stored = objective.buffer.items
    torch.testing.assert_close(torch.sort(stored, 0).values, torch.sort(expected, 0).values)


def test_a_shared_objective_names_what_it_misses_and_the_options_check_the_value():
    with pytest.raises(ValueError, match=r"needs \['field'\]"):
        _objective("shared").losses({"nsgf": VelocityMLP(2), "straight": VelocityMLP(2)}, *_batches(0))
    with pytest.raises(ValueError, match="network must be one of"):
        NSGFPlusPlusOptions(network="both")
    with pytest.raises(ValueError, match="network='shared' is not available in NSGFPlusPlus"):
        NSGFPlusPlus(VelocityMLP(2), None, VelocityMLP(2), network="shared")
    assert NSGFPlusPlusOptions().network == "separate"


# --------------------------------------------------------------------------- the image loop


def _image_config(tmp_path, ckpt: str, network: str = "shared", **kw):
    from torchcfm_nsgf.images import TrainConfig

    base = dict(
        dataset="mnist", data_root=str(tmp_path / "data"), method="nsgf++", train_steps=4, batch_size=4,
        preset="tiny", warmup=2, ckpt_every=2, progress=False, ema_decay=0.9, device="cpu",
        ckpt_dir=str(tmp_path / ckpt),
    )  # fmt: skip
    c = TrainConfig(**{**base, **kw})
    s = c.nsgf
    s.pool_capacity, s.refresh_every = 64, 2
    s.nsgfpp = s.nsgfpp.replace(network=network)
    s.sinkhorn = SinkhornOptions(blur=5.0, relative_blur=False, scaling=0.5)
    return c


@pytest.mark.filterwarnings("ignore:ema_decay=0.9 averages:UserWarning")
def test_the_image_loop_trains_one_unet_resumes_exactly_and_samples(tmp_path):
    from _fake_datasets import write_fake_mnist

    from torchcfm_nsgf.images import generate, train
    from torchcfm_nsgf.images.checkpoint import load_checkpoint

    write_fake_mnist(tmp_path / "data", n_train=32, n_test=8)

    def config(ckpt: str, **kw):
        return _image_config(tmp_path, ckpt, **kw)

    torch.set_num_threads(1)
    whole = train(config("a"))
    assert list(whole.method.nets) == ["field"] and all(torch.isfinite(torch.tensor(whole.losses)))
    killed = train(config("b", stop_after=3))
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 2 and killed.step == 3
    resumed = train(config("b", resume=True))
    assert resumed.losses == whole.losses[2:]
    for k, v in whole.ema.state_dict().items():
        assert torch.equal(v, resumed.ema.state_dict()[k]), k
    out = generate(resumed.method, resumed.ema, 3, resumed.shape, nfe=4)
    assert out.nfe == {"nsgf": 1, "predictor": 0, "straight": 3} and torch.isfinite(out.samples).all()


@pytest.mark.filterwarnings("ignore:ema_decay=0.9 averages:UserWarning")
def test_a_run_resumes_only_with_its_own_network_setting(tmp_path):
    """A checkpoint of one network setting is refused under the other, by name; a checkpoint written before
    the option existed (no setting stored) is one of a network per phase."""
    from _fake_datasets import write_fake_mnist

    from torchcfm_nsgf.images import ConfigError, train
    from torchcfm_nsgf.images.checkpoint import atomic_save, load_checkpoint

    write_fake_mnist(tmp_path / "data", n_train=32, n_test=8)
    torch.set_num_threads(1)
    train(_image_config(tmp_path, "run", "separate", train_steps=2))
    with pytest.raises(ConfigError, match="nsgfpp.network: checkpoint 'separate' vs now 'shared'"):
        train(_image_config(tmp_path, "run", "shared", train_steps=3, resume=True))
    path = tmp_path / "run" / "checkpoint.pt"
    old = load_checkpoint(path)
    del old["settings"]["nsgfpp.network"]  # as written before the option existed
    atomic_save(old, path)
    with pytest.raises(ConfigError, match="nsgfpp.network: checkpoint 'separate' vs now 'shared'"):
        train(_image_config(tmp_path, "run", "shared", train_steps=3, resume=True))
    assert train(_image_config(tmp_path, "run", "separate", train_steps=3, resume=True)).step == 3
