"""
One step: the Sinkhorn drift against MeanFlow in 2D
===================================================

Two one-step generators on 8gaussians → moons, each sampled with a single network evaluation (NFE 1):

* a generator ``G(x0)`` (torchcfm's MLP, no time input) trained by :class:`~torchcfm_nsgf.SinkhornDrift`:
  every generated batch moves one step of the Sinkhorn gradient flow towards a data batch, and ``G`` regresses
  the moved batch;
* MeanFlow's average velocity ``u(z, s, t)`` (:class:`~torchcfm_nsgf.MeanFlow`), sampled as
  ``x = x0 + u(x0, 0, 1)``.

Both train for the same number of steps of batch 256, short enough to build with the documentation; the
measured comparison at equal CPU time is in the :doc:`../results`.
"""

import time

import matplotlib.pyplot as plt
import torch
from torchcfm.models import MLP
from torchcfm.utils import sample_8gaussians, sample_moons

from torchcfm_nsgf import AverageVelocityMLP, MeanFlow, SinkhornDrift, meanflow_sample

torch.manual_seed(0)
STEPS, BATCH = 600, 256

# %%
# The Sinkhorn drift: the whole training loop
# -------------------------------------------
# ``drift.loss(x, x1)`` is ``mean((x - sg[x + eta * V(x)])**2)`` with ``V`` the debiased entropic
# barycentric projection onto the data minus the one onto the generated batch.

generator = MLP(dim=2, w=128, time_varying=False)
optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)
drift = SinkhornDrift()  # eta = 1, blur 0.1 of the data's radius
start = time.perf_counter()
for _ in range(STEPS):
    x = generator(sample_8gaussians(BATCH))
    loss = drift.loss(x, sample_moons(BATCH))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"Sinkhorn drift: {STEPS} steps in {time.perf_counter() - start:.1f} s")

# %%
# MeanFlow: the same loop with the average-velocity objective
# -----------------------------------------------------------

average_velocity = AverageVelocityMLP(2, width=128)
optimizer = torch.optim.Adam(average_velocity.parameters(), lr=1e-3)
# the paper's CIFAR-10 time sampler and share of s != t, with the plain squared error: the settings that
# scored best on the 2D tasks (MeanFlow()'s defaults are the paper's ImageNet ones)
meanflow = MeanFlow(unequal_share=0.75, logit_mean=2.0, logit_std=2.0, weight_power=0.0)
start = time.perf_counter()
for _ in range(STEPS):
    loss = meanflow.loss(average_velocity, sample_8gaussians(BATCH), sample_moons(BATCH))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"MeanFlow: {STEPS} steps in {time.perf_counter() - start:.1f} s")

# %%
# One network evaluation each
# ---------------------------

x0 = sample_8gaussians(1000)
with torch.no_grad():
    samples = {
        "Sinkhorn drift, NFE 1": generator(x0),
        "MeanFlow, NFE 1": meanflow_sample(average_velocity, x0, n_steps=1).samples,
    }
target = sample_moons(1000)
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharex=True, sharey=True)
for ax, (name, x1) in zip(axes, samples.items(), strict=True):
    ax.scatter(*target.T, s=2, c="lightgray", label="target")
    ax.scatter(*x1.T, s=3, c="tab:blue", label="generated")
    ax.set_title(name)
    ax.set_aspect("equal")
axes[0].legend(loc="lower left", fontsize=8)
fig.tight_layout()
plt.show()
