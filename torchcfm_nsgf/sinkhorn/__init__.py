r"""The Sinkhorn velocity engine: the empirical velocity of the Sinkhorn Wasserstein gradient flow.

Conventions (GeomLoss's ``p=2``, so that hyper-parameters quoted as ``blur``/``scaling`` transfer):

* cost :math:`c(x, y) = \tfrac12 \|x - y\|^2`, entropic regularisation :math:`\varepsilon = \mathrm{blur}^2`;
* :math:`W_\varepsilon(\mu, \nu) = \min_\pi \int c\,d\pi + \varepsilon\,\mathrm{KL}(\pi \,\|\, \mu\otimes\nu)`
  with dual potentials :math:`(f_{\mu\nu}, g_{\mu\nu})`;
* Sinkhorn divergence :math:`S_\varepsilon(\mu,\nu) = W_\varepsilon(\mu,\nu) - \tfrac12 W_\varepsilon(\mu,\mu)
  - \tfrac12 W_\varepsilon(\nu,\nu)`.

The velocity of the Wasserstein gradient flow of :math:`\mu \mapsto S_\varepsilon(\mu, \nu)` (NSGF paper,
Theorem 1; Feydy et al. 2019, eq. 26) is

.. math::
    v(x) = \nabla f_{\mu\mu}(x) - \nabla f_{\mu\nu}(x)
         = \sum_j w^{\nu}_j(x)\, y_j - \sum_k w^{\mu}_k(x)\, x_k,

with the soft assignments :math:`w^{\nu}_j(x) = \mathrm{softmax}_j(\log b_j + (g_{\mu\nu,j} - c(x, y_j))/\varepsilon)`
and :math:`w^{\mu}_k(x) = \mathrm{softmax}_k(\log a_k + (f_{\mu\mu,k} - c(x, x_k))/\varepsilon)`: the entropic
barycentric projection onto the target minus the projection onto the particles themselves. For uniform
weights this equals :math:`-n \nabla_{x_i} S_\varepsilon(\mu_n, \nu)`.

Only the two potentials that the velocity needs are solved for (the cross problem and the symmetric
problem on the particles); the target's own symmetric problem, which GeomLoss solves for the loss value,
does not enter the velocity.

Solver. Log-domain Sinkhorn, stable for any data scale:

1. ε-scaling: ε runs geometrically from the largest cost in the problem down to ``blur**2`` with ratio
   ``scaling**2`` (GeomLoss's schedule), one Sinkhorn update per level;
2. at ``ε = blur**2`` the updates continue until the marginal error (below) is at most ``tol`` or
   ``max_iter`` iterations have run; the cap raises a :class:`SinkhornConvergenceWarning`.

The cross problem uses alternating (Gauss-Seidel) updates, the symmetric problem the averaged update
:math:`f \leftarrow \tfrac12 (f + T(f))`. The marginal error is the L1 distance between the plan's
marginal and its prescribed weights (a total mass, in [0, 2]), the larger of the two problems'.

With ``warm_start`` (the solution of the previous, nearby flow step) the annealing is skipped and the
iteration starts from the previous potentials: consecutive flow steps barely move the particles.

Layout. The loop above is written once (:mod:`~torchcfm_nsgf.sinkhorn.solver`) against a small backend
interface, the soft-min reductions and barycentric projections (:mod:`~torchcfm_nsgf.sinkhorn.backends`):
``dense`` (cost matrices stored), ``streaming`` (cost recomputed per row tile, linear memory),
``multiscale`` (d <= 3: clusters and kernel truncation, :mod:`~torchcfm_nsgf.sinkhorn.multiscale`) and
``keops`` (:mod:`~torchcfm_nsgf.sinkhorn.keops`, when pykeops is installed); ``"auto"`` picks one by size,
dimension, device and free memory. With ``distributed=True`` the particles of one problem are split over
the processes of ``torch.distributed`` (:mod:`~torchcfm_nsgf.sinkhorn.sharded`).

Why not POT: ``ot.sinkhorn(method="sinkhorn_log")`` has no ε-scaling and solves one problem per call;
at d=2, blur 0.3 it needed 1061 + 231 iterations (4.4 s) where this engine needed 33 + 60 (0.24 s) at
n=256, and did not converge within 60 s at n=1024 (``benchmarks/sinkhorn_engine.py``, BENCHMARKS_HISTORY.md H1). At
large ε (image data, blur 2) it takes 0.9x-2.2x this engine's time.
"""

from .backends import BACKENDS, SinkhornBackend, choose_backend
from .solver import (
    HIGH_DIM_BLUR,
    SinkhornConvergenceWarning,
    SinkhornOptions,
    SinkhornSolution,
    sinkhorn_solve,
    sinkhorn_velocity,
)

__all__ = [
    "BACKENDS",
    "HIGH_DIM_BLUR",
    "SinkhornBackend",
    "SinkhornConvergenceWarning",
    "SinkhornOptions",
    "SinkhornSolution",
    "choose_backend",
    "sinkhorn_solve",
    "sinkhorn_velocity",
]
