r"""The Sinkhorn drift: train a one-step generator by the Sinkhorn gradient flow of its own samples.

A generator :math:`G` maps noise :math:`z` to samples :math:`x = G(z)`, a cloud :math:`q`. Every sample is moved
one explicit-Euler step of the Sinkhorn Wasserstein gradient flow towards a data batch :math:`p`, and the
generator is regressed onto the moved samples (W-Flow, Han et al., arXiv 2605.11755; Drifting models, Deng et
al., arXiv 2602.04770):

.. math::
    V(x) = T_{q\to p}(x) - T_{q\to q'}(x), \qquad
    \mathcal L = \operatorname{mean} \big\| G(z) - \operatorname{sg}\big[G(z) + \eta\, V(G(z))\big] \big\|^2,

where :math:`T_{a\to b}(x) = \sum_j w_j(x)\, b_j` is the entropic barycentric projection of :math:`x` onto the
batch :math:`b` (the soft assignment of the entropic OT plan between :math:`a` and :math:`b`), ``sg`` stops the
gradient and :math:`\eta` is the step. The gradient of the loss with respect to the generator's parameters is
:math:`-\tfrac{2\eta}{N} \sum_i V(x_i)^\top \partial x_i / \partial\theta` (:math:`N` the number of entries): the
generator moves its samples along the flow.

The self term :math:`T_{q\to q'}` debiases the projection onto the data (Sinkhorn divergence rather than
:math:`W_\varepsilon`); three choices (``self_term``):

* ``"same"``: :math:`q' = q`, the engine's debiased velocity :func:`~torchcfm_nsgf.sinkhorn_velocity` on the
  same batch, :math:`V = \nabla f_{qq} - \nabla f_{qp}` (NSGF's velocity; :math:`V(x_i) = -n\nabla_{x_i}
  S_\varepsilon(q_n, p)`);
* ``"independent"``: :math:`q'` a second generated batch that the caller passes (``x_self``), W-Flow's choice;
* ``"none"``: no self term, :math:`V(x) = T_{q\to p}(x) - x` (the gradient of :math:`W_\varepsilon` alone,
  which pulls samples towards the inside of the data's hull).

Conventions are the engine's (:mod:`torchcfm_nsgf.sinkhorn`): cost :math:`\tfrac12\|x - y\|^2`,
:math:`\varepsilon = \mathrm{blur}^2`, the blur relative to the data batch's root-mean-square radius unless
``SinkhornOptions(relative_blur=False)``. With class labels every generated sample of class ``c`` sees only
the data (and self) samples of class ``c``: one solve per class, the blur resolved once against the whole
data batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._validation import check_cloud, check_labels, check_same_device, check_same_features
from .sinkhorn import SinkhornOptions

__all__ = ["SELF_TERMS", "SinkhornDrift"]

#: The choices of ``SinkhornDrift(self_term=...)``.
SELF_TERMS: tuple[str, ...] = ("same", "independent", "none")

StepSize = float | Sequence[float] | Callable[[int], float]

_STATE_KEYS = frozenset({"kind", "calls"})


class SinkhornDrift:
    r"""Regression targets that move a generated batch one Sinkhorn-flow step towards a data batch.

    Parameters
    ----------
    step_size : float, sequence of floats or callable
        The step :math:`\eta` of the drift. A number is used at every call; a sequence gives the step of
        call ``k`` (counted by :attr:`n_calls`) and its last value afterwards; a callable ``step_size(k)``
        is evaluated at every call. Positive and finite. Default 1: with :math:`\eta = 1` the target is the
        debiased entropic OT map of the batch (the discrete Sinkhorn flow converges in two or three such
        steps). The loss's gradient is :math:`-2\eta V / N`: under Adam, which normalises the gradient's scale,
        a constant :math:`\eta` changes nothing (measured on the 2D tasks: η = 0.5, 1 and 2 scored alike), so
        η matters under SGD-type optimisers and through a schedule.
    sinkhorn : SinkhornOptions, optional
        Blur (relative to the data batch's scale by default), ε-scaling ratio, tolerance, iteration cap,
        over-relaxation, backend and ``distributed`` (sharded solves over the processes of
        ``torch.distributed``: every process passes its own generated and data samples, the data (and
        independent self samples) of all processes form the target, the relative blur is taken on all
        processes' data, and with labels every process must hold the same classes). Default
        ``SinkhornOptions(scaling=0.5, tol=0.1)``, blur 0.1 of the data's radius: the targets are minibatch
        estimates renewed at every step, so cheap solves buy more steps; at equal CPU time on the 2D tasks
        this trained generators at least as good as scaling 0.9 and better than tol 1e-2 or 1e-3
        (``benchmarks/one_step.py``).
    self_term : {"same", "independent", "none"}
        Which projection debiases the projection onto the data (see the module docstring).

    Attributes
    ----------
    n_calls : int
        Calls of :meth:`targets` (and so of :meth:`loss`) so far: the step counter of a scheduled
        ``step_size``. Nothing else is kept between calls.

    Examples
    --------
    >>> drift = SinkhornDrift()
    >>> x = generator(z)                      # (n, *dim), with grad
    >>> loss = drift.loss(x, x1)              # x1: a data batch (m, *dim)
    >>> loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        step_size: StepSize = 1.0,
        *,
        sinkhorn: SinkhornOptions | None = None,
        self_term: str = "same",
    ) -> None:
        if sinkhorn is None:
            sinkhorn = SinkhornOptions(scaling=0.5, tol=0.1)
        if not isinstance(sinkhorn, SinkhornOptions):
            raise TypeError(f"sinkhorn must be a SinkhornOptions, got {type(sinkhorn).__name__}")
        if self_term not in SELF_TERMS:
            raise ValueError(f"self_term must be one of {SELF_TERMS}, got {self_term!r}")
        self._steps = _StepSchedule(step_size)
        self.step_size = step_size
        self.sinkhorn = sinkhorn
        self.self_term = self_term
        self.n_calls = 0

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Set the step counter back to zero (a fresh drift)."""
        self.n_calls = 0

    def state_dict(self) -> dict:
        """The step counter, the only state (``{"kind": "SinkhornDrift", "calls": n}``)."""
        return {"kind": type(self).__name__, "calls": self.n_calls}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned; a ``ValueError`` on any other dict."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from SinkhornDrift.state_dict, got {type(state).__name__}")
        if set(state) != _STATE_KEYS or state.get("kind") != type(self).__name__:
            raise ValueError(
                f"state is not a SinkhornDrift state (keys {sorted(state)}, kind {state.get('kind')!r}); "
                f"expected the keys {sorted(_STATE_KEYS)} with kind {type(self).__name__!r}"
            )
        calls = state["calls"]
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"state['calls'] must be a non-negative int, got {calls!r}")
        self.n_calls = calls

    def step_at(self, k: int) -> float:
        r"""The step :math:`\eta` of call ``k`` (0-based)."""
        return self._steps(k)

    # ------------------------------------------------------------------ targets
    def blur_for(self, x1: Tensor) -> float:
        """The absolute blur of a drift towards the data ``x1`` (m, *dim); reads no state and sets none.

        ``sinkhorn.blur`` times the root-mean-square radius of ``x1`` (of all processes' ``x1`` with
        ``distributed``) for a relative blur, ``sinkhorn.blur`` itself for an absolute one.
        """
        options = self.sinkhorn
        if options.distributed and options.relative_blur:
            from .sinkhorn.sharded import global_moments

            return options.absolute_blur(x1, scale=global_moments(x1.detach().reshape(x1.shape[0], -1))[1])
        return options.absolute_blur(x1)

    def velocity(
        self,
        x: Tensor,
        x1: Tensor,
        *,
        y: Tensor | None = None,
        y1: Tensor | None = None,
        x_self: Tensor | None = None,
        y_self: Tensor | None = None,
    ) -> Tensor:
        r"""The drift :math:`V(x) = T_{q\to p}(x) - T_{q\to q'}(x)` of every generated sample; no state read or set.

        Parameters
        ----------
        x : Tensor, shape (n, *dim)
            Generated samples :math:`q` (detached inside).
        x1 : Tensor, shape (m, *dim)
            Data samples :math:`p`, same feature shape and device.
        y : Tensor, shape (n,) or (n, 1), optional
            Integer class of each generated sample; needs ``y1``. Every class of ``y`` must occur in ``y1``
            (and in ``y_self``).
        y1 : Tensor, shape (m,) or (m, 1), optional
            Integer class of each data sample; needs ``y``.
        x_self : Tensor, shape (n', *dim), optional
            The independent generated batch :math:`q'`; required with ``self_term="independent"`` and
            refused otherwise.
        y_self : Tensor, shape (n',) or (n', 1), optional
            Its classes; required with ``x_self`` when labels are given.

        Returns
        -------
        Tensor, shape (n, *dim)
            :math:`V(x)`, in ``x``'s dtype and on its device.
        """
        x, x1, y, y1, x_self, y_self = self._check(x, x1, y, y1, x_self, y_self)
        blur = self.blur_for(x1)
        if y is None:
            return self._velocity(x, x1, x_self, blur)
        if self.sinkhorn.distributed:
            from .sinkhorn.sharded import shared_classes

            classes = shared_classes(y)  # each class's solve is a collective of all processes
        else:
            classes = y.unique()
        out = torch.empty_like(x)
        for c in classes:
            rows = y == c
            xs = None if x_self is None else x_self[y_self == c]
            out[rows] = self._velocity(x[rows], x1[y1 == c], xs, blur)
        return out

    def targets(
        self,
        x: Tensor,
        x1: Tensor,
        *,
        y: Tensor | None = None,
        y1: Tensor | None = None,
        x_self: Tensor | None = None,
        y_self: Tensor | None = None,
    ) -> Tensor:
        r"""The stop-gradient regression targets :math:`\operatorname{sg}[x + \eta_k V(x)]` of call ``k``.

        Arguments as :meth:`velocity`. Counts one call (:attr:`n_calls`), whose number selects the step of a
        scheduled ``step_size``.

        Returns
        -------
        Tensor, shape (n, *dim)
            Detached targets, in ``x``'s dtype and on its device.
        """
        v = self.velocity(x, x1, y=y, y1=y1, x_self=x_self, y_self=y_self)
        eta = self.step_at(self.n_calls)
        self.n_calls += 1
        return (x.detach() + eta * v).detach()

    def loss(
        self,
        x: Tensor,
        x1: Tensor,
        *,
        y: Tensor | None = None,
        y1: Tensor | None = None,
        x_self: Tensor | None = None,
        y_self: Tensor | None = None,
    ) -> Tensor:
        r"""Mean squared distance of ``x`` to its targets, ``mean((x - targets(x, x1, ...))**2)`` over all entries.

        Arguments as :meth:`velocity`; ``x`` keeps its graph (the generator's output), the targets are
        detached. The value is :math:`\eta^2 \operatorname{mean}(V^2)`; its gradient with respect to ``x`` is
        :math:`-2\eta V / N` (``N = x.numel()``). Counts one call, as :meth:`targets`.

        Returns
        -------
        Tensor, shape ()
        """
        target = self.targets(x, x1, y=y, y1=y1, x_self=x_self, y_self=y_self)
        return torch.mean((x - target) ** 2)

    # ------------------------------------------------------------------ internals
    def _velocity(self, x: Tensor, x1: Tensor, x_self: Tensor | None, blur: float) -> Tensor:
        solve = self.sinkhorn.solve
        to_data = solve(x, x1, blur=blur)
        if self.self_term == "same":
            return to_data.velocity
        if self.self_term == "none":
            return to_data.proj_y - x
        # The engine also solves the symmetric problem on x, which the independent term does not use.
        return to_data.proj_y - solve(x, x_self, blur=blur).proj_y

    def _check(
        self,
        x: Tensor,
        x1: Tensor,
        y: Tensor | None,
        y1: Tensor | None,
        x_self: Tensor | None,
        y_self: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        check_cloud(x, "x")
        check_cloud(x1, "x1")
        check_same_features(x, x1, "x", "x1")
        check_same_device(("x", x), ("x1", x1), ("x_self", x_self), ("y", y), ("y1", y1), ("y_self", y_self))
        if self.self_term == "independent":
            if x_self is None:
                raise ValueError(
                    'x_self is required with self_term="independent": pass a second generated batch'
                )
            check_cloud(x_self, "x_self")
            check_same_features(x, x_self, "x", "x_self")
        elif x_self is not None or y_self is not None:
            raise ValueError(
                f'x_self and y_self are used only with self_term="independent", not {self.self_term!r}'
            )
        if (y is None) != (y1 is None):
            raise ValueError("give both y (classes of x) and y1 (classes of x1), or neither")
        if y is not None:
            y = check_labels(y, x.shape[0], "y", "x", column=True)
            y1 = check_labels(y1, x1.shape[0], "y1", "x1", column=True)
            _check_covered(y, y1, "y1", "x1")
            if x_self is not None:
                if y_self is None:
                    raise ValueError("y_self (classes of x_self) is required when labels are given")
                y_self = check_labels(y_self, x_self.shape[0], "y_self", "x_self", column=True)
                _check_covered(y, y_self, "y_self", "x_self")
        elif y_self is not None:
            raise ValueError("y_self needs y and y1: labels are given for all batches or for none")
        x = x.detach()
        x1 = x1.detach()
        if x_self is not None:
            x_self = x_self.detach()
        return x, x1, y, y1, x_self, y_self

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(step_size={self.step_size!r}, sinkhorn={self.sinkhorn}, "
            f"self_term={self.self_term!r})"
        )


def _check_covered(y: Tensor, other: Tensor, name: str, cloud: str) -> None:
    missing = sorted(set(y.unique().tolist()) - set(other.unique().tolist()))
    if missing:
        raise ValueError(
            f"y holds the classes {missing}, which {name} does not: every class of the generated samples "
            f"needs samples of its own class in {cloud}"
        )


def _check_step(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


class _StepSchedule:
    """``k -> eta_k`` from a number, a non-empty sequence (its last value held) or a callable (checked per call).

    A plain object rather than a closure, so that a drift pickles (``torch.multiprocessing`` spawn, DDP) as
    long as a callable ``step_size`` does.
    """

    def __init__(self, step_size: object) -> None:
        self.constant: float | None = None
        self.steps: tuple[float, ...] | None = None
        self.function: Callable[[int], float] | None = None
        if isinstance(step_size, (int, float)) and not isinstance(step_size, bool):
            self.constant = _check_step(step_size, "step_size")
        elif callable(step_size):
            self.function = step_size
        elif isinstance(step_size, Sequence) and not isinstance(step_size, str):
            if len(step_size) == 0:
                raise ValueError("step_size must not be an empty sequence")
            self.steps = tuple(_check_step(v, "step_size") for v in step_size)
        else:
            raise TypeError(
                "step_size must be a number, a sequence of numbers or a callable k -> eta, "
                f"got {type(step_size).__name__}"
            )

    def __call__(self, k: int) -> float:
        if self.constant is not None:
            return self.constant
        if self.steps is not None:
            return self.steps[min(k, len(self.steps) - 1)]
        return _check_step(self.function(k), f"step_size({k})")
