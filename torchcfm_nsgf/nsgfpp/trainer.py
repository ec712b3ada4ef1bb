r"""NSGF++ on vectors (2D and other ``(N, *dim)`` data): the networks of the objective, one training loop,
sampling and checkpoints."""

from __future__ import annotations

import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._deprecation import rename_keywords, renamed_keywords
from .._io import atomic_save
from .._progress import bar_disable
from .._validation import check_cloud, check_labels, check_positive, check_same_features
from ..matcher import SinkhornFlowMatcher
from ..sampling import SampleResult
from ..sinkhorn import SinkhornOptions
from .objective import NSGFPlusPlusObjective
from .options import NSGFPlusPlusOptions, check_flow_steps
from .shared import require_separate

__all__ = ["NSGFPlusPlus"]

_FORMAT = "torchcfm_nsgf.nsgfpp/3"
_FORMAT_V2 = "torchcfm_nsgf.nsgfpp/2"  # the settings' flow length under "n_steps", no phase1_batch_fraction
_FORMAT_V1 = "torchcfm_nsgf.nsgfpp/1"  # three separately trained networks, variant "paper"
Sampler = Callable[[int], Tensor]
_OPTION_NAMES = tuple(f.name for f in fields(NSGFPlusPlusOptions))


class NSGFPlusPlus:
    r"""Train and sample NSGF++ on vectors: the networks of :class:`NSGFPlusPlusObjective`, one loop.

    Parameters
    ----------
    nsgf : nn.Module
        NSGF field ``nsgf(t, x)`` (``t`` of shape ``(bs,)`` in training, 0-d in sampling).
    predictor : nn.Module or None
        Time predictor ``predictor(x) -> (bs,)`` (for example :class:`~torchcfm_nsgf.networks.TimePredictorMLP`)
        for the variants with one (:attr:`~torchcfm_nsgf.nsgfpp.variants.Phase2Variant.uses_predictor`); must
        be None for the others.
    straight : nn.Module
        Straight flow ``straight(t, x)`` with ``t`` of shape ``(bs,)``.
    options : NSGFPlusPlusOptions, optional
        T, η, the phase-2 variant, its end points, the NSGF field's batch share, the pool's refresh and
        capacity. Default: ``NSGFPlusPlusOptions()``.
    sinkhorn : SinkhornOptions, optional
        Sinkhorn settings of the NSGF phase. Default: the matcher's (:class:`SinkhornFlowMatcher` with
        ``sinkhorn=None``: a blur relative to the target's scale, ``HIGH_DIM_BLUR`` on data with more than
        ``HIGH_DIM_FEATURES`` features per sample); an explicit ``SinkhornOptions`` is used as given.
    lr : float
        Adam learning rate of all networks.
    generator : torch.Generator, optional
        CPU generator for all the trainer's randomness (data rows, times, pool draws, OT pair order).
    progress : bool
        tqdm progress bar in :meth:`fit`.
    **changes
        Fields of :class:`NSGFPlusPlusOptions` that replace those of ``options`` (``flow_steps=1``,
        ``phase2="paper"``, ...); ``n_steps`` is the deprecated name of ``flow_steps``.

    Notes
    -----
    ``source`` and ``target`` of :meth:`fit` are either a tensor ``(N, *dim)`` from which rows are drawn with
    ``generator``, or a function ``n -> Tensor (n, *dim)``. Class-conditional training: ``target_labels``
    ``(N,)`` next to a target tensor, or a target function returning ``(x1, y1)``; the networks must then take
    labels (e.g. :class:`~torchcfm_nsgf.networks.VelocityMLP` with ``num_classes``), and :meth:`sample` takes
    ``y``. Every step draws one batch pair, asks the
    objective for one loss per network and steps one Adam per network (equal to one Adam on the summed
    loss, which is what the image loop does). :meth:`save` writes the networks, the optimisers, the settings,
    the step counter, the generator state and the NSGF phase's matcher (its trajectory pool and call counter,
    which decides the next refresh) in one atomically written file, so that training resumes exactly.
    Checkpoints of the earlier three-loop trainer (format ``nsgfpp/1``) load as variant ``"paper"``, with
    the step counter set to the largest of their three counters.
    """

    def __init__(
        self,
        nsgf: nn.Module,
        predictor: nn.Module | None,
        straight: nn.Module,
        options: NSGFPlusPlusOptions | None = None,
        *,
        sinkhorn: SinkhornOptions | None = None,
        lr: float = 1e-3,
        generator: torch.Generator | None = None,
        progress: bool = False,
        **changes: Any,
    ) -> None:
        if options is not None and not isinstance(options, NSGFPlusPlusOptions):
            raise TypeError(f"options must be an NSGFPlusPlusOptions or None, got {type(options).__name__}")
        changes = rename_keywords(changes, {"n_steps": "flow_steps"}, type(self).__name__)
        unknown = sorted(set(changes) - set(_OPTION_NAMES))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {unknown}")
        options = (options or NSGFPlusPlusOptions()).replace(**changes)
        phase2 = options.phase2
        require_separate(options.network, type(self).__name__)
        if options.uses_predictor and predictor is None:
            raise ValueError(f"predictor is required for phase2={phase2!r} (a time predictor network)")
        if not options.uses_predictor and predictor is not None:
            raise ValueError(
                f"predictor must be None for phase2={phase2!r} (phase 2 starts at s = 0, no predictor)"
            )
        named = {"nsgf": nsgf, "predictor": predictor, "straight": straight}
        for name, net in named.items():
            if net is not None and not isinstance(net, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(net).__name__}")
        if sinkhorn is not None and not isinstance(sinkhorn, SinkhornOptions):
            raise TypeError(f"sinkhorn must be a SinkhornOptions or None, got {type(sinkhorn).__name__}")
        check_positive(lr, "lr")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.nets = nn.ModuleDict({k: net for k, net in named.items() if net is not None})
        self.options = options
        self.sinkhorn = sinkhorn
        self.lr = float(lr)
        self.feature_shape: tuple[int, ...] | None = None
        self._iterations = 0
        self.generator = generator
        self.progress = progress
        self.optimizers = {k: torch.optim.Adam(net.parameters(), lr=lr) for k, net in self.nets.items()}
        self._build_objective()

    def _build_objective(self) -> None:
        self.objective = NSGFPlusPlusObjective.from_options(
            self.options, sinkhorn=self.sinkhorn, generator=self.generator
        )

    @property
    def matcher(self) -> SinkhornFlowMatcher:
        """The NSGF phase's matcher (its pool and counters)."""
        return self.objective.matcher

    @property
    def phase2(self) -> str:
        """The variant (a key of :data:`~torchcfm_nsgf.nsgfpp.variants.PHASE2`)."""
        return self.options.phase2

    @property
    def flow_steps(self) -> int:
        """``T``, the NSGF steps of phase 1."""
        return self.options.flow_steps

    @property
    def n_steps(self) -> int:
        """Deprecated name of :attr:`flow_steps`."""
        warnings.warn(
            "NSGFPlusPlus.n_steps is renamed flow_steps; n_steps will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.flow_steps

    @property
    def iterations(self) -> int:
        """Training steps taken so far (each steps every network once)."""
        return self._iterations

    # ------------------------------------------------------------------ data
    def _draw(
        self, data: Tensor | Sampler, n: int, name: str, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(data, Tensor):
            check_cloud(data, name)
            idx = torch.randint(data.shape[0], (n,), generator=self.generator).to(data.device)
            return data[idx], None if labels is None else labels[idx.to(labels.device)]
        if labels is not None:
            raise ValueError(
                f"{name}_labels goes with a {name} tensor; a {name} function returns (x, y) itself"
            )
        if callable(data):
            batch = data(n)
            y = None
            if isinstance(batch, tuple) and len(batch) == 2:
                batch, y = batch
                y = check_labels(y, n, f"the labels of {name}({n})", f"{name}({n})")
            if not isinstance(batch, Tensor) or batch.dim() < 2 or batch.shape[0] != n:
                shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
                raise ValueError(f"{name}({n}) must return a tensor of shape ({n}, *dim), got {shape}")
            return check_cloud(batch, f"{name}({n})"), y
        raise TypeError(
            f"{name} must be a tensor (N, *dim) or a function n -> tensor, got {type(data).__name__}"
        )

    def _pair(
        self, source: Tensor | Sampler, target: Tensor | Sampler, n: int, target_labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A source and a target batch ``(n, *dim)``, on the source's device and dtype, and the target's labels."""
        x0, _ = self._draw(source, n, "source")
        x1, y1 = self._draw(target, n, "target", target_labels)
        check_same_features(x0, x1, "source", "target")
        shape = tuple(x0.shape[1:])
        if self.feature_shape is None:
            self.feature_shape = shape
        elif shape != self.feature_shape:
            raise ValueError(
                f"source and target have feature shape {shape}, but this model was trained on "
                f"{self.feature_shape}"
            )
        return x0, x1.to(device=x0.device, dtype=x0.dtype), None if y1 is None else y1.to(x0.device)

    # ------------------------------------------------------------------ training
    @renamed_keywords(n_iters="train_steps")
    def fit(
        self,
        source: Tensor | Sampler,
        target: Tensor | Sampler,
        train_steps: int,
        batch_size: int = 256,
        target_labels: Tensor | None = None,
    ) -> dict[str, list[float]]:
        """Train every network for ``train_steps`` steps on :meth:`NSGFPlusPlusObjective.losses` (``n_iters`` is
        the deprecated name of ``train_steps``).

        ``target_labels`` ``(N,)``: class labels of a target tensor (class-conditional training); a target
        function may return ``(x1, y1)`` instead. Returns the losses per network, one value per step.
        """
        check_positive(train_steps, "train_steps", integer=True)
        check_positive(batch_size, "batch_size", integer=True)
        if target_labels is not None:
            if not isinstance(target, Tensor):
                raise ValueError("target_labels goes with a target tensor; a target function returns (x, y)")
            target_labels = check_labels(target_labels, target.shape[0], "target_labels", "target")
        self.nets.train()
        history: dict[str, list[float]] = {k: [] for k in self.nets}
        bar = tqdm(
            range(train_steps),
            desc=f"NSGF++ ({self.phase2})",
            disable=bar_disable(self.progress),
            leave=False,
        )
        for _ in bar:
            x0, x1, y1 = self._pair(source, target, batch_size, target_labels)
            losses = self.objective.losses(self.nets, x0, x1, y1)
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            for opt in self.optimizers.values():
                opt.step()
            self._iterations += 1
            for k, loss in losses.items():
                value = float(loss.detach())
                history[k].append(value)
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"the {k} loss became {value} at step {self._iterations}: lower lr"
                    )
            bar.set_postfix({k: f"{v[-1]:.3g}" for k, v in history.items()}, refresh=False)
        return history

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        x0: Tensor,
        *,
        solver: str = "euler",
        straight_steps: int | None = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        return_trajectory: bool = False,
        y: Tensor | None = None,
    ) -> SampleResult:
        """:meth:`NSGFPlusPlusObjective.sample` with this model's networks (in eval mode); ``x0`` ``(bs, *dim)``,
        class labels ``y`` ``(bs,)`` for a class-conditional model."""
        x0 = check_cloud(x0, "x0")
        shape = self.feature_shape
        if shape is not None and tuple(x0.shape[1:]) != shape:
            raise ValueError(
                f"x0 has feature shape {tuple(x0.shape[1:])}, but this model was trained on {shape}"
            )
        modes = {k: net.training for k, net in self.nets.items()}
        self.nets.eval()
        try:
            return self.objective.sample(
                self.nets,
                x0,
                solver=solver,
                straight_steps=straight_steps,
                atol=atol,
                rtol=rtol,
                return_trajectory=return_trajectory,
                progress=self.progress,
                y=y,
            )
        finally:
            for k, net in self.nets.items():
                net.train(modes[k])

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Networks, optimisers, settings, step counter, generator state and the NSGF matcher (pool)."""
        return {
            "format": _FORMAT,
            "settings": {
                **asdict(self.options),
                "sinkhorn": None if self.sinkhorn is None else asdict(self.sinkhorn),
                "lr": self.lr,
                "feature_shape": None if self.feature_shape is None else list(self.feature_shape),
                "iterations": self._iterations,
            },
            "nets": {k: net.state_dict() for k, net in self.nets.items()},
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "generator_state": None if self.generator is None else self.generator.get_state(),
            "matcher": self.objective.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into these networks (same architectures); settings come from ``state``.

        Checkpoints of earlier formats load: ``nsgfpp/2`` (the flow length under ``n_steps``, the whole batch
        for the NSGF field) and ``nsgfpp/1`` (three separately trained networks, variant ``"paper"``; the step
        counter becomes the largest of their three counters)."""
        if not isinstance(state, dict) or state.get("format") not in (_FORMAT, _FORMAT_V2, _FORMAT_V1):
            raise ValueError(f"state is not an NSGF++ checkpoint (expected format {_FORMAT!r})")
        missing = [k for k in ("settings", "nets", "optimizers") if k not in state]
        if missing:
            raise ValueError(f"state misses the entries {missing}")
        st = dict(state["settings"])
        if "n_steps" in st:  # formats 1 and 2
            st["flow_steps"] = st.pop("n_steps")
            check_flow_steps(st["flow_steps"], "settings['n_steps']")
        shape = st.pop("feature_shape")
        if "sinkhorn" in st:  # None: the matcher's default (its state holds the resolved blur)
            sinkhorn = None if st["sinkhorn"] is None else SinkhornOptions(**st["sinkhorn"])
        else:  # checkpoints written before SinkhornOptions: an absolute blur
            sinkhorn = SinkhornOptions(
                blur=st.pop("blur"), relative_blur=False, scaling=st.pop("scaling"), max_iter=5000
            )
        st.pop("sinkhorn", None)
        iterations = st.pop("iterations")
        if isinstance(iterations, dict):  # format 1: one counter per separately trained network
            iterations = max(iterations.values())
        lr = float(st.pop("lr"))
        st.setdefault("phase2", "paper")
        st.setdefault("endpoints", "simulated")
        if st["phase2"] != self.options.phase2:
            raise ValueError(
                f"the checkpoint is NSGF++ variant {st['phase2']!r}, this model is {self.options.phase2!r}"
            )
        options = NSGFPlusPlusOptions(**st)
        for k, net in self.nets.items():
            try:
                net.load_state_dict(state["nets"][k])
            except (RuntimeError, KeyError) as err:
                raise ValueError(
                    f"the checkpoint's {k} network does not fit this model's {k}: {err}"
                ) from err
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        self.options, self.sinkhorn, self.lr = options, sinkhorn, lr
        self.feature_shape = None if shape is None else tuple(shape)
        self._iterations = int(iterations)
        self._build_objective()
        if state.get("matcher") is not None:  # absent in checkpoints written before the pool was saved
            self.objective.load_state_dict(state["matcher"])
        if state.get("generator_state") is not None and self.generator is not None:
            self.generator.set_state(state["generator_state"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
        atomic_save(self.state_dict(), os.fspath(path))

    def load(self, path: str | os.PathLike[str]) -> None:
        """Load a file written by :meth:`save` (``torch.load(weights_only=True)``, mapped to the CPU)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
            raise ValueError(f"checkpoint {path!r} is corrupt or not a torch file: {err}") from err
        self.load_state_dict(state)

    def __repr__(self) -> str:
        s = self.options
        return (
            f"{type(self).__name__}(phase2={s.phase2!r}, flow_steps={s.flow_steps}, step_size={s.step_size:g}, "
            f"sinkhorn={self.matcher.sinkhorn}, iterations={self._iterations})"
        )
