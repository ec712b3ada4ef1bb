"""Generate image batches from a trained method and write PNG grids."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torchvision.utils import save_image

from ..sampling import SampleResult
from .methods import ImageMethod

__all__ = ["generate", "save_grid"]


@torch.no_grad()
def generate(
    method: ImageMethod,
    nets: nn.ModuleDict,
    n: int,
    shape: tuple[int, int, int],
    *,
    nfe: int | None = None,
    solver: str = "euler",
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    labels: Tensor | None = None,
    guidance_scale: float | None = None,
) -> SampleResult:
    """Draw ``n`` images from noise ``x0 ~ N(0, I)`` (seeded, drawn on the CPU so any device agrees).

    Parameters
    ----------
    method : ImageMethod
    nets : nn.ModuleDict
        The networks to sample with (usually the EMA); put in eval mode.
    n : int
        Number of images.
    shape : (C, H, W)
    nfe : int, optional
        Step budget passed to ``method.sample`` (its default when None).
    solver : str
    batch_size : int
        Images per sampler call.
    seed : int
    device : torch.device or str, optional
        Where the sampler runs; default: the device of ``nets``' parameters.
    labels : Tensor, optional
        Class of each image, shape ``(n,)``, for a class-conditional method (required by one).
    guidance_scale : float, optional
        Classifier-free guidance scale (a method trained with label dropout); the NFE then counts two
        network calls per guided step.

    Returns
    -------
    SampleResult
        ``samples`` of shape ``(n, C, H, W)`` in ``[-1, 1]`` (clamped) on the CPU; ``nfe``, the breakdown
        per network along one trajectory (the same for every batch: they must agree).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != (n,)):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor of shape ({n},), one class per image, got {shape}")
    if device is None:
        device = next((p.device for p in nets.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    nets.eval()
    chunks, nfe_seen = [], None
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x0 = torch.randn((b, *shape), generator=gen).to(device)
        if labels is None and guidance_scale is None:
            out = method.sample(nets, x0, nfe=nfe, solver=solver)
        else:
            y = None if labels is None else labels[start : start + b].to(device)
            out = method.sample(nets, x0, nfe=nfe, solver=solver, y=y, guidance_scale=guidance_scale)
        if nfe_seen is not None and out.nfe != nfe_seen:
            raise RuntimeError(
                f"the sampler used {out.nfe} evaluations on one batch and {nfe_seen} on another"
            )
        nfe_seen = out.nfe
        chunks.append(out.samples.clamp(-1.0, 1.0).cpu())
    return SampleResult(samples=torch.cat(chunks), nfe=dict(nfe_seen))


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None) -> None:
    """Write ``images`` ``(B, C, H, W)`` in ``[-1, 1]`` as one PNG grid (torchvision ``save_image``).

    ``nrow`` images per row (default ``ceil(sqrt(B))``); 2-pixel padding between images.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(
            f"images must be a (B, C, H, W) tensor, got {getattr(images, 'shape', type(images))}"
        )
    if nrow is None:
        nrow = max(1, int(torch.ceil(torch.sqrt(torch.tensor(float(images.shape[0])))).item()))
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    save_image(images.float(), os.fspath(path), nrow=nrow, padding=2, normalize=True, value_range=(-1.0, 1.0))
