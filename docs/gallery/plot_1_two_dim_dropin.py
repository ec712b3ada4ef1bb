"""
The drop-in loop: NSGF against OT-CFM in 2D
===========================================

torchcfm's training loop on 8gaussians → moons, run twice with only the matcher changed:
:class:`~torchcfm_nsgf.SinkhornFlowMatcher` (NSGF at its defaults) and torchcfm's exact OT-CFM matcher.
Both fields are then integrated with torchdyn's Euler solver at 2 steps, and the trajectories are drawn.

The run is short so that it builds with the documentation (1000 steps, a width-64 MLP); the measured
comparison, with more steps and seeds, is in the :doc:`../results`.
"""

import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher
from torchcfm.models import MLP
from torchcfm.utils import sample_8gaussians, sample_moons, torch_wrapper
from torchdyn.core import NeuralODE

from torchcfm_nsgf import SinkhornFlowMatcher

torch.manual_seed(0)
np.random.seed(0)  # noqa: NPY002 - torchcfm's exact OT matcher draws its pairs from NumPy's global RNG


def train(FM, steps=1000, batch=256):
    """torchcfm's canonical loop; ``FM`` is the only thing that differs between the two runs."""
    model = MLP(dim=2, time_varying=True, w=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x0, x1 = sample_8gaussians(batch), sample_moons(batch)
        t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)
        loss = torch.mean((model(torch.cat([xt, t[:, None]], dim=-1)) - ut) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


matchers = {
    "NSGF (SinkhornFlowMatcher())": SinkhornFlowMatcher(),
    "OT-CFM (exact minibatch OT)": ExactOptimalTransportConditionalFlowMatcher(sigma=0.0),
}
models = {}
for name, FM in matchers.items():
    start = time.perf_counter()
    models[name] = train(FM)
    print(f"{name}: trained in {time.perf_counter() - start:.1f} s")

nsgf = matchers["NSGF (SinkhornFlowMatcher())"]
print(f"NSGF matcher: {nsgf.n_calls} calls served from {nsgf.n_flows} simulated flows")

# %%
# Sample both fields with torchdyn (Euler, 2 steps) and draw the trajectories
# ---------------------------------------------------------------------------
# NSGF's field was trained on straight segments from each particle to the end of its short Sinkhorn
# flow, so few steps suffice.

x0 = sample_8gaussians(512)
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharex=True, sharey=True)
for ax, (name, model) in zip(axes, models.items(), strict=True):
    node = NeuralODE(torch_wrapper(model), solver="euler")
    with torch.no_grad():
        traj = node.trajectory(x0, t_span=torch.linspace(0, 1, 3))  # (3, 512, 2): 2 Euler steps
    ax.plot(traj[:, :, 0], traj[:, :, 1], color="olive", alpha=0.15, lw=0.8)
    ax.scatter(*sample_moons(512).T, s=2, c="lightgray", label="target")
    ax.scatter(*traj[0].T, s=3, c="black", label="x0")
    ax.scatter(*traj[-1].T, s=3, c="tab:blue", label="x1 after 2 steps")
    ax.set_title(name)
    ax.set_aspect("equal")
axes[0].legend(loc="lower left", fontsize=8)
fig.tight_layout()
plt.show()
