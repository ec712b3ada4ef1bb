r"""The MNIST scorer: a seeded classifier's features, classifier FID, and k-NN precision and recall.

Generated images are scored in the 128-d penultimate features of a small CNN classifier trained here on MNIST
(:func:`get_classifier`, seeded, so a fresh clone rebuilds the same one):

* **classifier FID** (:func:`frechet_distance`): ``‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})`` between
  Gaussians fitted to the two feature sets (unbiased covariances, float64). It is not FID (no Inception
  network) and does not compare with published FIDs;
* **precision and recall** (:func:`knn_precision_recall`, Kynkäänniemi et al. 2019, "Improved precision and
  recall metric for assessing generative models", k = 3 as in the paper): each set's manifold is the union of
  balls around its points with radius the distance to the point's k-th nearest neighbour in its own set;
  precision is the share of generated points inside the real manifold (fidelity), recall the share of real
  points inside the generated manifold (coverage).

:class:`FeatureScorer` holds the real images' features, statistics and radii once and scores any number of
generated sets against them. The scale the issue asked for: 10 000 generated images against the 10 000 test
images, with the floor of 10 000 training images against the same test images; 2000 for quick runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from torchcfm_nsgf._io import atomic_save
from torchcfm_nsgf.images import NSGFSettings, available_methods, load_images
from torchcfm_nsgf.images.data import to_unit_range
from torchcfm_nsgf.images.settings import IMAGE_DRIFT_SELF_TERM

__all__ = [
    "K_NEAREST",
    "Classifier",
    "FeatureScorer",
    "frechet_distance",
    "get_classifier",
    "knn_precision_recall",
    "knn_radii",
    "mnist_unit",
    "parse_method",
    "plot_curves",
    "short_label",
    "slug",
]

#: The k of the k-NN manifolds (Kynkäänniemi et al. 2019 use k = 3).
K_NEAREST = 3


class Classifier(nn.Module):
    """Two conv blocks and two linear layers; :meth:`features` is the 128-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def get_classifier(path: str, root: str, epochs: int = 2) -> tuple[Classifier, float]:
    """Load the cached classifier, or train it on the MNIST training set (inputs in [-1, 1]).

    Training is seeded (initial weights and batch order) and runs on one thread whatever ``--threads``
    says, so a fresh clone on the same machine and torch rebuilds the same classifier, and the classifier
    FIDs of BENCHMARKS.md do not depend on an ignored cache file. The global RNG is left as it was."""
    if os.path.isfile(path):
        net = Classifier()
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        return net.eval(), float(state["test_accuracy"])
    train_set, test_set = load_images("mnist", root), load_images("mnist", root, train=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = Classifier()
        gen = torch.Generator().manual_seed(0)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in range(epochs):
            for idx in torch.randperm(len(train_set), generator=gen).split(128):
                x, y = to_unit_range(train_set.images[idx]), train_set.labels[idx]
                loss = nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(to_unit_range(b)).argmax(1) for b in test_set.images.split(1000)])
    acc = float((pred == test_set.labels).float().mean())
    atomic_save({"net": net.state_dict(), "test_accuracy": acc}, path)  # never half a classifier
    return net, acc


def mnist_unit(
    root: str, stop: int | None = None, start: int = 0, train: bool = True
) -> tuple[Tensor, Tensor]:
    """MNIST images ``[start, stop)`` of a split as the image loop sees them, in [-1, 1], shape (n, 1, 28, 28),
    and their labels (n,)."""
    data = load_images("mnist", root, train=train)
    return to_unit_range(data.images[start:stop]), data.labels[start:stop]


