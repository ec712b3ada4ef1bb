"""
Images: samples from a tiny run
===============================

The matcher on image-shaped data, at a size that trains in seconds on a CPU. MNIST cannot be downloaded
while the documentation builds, so this example makes its own set of 10 × 10 glyphs (a bar, a cross or a
frame at a random place, pixels in [-1, 1]); the real MNIST samples, from the benchmark runs, are on the
:doc:`../results` page.

``SinkhornFlowMatcher()`` sees samples of shape ``(1, 10, 10)``: with more than 16 features per sample its
default relative blur is 0.05 (0.1 for 2D data). The network here is an MLP on the flattened pixels; the
image examples of the repository (``examples/mnist.py``) use torchcfm's UNet.
"""

import matplotlib.pyplot as plt
import torch

from torchcfm_nsgf import SinkhornFlowMatcher, VelocityMLP, odeint_sample

torch.manual_seed(0)
S = 10  # image side


def glyphs(n, generator):
    """n images (n, 1, S, S) in [-1, 1]: a horizontal bar, a vertical bar, a cross or a frame."""
    img = -torch.ones(n, 1, S, S)
    kind = torch.randint(4, (n,), generator=generator)
    r, c = torch.randint(2, S - 2, (2, n), generator=generator)
    for i in range(n):
        if kind[i] in (0, 2):
            img[i, 0, r[i], 1:-1] = 1.0
        if kind[i] in (1, 2):
            img[i, 0, 1:-1, c[i]] = 1.0
        if kind[i] == 3:
            lo, hi = min(r[i], c[i]) - 1, max(r[i], c[i]) + 1
            img[i, 0, lo, lo : hi + 1] = img[i, 0, hi, lo : hi + 1] = 1.0
            img[i, 0, lo : hi + 1, lo] = img[i, 0, lo : hi + 1, hi] = 1.0
    return img


data = glyphs(4000, torch.Generator().manual_seed(0))

FM = SinkhornFlowMatcher()
net = VelocityMLP(S * S, width=512)


def field(t, x, *args, **kwargs):
    """The MLP on flattened pixels, as a field on images (bs, 1, S, S)."""
    return net(t, x.flatten(1)).view_as(x)


optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
for _ in range(3000):
    x1 = data[torch.randint(len(data), (128,))]
    x0 = torch.randn_like(x1)
    t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1)
    loss = torch.mean((field(t, xt) - ut) ** 2)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"blur {FM.blur:.3f} (absolute), {FM.n_flows} flows for {FM.n_calls} calls")

# %%
# Training images and generated images
# ------------------------------------
# 12 images of the training set, then 12 generated from the same noise with 2 and with 20 Euler steps
# (:func:`~torchcfm_nsgf.odeint_sample`).

noise = torch.randn(12, 1, S, S)
rows = [data[:12]]
with torch.no_grad():
    for nfe in (2, 20):
        rows.append(odeint_sample(field, noise, solver="euler", n_steps=nfe).samples.clamp(-1, 1))
fig, axes = plt.subplots(3, 12, figsize=(9, 2.6))
for ax, img in zip(axes.flat, torch.cat(rows), strict=True):
    ax.imshow(img[0], cmap="gray", vmin=-1, vmax=1)
    ax.set_axis_off()
fig.suptitle("rows: training images; generated at NFE 2; generated at NFE 20")
fig.tight_layout()
plt.show()
