"""The matcher as a composition of its parts: checkpoints of the release before the split resume unchanged,
a call served from the pool reads nothing back from the device, a refresh computes the targets' moments once,
and the coupling's partners are drawn on the data's device."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch

import torchcfm_nsgf.flow as flow_module
import torchcfm_nsgf.matcher as matcher_module
import torchcfm_nsgf.serving as serving
from torchcfm_nsgf import SinkhornCouplingMatcher, SinkhornFlowMatcher, SinkhornOptions
from torchcfm_nsgf.coupling import sample_plan_rows

FIXTURES = Path(__file__).parent / "fixtures"


def _data(seed: int, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, generator=g)
    y1 = torch.arange(n) % 3
    centres = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, 0.0]])
    return x0, centres[y1] + 0.5 * torch.randn(n, 2, generator=g), y1


def _build() -> dict[str, SinkhornFlowMatcher]:
    # the matchers behind tests/fixtures/matcher_v1.pt, built as the code before the split built them
    return {
        "polyline": SinkhornFlowMatcher(
            0.1,
            flow_steps=3,
            path="polyline",
            refresh_every=2,
            flow_size=48,
            generator=torch.Generator().manual_seed(1),
        ),
        "guided": SinkhornFlowMatcher(
            flow_steps=2, refresh_every=3, balanced=True, generator=torch.Generator().manual_seed(2)
        ),
        "coupling": SinkhornCouplingMatcher(refresh_every=2, generator=torch.Generator().manual_seed(3)),
    }


def _digest(name: str, fm: SinkhornFlowMatcher, i: int) -> list[float]:
    x0, x1, y1 = _data(100 + i)
    if name == "guided":
        t, xt, ut, _, y = fm.guided_sample_location_and_conditional_flow(x0, x1, y1=y1)
        extra = [int(y.sum())]
    else:
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        extra = []
    return [float(t.double().sum()), float(xt.double().sum()), float(ut.double().square().sum()), *extra]


# what the code of the release before the split returned after loading the fixture: calls 5 to 8 of each
# matcher (sums of t, of xt, of ut squared, and of the labels)
_RELEASED = {
    "polyline": [
        [15.824650879949331, 16.43191011622548, 368.3397294994991],
        [18.577314242720604, 31.17891075462103, 292.00009795579444],
        [15.794240191578865, 27.56822519004345, 433.6597884115077],
        [16.267923332750797, 10.376012276858091, 448.95496282397994],
    ],
    "guided": [
        [14.760055005550385, 16.436312867328525, 307.8885766687878, 32],
        [14.541428983211517, 12.887042172253132, 317.97783662324457, 32],
        [14.617057025432587, 14.849574036896229, 280.242362036737, 33],
        [15.383744895458221, 6.014964021742344, 318.2576707579755, 32],
    ],
    "coupling": [
        [16.340382635593414, 5.6960818041116, 146.86291526502043],
        [18.1452174782753, 24.312266651540995, 145.9308145267856],
        [17.092904806137085, 13.408673875033855, 150.61382204688482],
        [15.364718616008759, 17.194499630481005, 168.1299383339996],
    ],
}


@pytest.mark.parametrize("name", list(_RELEASED))
def test_states_of_the_release_before_the_split_resume_to_the_same_targets(name):
    # written by the single-class matcher (format 1: no "format" key) after 5 calls; flow_size staging, a
    # polyline, sigma, a balanced guided pool and the coupling's plan draws all go through the resume
    states = torch.load(FIXTURES / "matcher_v1.pt", weights_only=False)
    assert "format" not in states[name]
    fm = _build()[name]
    fm.load_state_dict(states[name])
    got = [_digest(name, fm, 5 + i) for i in range(4)]
    for row, expected in zip(got, _RELEASED[name], strict=True):
        assert row == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_a_state_written_now_resumes_as_the_matcher_that_wrote_it():
    a, b = _build()["polyline"], _build()["polyline"]
    for i in range(5):
        _digest("polyline", a, i)
    b.load_state_dict(a.state_dict())
    assert [_digest("polyline", a, 5 + i) for i in range(3)] == [
        _digest("polyline", b, 5 + i) for i in range(3)
    ]


# ---------------------------------------------------------------------------------------------- host reads
_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")
_POOL_DRAWS = {"_draw_indices", "_draw_balanced"}  # on the pool generator's device: the CPU by default


@pytest.fixture
def host_reads(monkeypatch):
    """Every read of a tensor's value by the host from the package's code, as (function, file) pairs."""
    seen: list[tuple[str, str]] = []
    root = str(Path(matcher_module.__file__).parent)

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(root):
                seen.append((frame.f_code.co_name, Path(frame.f_code.co_filename).name))
            return original(self, *args, **kwargs)

        return wrapper

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    return seen


def _late_everywhere(monkeypatch):
    """Run the matcher on the CPU as on an accelerator: checks of calls served from the pool read late."""
    monkeypatch.setattr(serving, "reads_late", lambda device: True)
    monkeypatch.setattr(matcher_module, "reads_late", lambda device: True)


@pytest.mark.parametrize("guided,flow_size", [(False, None), (True, None), (False, 64)])
def test_a_call_served_from_the_pool_reads_nothing_back(monkeypatch, host_reads, guided, flow_size):
    _late_everywhere(monkeypatch)
    fm = SinkhornFlowMatcher(
        refresh_every=4, flow_size=flow_size, balanced=guided, generator=torch.Generator()
    )
    x0, x1, y1 = _data(0)
    labels = {"y1": y1} if guided else {}

    def call():
        if guided:
            return fm.guided_sample_location_and_conditional_flow(x0, x1, **labels)
        return fm.sample_location_and_conditional_flow(x0, x1)

    call()  # the first call simulates a flow: it reads (the spy sees it)
    assert len(host_reads) > 0
    for _ in range(2):  # then calls from the pool
        host_reads.clear()
        call()
        assert [r for r in host_reads if r[0] not in _POOL_DRAWS] == [], host_reads
        assert all(file == "pool_draws.py" for _, file in host_reads)


def test_late_checks_drop_a_drifted_pool_and_name_bad_data_at_the_next_call(monkeypatch):
    _late_everywhere(monkeypatch)
    fm = SinkhornFlowMatcher(refresh_every=50)
    x0, x1, _ = _data(0, 64)
    fm.sample_location_and_conditional_flow(x0, x1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fm.sample_location_and_conditional_flow(x0, x1 + 100)  # served from the pool; drift decided on device
        assert fm.n_flows == 1 and seen == []
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1 + 100)  # read: pool dropped, new flow
    assert fm.n_flows == 2 and len(seen) == 1 and "reset()" in str(seen[0].message)
    ends = xt + (1 - t)[:, None] * ut
    assert float(ends.mean(0).norm()) > 90  # served from the flow towards the new targets
    fm.sample_location_and_conditional_flow(x0, torch.full_like(x1, float("nan")))  # read at the next call
    with pytest.raises(ValueError, match="x1 of the previous call contained NaN"):
        fm.sample_location_and_conditional_flow(x0, x1 + 100)
    fm.sample_location_and_conditional_flow(x0, x1 + 100)  # the error is given once


def test_on_the_cpu_checks_are_read_at_once(monkeypatch):
    fm = SinkhornFlowMatcher()
    x0, x1, _ = _data(0)
    fm.sample_location_and_conditional_flow(x0, x1)
    with pytest.raises(ValueError, match="x1 contains NaN"):
        fm.sample_location_and_conditional_flow(x0, torch.full_like(x1, float("nan")))


def test_a_refresh_computes_the_targets_moments_once(monkeypatch):
    calls = {"moments": 0, "scale_of": 0}
    moments = flow_module.target_moments

    def counted(*args, **kwargs):
        calls["moments"] += 1
        return moments(*args, **kwargs)

    def scale_of(y):
        calls["scale_of"] += 1
        raise AssertionError("the blur must come from the call's moments")

    monkeypatch.setattr(serving, "target_moments", counted)
    monkeypatch.setattr(SinkhornOptions, "scale_of", staticmethod(scale_of))
    fm = SinkhornFlowMatcher(refresh_every=2)
    x0, x1, _ = _data(0)
    for expected_flows in (1, 1, 2):
        fm.sample_location_and_conditional_flow(x0, x1)
        assert fm.n_flows == expected_flows
    assert calls == {"moments": 3, "scale_of": 0}  # one per call, whether it refreshes or not
    # the blur is the one of the targets' scale, as SinkhornOptions.scale_of would give it
    flat = x1.double()
    assert fm.blur == pytest.approx(
        0.1 * float((flat - flat.mean(0)).square().sum(1).mean().sqrt()), rel=1e-12
    )


# ---------------------------------------------------------------------------------------------- coupling draws
def test_plan_rows_are_reproducible_and_follow_the_plan():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 2, generator=g), torch.randn(4, 2, generator=g)
    pot = torch.randn(4, generator=g)
    xs = x.repeat(4000, 1)
    a = sample_plan_rows(xs, y, pot, 0.5, torch.Generator().manual_seed(1))
    b = sample_plan_rows(xs, y, pot, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # independent reference: the conditional softmax_j((g_j - |x - y_j|^2 / 2) / eps) in float64
    logits = (pot.double() - 0.5 * torch.cdist(x.double(), y.double()).square()) / 0.5
    expected = torch.softmax(logits, 1)
    counts = torch.zeros(3, 4, dtype=torch.float64)
    counts.index_put_(
        (torch.arange(xs.shape[0]) % 3, a), torch.ones(xs.shape[0], dtype=torch.float64), accumulate=True
    )
    assert torch.allclose(counts / 4000, expected, atol=0.03)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plan_rows_on_a_gpu_draw_there_from_a_cpu_generator(monkeypatch):
    devices = []
    rand = torch.rand

    def spy(*args, **kwargs):
        devices.append(torch.device(kwargs.get("device") or "cpu"))
        return rand(*args, **kwargs)

    monkeypatch.setattr(torch, "rand", spy)
    x, y, pot = (
        torch.randn(3000, 2, device="cuda"),
        torch.randn(50, 2, device="cuda"),
        torch.zeros(50, device="cuda"),
    )
    a = sample_plan_rows(x, y, pot, 0.5, torch.Generator().manual_seed(1))
    b = sample_plan_rows(x, y, pot, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.device.type == "cuda"
    assert devices and all(d.type == "cuda" for d in devices)


def test_checks_pending_at_a_checkpoint_are_carried_by_the_state(monkeypatch):
    _late_everywhere(monkeypatch)
    a = SinkhornFlowMatcher(generator=torch.Generator().manual_seed(0))
    x0, x1, _ = _data(0, 64)
    a.sample_location_and_conditional_flow(x0, x1)
    a.sample_location_and_conditional_flow(x0, x1 + 100)  # drift decided, not read yet
    state = a.state_dict()
    assert state["pending"]["drifted"] == 1.0
    b = SinkhornFlowMatcher(generator=torch.Generator())
    b.load_state_dict(copy.deepcopy(state))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the drift warning, read now on both
        out_a = a.sample_location_and_conditional_flow(x0, x1 + 100)
        out_b = b.sample_location_and_conditional_flow(x0, x1 + 100)
    assert a.n_flows == b.n_flows == 2
    for u, v in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["polyline", "grid"])
def test_a_first_format_state_of_another_flow_steps_raises_a_named_error_and_changes_nothing(path):
    states = torch.load(FIXTURES / "matcher_v1.pt", weights_only=False)
    state = states["polyline"]  # written under flow_steps=3: its segments start at 0, 1/3 and 2/3
    fm = SinkhornFlowMatcher(flow_steps=4, path=path, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        x0, x1, _ = _data(i)
        fm.sample_location_and_conditional_flow(x0, x1)
    before = fm.state_dict()
    with pytest.raises(ValueError, match="flow_steps=3.*flow_steps=4"):
        fm.load_state_dict(state)
    after = fm.state_dict()
    assert torch.equal(after["pool"]["t"], before["pool"]["t"]) and after["calls"] == before["calls"]
    SinkhornFlowMatcher(flow_steps=3, path=path).load_state_dict(state)  # the writer's flow_steps loads
    # every segment of a straight pool starts at 0: nothing to read, it loads as before
    SinkhornFlowMatcher(flow_steps=4, path=path).load_state_dict(states["coupling"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["straight", "polyline"])
def test_calls_served_from_the_pool_on_a_gpu_never_synchronise(path):
    def make():
        gen = torch.Generator().manual_seed(0)
        return SinkhornFlowMatcher(0.1, flow_steps=2, path=path, refresh_every=100, generator=gen)

    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(64, 2, generator=g), 2 + torch.randn(64, 2, generator=g)
    y0, y1 = x0.cuda(), x1.cuda()
    fm, twin = make(), make()
    fm.sample_location_and_conditional_flow(y0, y1)  # a flow synchronises
    twin.sample_location_and_conditional_flow(x0, x1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        served = [fm.sample_location_and_conditional_flow(y0, y1) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = [twin.sample_location_and_conditional_flow(x0, x1) for _ in range(3)]
    for (t, xt, ut), (t_cpu, _, _) in zip(served, expected, strict=True):
        assert t.device.type == xt.device.type == ut.device.type == "cuda"
        # the same draws of the same CPU generators as on the CPU: the times agree
        torch.testing.assert_close(t.cpu(), t_cpu)