# ---------------------------------------------------------------------------------------------- metrics
def _check_features(x: Tensor, name: str, at_least: int) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(
            f"{name} must be a feature matrix (n, d), got {getattr(x, 'shape', type(x).__name__)}"
        )
    if x.shape[0] < at_least:
        raise ValueError(f"{name} needs at least {at_least} points, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(n, d)`` and ``(m, d)`` (float64).

    ``‖μ_r − μ_g‖² + tr Σ_r + tr Σ_g − 2 tr (Σ_r Σ_g)^{1/2}``, the trace of the square root from the
    eigenvalues of ``Σ_r Σ_g`` (real and non-negative for two covariance matrices; rounding is clamped)."""
    real = _check_features(real, "real", 2).double()
    fake = _check_features(fake, "fake", 2).double()
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} and {fake.shape[1]}")
    mu_r, mu_g = real.mean(0), fake.mean(0)
    cov_r, cov_g = torch.cov(real.T), torch.cov(fake.T)
    eig = torch.linalg.eigvals(cov_r @ cov_g).real.clamp_min(0)
    return float((mu_r - mu_g).square().sum() + cov_r.trace() + cov_g.trace() - 2 * eig.sqrt().sum())


def _blocks(x: Tensor, size: int = 1024) -> Iterable[tuple[int, Tensor]]:
    for start in range(0, x.shape[0], size):
        yield start, x[start : start + size]


def knn_radii(x: Tensor, k: int = K_NEAREST) -> Tensor:
    """Distance of each point of ``x`` (n, d) to its k-th nearest neighbour in ``x`` (itself excluded), (n,)."""
    x = _check_features(x, "x", k + 1)
    radii = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start, block in _blocks(x):
        # the k + 1 smallest distances hold the point itself (distance 0) and its k nearest neighbours
        radii[start : start + len(block)] = torch.cdist(block, x).topk(k + 1, largest=False).values[:, -1]
    return radii


def _inside(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """Whether each point lies within ``radii[j]`` of some ``centres[j]`` (closed balls), (n,) bool."""
    hit = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    for start, block in _blocks(points):
        hit[start : start + len(block)] = (torch.cdist(block, centres) <= radii[None, :]).any(1)
    return hit


def knn_precision_recall(
    real: Tensor, fake: Tensor, k: int = K_NEAREST, *, real_radii: Tensor | None = None
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` (m, d) against ``real`` (n, d).

    precision = share of fake points inside some real point's k-NN ball; recall = share of real points inside
    some fake point's k-NN ball. ``real_radii``: :func:`knn_radii` of ``real``, when already computed.
    """
    real = _check_features(real, "real", k + 1)
    fake = _check_features(fake, "fake", k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} and {fake.shape[1]}")
    if real_radii is None:
        real_radii = knn_radii(real, k)
    precision = _inside(fake, real, real_radii).double().mean()
    recall = _inside(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


class FeatureScorer:
    """Scores of generated images against fixed real images in a classifier's feature space.

    ``features``: ``images (B, C, H, W) in [-1, 1] -> (B, d)``; ``real``: the real images, whose features,
    and k-NN radii, are computed once. Calling the scorer on generated images returns ``classifier_fid``,
    ``precision`` and ``recall``."""

    def __init__(self, features, real: Tensor, k: int = K_NEAREST, batch_size: int = 500) -> None:
        self.features, self.k, self.batch_size = features, k, batch_size
        self.real = self.embed(real)
        self.real_radii = knn_radii(self.real, k)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        return torch.cat([self.features(b) for b in images.split(self.batch_size)]).float()

    def __call__(self, images: Tensor) -> dict[str, float]:
        fake = self.embed(images)
        precision, recall = knn_precision_recall(self.real, fake, self.k, real_radii=self.real_radii)
        return {"classifier_fid": frechet_distance(self.real, fake), "precision": precision, "recall": recall}


# ---------------------------------------------------------------------------------------------- methods
#: The image methods' names in tables. A method spec is ``name[:field=value...]``: any method of the image
#: loop's registry (``torchcfm_nsgf.images.available_methods()``, where a new image method registers once)
#: with :class:`~torchcfm_nsgf.images.NSGFSettings` fields, ``blur`` or ``nsgfpp.FIELD`` (:func:`parse_method`).
NAMES = {
    "nsgf++": "NSGF++",
    "otcfm": "OT-CFM",
    "icfm": "I-CFM",
    "nsgf": "NSGF",
    "fm": "FM",
    "rf": "RF",
    "coupling": "large coupling",
    "drift": "SinkhornDrift (one step)",
    "meanflow": "MeanFlow",
}
# NSGFSettings fields whose default is None, and the type of their values
OPTIONAL_FIELDS = {"flow_size": int, "pool_max_bytes": int, "pool_path": str}


# the spec keys of NSGF++'s options before they became one object (NSGFSettings.nsgfpp)
OLD_NSGFPP_KEYS = {
    "phase1_steps": "nsgfpp.flow_steps",
    "phase1_step_size": "nsgfpp.step_size",
    "phase2": "nsgfpp.phase2",
    "phase1_batch_fraction": "nsgfpp.phase1_batch_fraction",
    "endpoints": "nsgfpp.endpoints",
}


def parse_method(spec: str, base: NSGFSettings) -> tuple[str, NSGFSettings, str]:
    """``name[:field=value...]`` -> (method name, settings, label)."""
    name, *pairs = spec.split(":")
    if name not in available_methods():
        raise SystemExit(f"method {name!r} is not available here (available: {available_methods()})")
    changes = {}
    nsgfpp = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "blur":  # the Sinkhorn blur, relative to the data's RMS radius
            changes["sinkhorn"] = dataclasses.replace(base.sinkhorn, blur=float(value))
            continue
        key = OLD_NSGFPP_KEYS.get(key, key)
        if key.startswith("nsgfpp."):  # a field of NSGF++'s options
            field_name = key.removeprefix("nsgfpp.")
            current = getattr(base.nsgfpp, field_name)
            nsgfpp[field_name] = value if isinstance(current, str) else type(current)(value)
            continue
        if key not in {f.name for f in dataclasses.fields(NSGFSettings)} or key in ("sinkhorn", "nsgfpp"):
            raise SystemExit(f"{spec!r}: {key!r} is not an NSGFSettings field (or blur, or nsgfpp.FIELD)")
        current = getattr(base, key)
        kind = OPTIONAL_FIELDS.get(key, str) if current is None else type(current)
        changes[key] = kind(value)
    if nsgfpp:
        changes["nsgfpp"] = base.nsgfpp.replace(**nsgfpp)
    settings = dataclasses.replace(base, **changes)
    label = NAMES.get(name, name)
    if name == "nsgf++":
        s = settings.nsgfpp
        label += f" `{s.phase2}` (T={s.flow_steps}, η={s.step_size:g})"
        if s.phase1_batch_fraction != 1:
            label += f", NSGF field on {s.phase1_batch_fraction:g} of each batch"
        if s.phase2 != "paper":
            label += f", {s.endpoints} X_T"
        label += ", one network for both phases" if s.network == "shared" else ", a network per phase"
    elif name == "nsgf":
        label += f" (T={settings.flow_steps}, η={settings.step_size:g}, {settings.path})"
    elif name == "drift" and settings.drift_self_term != IMAGE_DRIFT_SELF_TERM:
        label += f", self term {settings.drift_self_term!r}"
    if name in ("nsgf", "nsgf++", "coupling"):
        label += f", blur {settings.sinkhorn.blur:g}"
        if settings.flow_size is not None:
            label += f", flows of {settings.flow_size}"
    return name, settings, label


def slug(spec: str) -> str:
    return spec.replace("+", "p").replace(":", "_").replace("=", "")


# ---------------------------------------------------------------------------------------------- plots
#: one colour per method in the curve plots, the same in every figure (other methods take spare colours)
COLOURS = {
    "NSGF++": "#d62728",
    "NSGF": "#ff7f0e",
    "OT-CFM": "#1f77b4",
    "I-CFM": "#17becf",
    "FM": "#7f7f7f",
    "RF": "#bcbd22",
    "MeanFlow": "#9467bd",
    "SinkhornDrift (one step)": "#2ca02c",
}


def short_label(spec: str) -> str:
    """A method spec's name for legends: ``NSGF++``, or ``NSGF++ (nsgfpp.network=separate)`` with options."""
    name, *pairs = spec.split(":")
    return NAMES.get(name, name) + (f" ({', '.join(pairs)})" if pairs else "")


def plot_curves(
    panels: dict[str, dict[str, dict[float, list[float]]]], path: str, floor: float, title: str = "MNIST"
) -> None:
    """Classifier FID against training minutes: one panel per title (e.g. ``"NFE 10"``), one colour per method
    (the same in every panel), the mean over the seeds as a line and each seed as a faint dot, the floor
    dashed, a log y axis, one legend under the panels; PNG.

    ``panels[panel][method][minutes]`` holds the FIDs of the seeds scored at those minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    methods = list(dict.fromkeys(m for curves in panels.values() for m in curves))
    spare = iter(plt.get_cmap("Dark2").colors)
    colours = {m: COLOURS.get(m) or COLOURS.get(m.split(" (")[0]) or next(spare, "k") for m in methods}
    styles = {m: "--" if m not in COLOURS and " (" in m else "-" for m in methods}  # a variant: dashed
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.5, 1.0 + 3.6 * len(panels)), 3.9), squeeze=False)
    ticks = sorted({t for curves in panels.values() for points in curves.values() for t in points})
    for ax, (name, curves) in zip(axes[0], panels.items(), strict=True):
        for method, points in curves.items():
            xs = sorted(points)
            means = [sum(points[x]) / len(points[x]) for x in xs]
            ax.plot(xs, means, marker="o", ls=styles[method], ms=4, lw=1.6, color=colours[method])
            for x in xs:
                ax.scatter([x] * len(points[x]), points[x], s=10, color=colours[method], alpha=0.35, lw=0)
        ax.axhline(floor, color="k", ls="--", lw=1)
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        low, high = ax.get_ylim()
        some = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else "")  # 2, 3, 5 in a decade
        ax.yaxis.set_minor_formatter(some if high / low < 30 else NullFormatter())
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        if len(ticks) == 1:
            ax.set_xlim(ticks[0] * 0.5, ticks[0] * 1.5)
        ax.set_xlabel("training CPU time (min)")
        ax.set_title(f"{title}, {name}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("classifier FID (log)")
    handles = [plt.Line2D([], [], color=colours[m], ls=styles[m], marker="o", ms=4, label=m) for m in methods]
    handles.append(plt.Line2D([], [], color="k", ls="--", lw=1, label=f"floor, train vs test ({floor:.2f})"))
    ncol = min(2 if len(panels) == 1 else 4, len(handles))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    rows = -(-len(handles) // ncol)
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
