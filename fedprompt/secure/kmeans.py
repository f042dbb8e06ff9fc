"""DP adaptive spherical k-means: the plaintext reference of what the compute parties run.

The secure version (:mod:`fedprompt.secure.mpc_kmeans`) runs *exactly* this algorithm on
secret shares, step for step; with the noise off both give the same k and the same
labels, and with noise both release Gaussian mechanisms of the same sensitivity.

**What a client's signature may influence.** The clients' reduced vectors ``x_i`` (unit
vectors, ``|x_i| <= B``) are private. Everything this algorithm releases to anyone but
the client itself goes through a Gaussian mechanism (accounted by the caller,
:func:`release_plan`); each client's own label is a function of its own ``x_i`` and
those releases only (the "billboard" structure of joint DP: what any *other* client gets
is post-processing of DP releases).

1. **Public initialisation.** Candidate ``k = 2 .. k_max`` runs (groups ``g = k - 2``,
   ``G = k_max - 1`` of them) start from public random unit vectors drawn from the seed
   (:func:`initial_centres`; group ``g`` uses the first ``k`` of them). Nothing
   data-dependent (farthest-first traversal was, and had to go). Public centres are kept
   on the fixed-point grid (:func:`on_grid`), so labels under MPC are exact.
2. **Lloyd iterations, every k at once** (``iterations`` times): each client's label in
   each group is the first argmax of ``<x_i, c_j>`` over the group's public centres
   (secret under MPC); the per-cluster sums of the ``x_i`` are released with Gaussian
   noise (one release for all groups: a client adds ``x_i`` to one slot of each group,
   so the L2 sensitivity is ``sqrt(G) B``); the new public centres are the normalised
   noisy sums, and a *weak* slot (:func:`weak_threshold`) restarts next to the strongest
   one of its group (:func:`next_centres`). The last iteration releases the sums **and
   the cluster sizes** (sensitivity ``sqrt(G (B^2 + 1))``) and its labels are final.
3. **Silhouettes against the public means** (:func:`cluster_means`): for unit members,
   the mean squared distance from ``x`` to cluster ``j`` is ``|x|^2 + 1 - 2 <x, mu_j>``,
   so each client's silhouette ``s_i`` in ``[-1, 1]`` (clamped) approximates the usual
   pairwise one and depends on the client only through its own ``x_i`` and public
   values (:func:`silhouettes`). Released with noise: the sum of ``s_i`` per group and
   the number of clients (sensitivity ``sqrt(G + 1)``).
4. **Adaptive k** from the noisy scores (post-processing, :func:`choose_k`): ``k = 1``
   scores the public ``min_silhouette``, ``k >= 2`` a lower confidence bound on its mean
   silhouette (two noise stds); the smallest k within ``K_TOLERANCE`` of the best wins,
   so one cluster is kept unless some ``k`` separates the clients clearly, and when the
   noise drowns the scores.
5. The chosen k's public centres (normalised means) and released sizes (``k = 1``: the
   noisy client count) are the federation's centres and data-independent denominators.

The labels are the slot indices of the chosen group (``0 .. k-1``, the order of the
public centres; a slot may be empty). Only the labels of the chosen ``k`` are opened.
:func:`release_plan` lists the releases with their sensitivities.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedprompt.secure.fixed_point import NORM_BOUND, SCALE
from fedprompt.seeding import derived_seed

#: added to the score of padding slots (so they never win); scores lie in [-1.01, 1.01]
PAD_SCORE = 64.0
DEFAULT_MIN_SILHOUETTE = 0.3
SILHOUETTE_EPS = 1e-3  # keeps 1 / (b + eps) bounded (a client exactly on a centre)
RESEED_STEP = 0.15  # how far from a strong centre a weak one restarts (public)
K_TOLERANCE = 1e-3  # a larger k must beat a smaller one by this much (mean silhouette)
SCORE_MARGIN = 2.0  # k >= 2 is judged by its silhouette less this many noise stds

#: draws Gaussian noise: (shape, std) -> float64 array (a CSPRNG in every real mechanism)
NoiseDraw = Callable[[tuple[int, ...], float], np.ndarray]


@dataclass(frozen=True)
class NoiseStds:
    """Standard deviation of the Gaussian noise on each kind of release (0: none)."""

    sums: float = 0.0  # the cluster sums of every iteration but the last (all groups)
    last: float = 0.0  # the last iteration's cluster sums and sizes (all groups)
    scores: float = 0.0  # the silhouette sums of every group and the client count

    @property
    def private(self) -> bool:
        return min(self.sums, self.last, self.scores) > 0


@dataclass
class Releases:
    """Every value the mechanism releases (noisy where configured), in order."""

    sums: list[np.ndarray] = field(default_factory=list)  # (G, k_max, dim) per iteration
    last: np.ndarray | None = None  # (G, k_max, dim + 1): last iteration's sums | sizes
    scores: np.ndarray | None = None  # (G + 1,): silhouette sum of k = 2.., then count


@dataclass
class KMeansOutcome:
    k: int  # the chosen number of clusters (slots; some may be empty)
    labels: np.ndarray  # (N,) int in [0, k): slot of each client
    centres: np.ndarray | None  # (k, dim) public unit centres; None for k = 1
    counts: np.ndarray  # (k,) released (noisy) cluster sizes
    criterion: np.ndarray  # (k_max,) min_silhouette, then the noisy mean silhouettes
    releases: Releases


def groups(k_max: int) -> int:
    """Number of candidate runs (k = 2 .. k_max)."""
    return max(0, k_max - 1)


def on_grid(centres: np.ndarray) -> np.ndarray:
    """Public centres rounded to the fixed-point grid (multiples of 2^-16): then
    ``<x, c>`` of a fixed-point ``x`` is exact in float64 and, unscaled, in the ring, so
    the compute parties' labels equal the reference's bit for bit (ties included)."""
    return np.round(np.asarray(centres, dtype=np.float64) * SCALE) / SCALE


def initial_centres(dim: int, k_max: int, seed: int) -> np.ndarray:
    """(k_max, dim) public random unit vectors (the same in every process for a seed)."""
    rng = np.random.default_rng(derived_seed(seed, "spherical-kmeans-init", dim, k_max))
    c = rng.standard_normal((k_max, dim))
    return on_grid(c / np.linalg.norm(c, axis=1, keepdims=True))


def real_slots(k_max: int) -> np.ndarray:
    """(G, k_max) 1.0 where slot j is a real centre of group g (j < g + 2), else 0.0."""
    slot = np.arange(k_max)[None, :]
    k = np.arange(2, k_max + 1)[:, None]
    return (slot < k).astype(np.float64)


def group_centres(init: np.ndarray) -> np.ndarray:
    """(G, k_max, dim) starting centres of every group (padding slots zero)."""
    k_max = init.shape[0]
    return init[None] * real_slots(k_max)[..., None]


def first_argmax(values: np.ndarray) -> np.ndarray:
    """One-hot of the first maximum along the last axis."""
    return np.eye(values.shape[-1])[np.argmax(values, axis=-1)]


def label_scores(x: np.ndarray, centres: np.ndarray, active: np.ndarray) -> np.ndarray:
    """(N, G, k_max) ``<x_i, c_gj>``, pushed down by PAD_SCORE on slots that are not
    ``active`` (padding, or weak at the end: public masks)."""
    return np.einsum("nd,gkd->ngk", x, centres) - PAD_SCORE * (1.0 - active)[None]


def weak_threshold(sums_std: float, dim: int, min_size: int = 2) -> float:
    """A released cluster sum whose *squared* length is below this is weak: its signal
    part (the squared length minus the noise's expected ``std^2 dim``, less two standard
    deviations of the noise's squared length) is below ``(0.75 min_size)^2`` (fewer than
    ``min_size`` clients, or scattered ones). Public."""
    noise = sums_std ** 2 * (dim + 2.0 * math.sqrt(2.0 * dim))
    return noise + (0.75 * min_size) ** 2


def next_centres(noisy_sums: np.ndarray, centres: np.ndarray, threshold: float,
                 reseed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """New public centres from the released sums, and the (G, k_max) mask of strong
    slots (squared length at least ``threshold``, :func:`weak_threshold`). A strong slot
    moves to its normalised sum; with ``reseed`` (public random unit vectors
    (G, k_max, dim)) a weak slot restarts next to the strongest slots of its group (the
    i-th weak slot beside the i-th strongest, cyclically): it splits a cluster that
    probably holds several, as bisecting k-means does; without, it keeps its centre.
    Public post-processing, computed identically by every party."""
    g_count, k_max, _ = centres.shape
    real = real_slots(k_max)
    norms = np.linalg.norm(noisy_sums, axis=-1)
    strong = (norms ** 2 >= threshold) & (real > 0)
    moved = np.where(strong[..., None],
                     noisy_sums / np.where(norms > 0, norms, 1.0)[..., None], centres)
    if reseed is not None:
        for g in range(g_count):
            order = [int(j) for j in np.argsort(-norms[g], kind="stable") if strong[g, j]]
            weak = [j for j in range(g + 2) if not strong[g, j]]
            if not order:
                continue
            for i, j in enumerate(weak):
                base = moved[g, order[i % len(order)]]
                c = base + RESEED_STEP * reseed[g, j]
                moved[g, j] = c / np.linalg.norm(c)
    return on_grid(moved * real[..., None]), strong.astype(np.float64)


def cluster_means(noisy_last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From the last iteration's released ``[sums | count]`` (G, k_max, dim + 1): the
    public cluster means ``sum / max(count, 1)``, shrunk into the ball of radius
    ``NORM_BOUND`` (a true mean of vectors in it lies in it; noise may push it out, and
    bounded means keep every fixed-point intermediate of the silhouette small), and the
    counts."""
    counts = noisy_last[..., -1]
    means = noisy_last[..., :-1] / np.maximum(counts, 1.0)[..., None]
    norms = np.linalg.norm(means, axis=-1, keepdims=True)
    return means * np.minimum(1.0, NORM_BOUND / np.maximum(norms, 1e-300)), counts


def silhouette_factors(counts: np.ndarray, real: np.ndarray, threshold: float) -> tuple[
    np.ndarray, np.ndarray, np.ndarray
]:
    """Public per-slot factors of the silhouette from the released counts: ``active``
    (a non-empty slot: count >= threshold), ``own`` (``n / (n - 1)``: the mean distance
    to the *other* members; 0 for a singleton, whose silhouette is 0 as in
    scikit-learn), and the groups with at least two active slots."""
    active = (real > 0) & (counts >= threshold)
    many = counts >= 1.5
    own = np.where(active & many, counts / np.where(many, counts - 1.0, 1.0), 0.0)
    return active.astype(np.float64), own, (active.sum(-1) >= 2).astype(np.float64)


def silhouettes(x: np.ndarray, onehot: np.ndarray, means: np.ndarray, active: np.ndarray,
                own: np.ndarray, groups_ok: np.ndarray) -> np.ndarray:
    """(N, G) silhouettes in [-1, 1] from public cluster means: the mean squared distance
    of a unit-norm member ``y`` of cluster ``j`` to ``x`` is ``|x|^2 + 1 - 2 <x, mu_j>``,
    so ``a`` (own cluster, without ``x`` itself: times ``n / (n - 1)``) and ``b``
    (nearest other active cluster) are those of the usual silhouette, up to the noise in
    the means; ``s = (b - a) / max(a, b, eps)`` clamped to [-1, 1]; 0 for members of
    singletons, of inactive slots, and in groups with fewer than two active slots."""
    sq = (x * x).sum(-1)[:, None, None]
    dist = sq + 1.0 - 2.0 * np.einsum("nd,gkd->ngk", x, means)  # (N, G, k_max)
    a = (onehot * dist * own[None]).sum(-1)
    keep = (onehot * (own > 0)[None]).sum(-1) * groups_ok[None]
    others = dist + PAD_SCORE * (onehot + (1.0 - active)[None])
    b = (first_argmax(-others) * dist).sum(-1)
    s = (b - a) / np.maximum(np.maximum(a, b), SILHOUETTE_EPS)
    return np.clip(s, -1.0, 1.0) * keep


def reseed_vectors(dim: int, k_max: int, seed: int, iteration: int) -> np.ndarray:
    """(G, k_max, dim) public random unit vectors for restarting weak slots."""
    rng = np.random.default_rng(derived_seed(seed, "spherical-kmeans-reseed", dim, k_max,
                                             iteration))
    v = rng.standard_normal((groups(k_max), k_max, dim))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def choose_k(noisy_scores: np.ndarray, min_silhouette: float,
             scores_std: float = 0.0) -> tuple[int, np.ndarray]:
    """(k, criterion) from the released ``[sum s (k=2..k_max)..., count]``.

    The criterion of ``k >= 2`` is a lower confidence bound on its mean silhouette,
    ``(sum - m std) / max(count + m std, 1)`` with ``m = SCORE_MARGIN`` standard
    deviations of the scores' noise (public): when the noise drowns the scores, no
    ``k >= 2`` beats the threshold and one cluster is kept, instead of a k picked by noise.
    Then the smallest k within ``K_TOLERANCE`` of the best wins (a larger k must be
    clearly better; this also keeps fixed-point rounding under MPC from breaking exact
    ties, such as a k whose extra slot stayed empty)."""
    margin = SCORE_MARGIN * scores_std
    count = max(float(noisy_scores[-1]) + margin, 1.0)
    criterion = np.concatenate([[min_silhouette], (noisy_scores[:-1] - margin) / count])
    best = float(criterion.max())
    return int(np.flatnonzero(criterion >= best - K_TOLERANCE)[0]) + 1, criterion


def _released(value: np.ndarray, std: float, draw: NoiseDraw | None,
              replayed: np.ndarray | None, what: str) -> np.ndarray:
    """``value`` + N(0, std^2), or the ``replayed`` release (neighbouring-run tests)."""
    if replayed is not None:
        replayed = np.asarray(replayed, dtype=np.float64)
        if replayed.shape != value.shape:
            raise ValueError(f"replayed {what} has shape {replayed.shape}, expected "
                             f"{value.shape}")
        return replayed.copy()
    if std > 0:
        if draw is None:
            raise ValueError(f"noise std {std} on the {what} needs a noise source")
        return value + draw(value.shape, std)
    return value.copy()


def dp_spherical_kmeans(x: np.ndarray, k_max: int, iterations: int, seed: int,
                        min_silhouette: float = DEFAULT_MIN_SILHOUETTE,
                        noise: NoiseStds = NoiseStds(), draw: NoiseDraw | None = None,
                        replay: Releases | None = None) -> KMeansOutcome:
    """DP adaptive spherical k-means of the rows of ``x`` (N >= 0, dim); see the module
    docstring. ``replay`` forces every released value (the neighbouring-dataset recipe:
    a run on D' uses what the run on D released)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"dp_spherical_kmeans needs an (N, dim) array, got {x.shape}")
    if k_max < 2:
        raise ValueError("k_max must be >= 2 to cluster (k_max = 1 is one cluster, no "
                         "clustering)")
    if iterations < 1:
        raise ValueError("dp_spherical_kmeans needs at least one iteration")
    n, dim = x.shape
    real = real_slots(k_max)
    centres = group_centres(initial_centres(dim, k_max, seed))
    releases = Releases()
    threshold = weak_threshold(noise.sums, dim)
    for t in range(iterations - 1):
        onehot = first_argmax(label_scores(x, centres, real))  # (N, G, k_max)
        sums = np.einsum("ngk,nd->gkd", onehot, x)
        forced = replay.sums[t] if replay is not None else None
        noisy = _released(sums, noise.sums, _masked(draw, real), forced, "cluster sums")
        releases.sums.append(noisy)
        centres, _ = next_centres(noisy, centres, threshold,
                                  reseed_vectors(dim, k_max, seed, t))
    # last iteration: the final labels, and their sums with the cluster sizes
    onehot = first_argmax(label_scores(x, centres, real))
    last = np.concatenate([np.einsum("ngk,nd->gkd", onehot, x),
                           onehot.sum(0)[..., None]], axis=-1)
    noisy_last = _released(last, noise.last, _masked(draw, real),
                           replay.last if replay is not None else None, "last sums")
    releases.last = noisy_last
    means, counts = cluster_means(noisy_last)
    active, own, groups_ok = silhouette_factors(counts, real, count_threshold(noise.last))
    sil = silhouettes(x, onehot, means, active, own, groups_ok)  # (N, G)
    raw = np.concatenate([sil.sum(0), [float(n)]])
    noisy_scores = _released(raw, noise.scores, draw,
                             replay.scores if replay is not None else None, "scores")
    releases.scores = noisy_scores
    k, criterion = choose_k(noisy_scores, min_silhouette, noise.scores)
    if k == 1:
        labels = np.zeros(n, dtype=np.int64)
        chosen_counts = np.array([float(noisy_scores[-1])])
        chosen_centres = None
    else:
        chosen = onehot[:, k - 2, :k]
        labels = chosen.argmax(1).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
        chosen_counts = counts[k - 2, :k].copy()
        chosen_centres = unit_rows(means[k - 2, :k], centres[k - 2, :k])
    return KMeansOutcome(k=k, labels=labels, centres=chosen_centres, counts=chosen_counts,
                         criterion=criterion, releases=releases)


def unit_rows(means: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """The chosen clusters' public centres: normalised means (a zero mean keeps the
    centre it was labelled against)."""
    norms = np.linalg.norm(means, axis=-1, keepdims=True)
    return on_grid(np.where(norms > 0, means / np.where(norms > 0, norms, 1.0), fallback))


def count_threshold(last_std: float) -> float:
    """A slot whose released size is below this is empty for the silhouette: half a
    client, or 1.5 noise stds. Public."""
    return max(0.5, 1.5 * last_std)


def _masked(draw: NoiseDraw | None, real: np.ndarray) -> NoiseDraw | None:
    """Noise on the real slots of the (G, k_max, dim) sums only (padding slots are
    exactly zero and carry nothing)."""
    if draw is None:
        return None

    def masked(shape: tuple[int, ...], std: float) -> np.ndarray:
        return draw(shape, std) * real[..., None]

    return masked


def assign(x: np.ndarray, centres: np.ndarray | None) -> np.ndarray:
    """(N,) labels of clients against public centres (k, dim): the first argmax of
    ``<x_i, c_j>``; everyone 0 without centres (k = 1)."""
    x = np.asarray(x, dtype=np.float64)
    if centres is None:
        return np.zeros(x.shape[0], dtype=np.int64)
    return np.argmax(x @ on_grid(centres).T, axis=1).astype(np.int64)


# ---------------------------------------------------------------- privacy of a run
@dataclass(frozen=True)
class GaussianRelease:
    """One Gaussian mechanism of a clustering run: its L2 sensitivity under adding or
    removing one client, and the noise std that gives ``noise_multiplier``."""

    name: str
    sensitivity: float
    count: int  # how many times per clustering run

    def std(self, noise_multiplier: float) -> float:
        return noise_multiplier * self.sensitivity


def release_plan(k_max: int, iterations: int, vector_bound: float) -> list[GaussianRelease]:
    """The Gaussian releases of one clustering run; ``vector_bound`` bounds the L2 norm a
    client's (fixed-point) vector can have (:func:`fedprompt.secure.fixed_point.
    vector_sensitivity`). Empty for ``k_max = 1`` (nothing is clustered). Adding or
    removing one client changes, in every group, one slot's sum by its vector (and, in
    the last iteration, that slot's size by 1), and every group's silhouette sum by its
    ``s_i`` in [-1, 1] and the client count by 1."""
    g_count = groups(k_max)
    if g_count == 0:
        return []
    return [
        GaussianRelease("cluster sums of every candidate k, Lloyd iterations 1.."
                        f"{iterations - 1}", math.sqrt(g_count) * vector_bound,
                        iterations - 1),
        GaussianRelease("cluster sums and sizes of every candidate k, last Lloyd iteration",
                        math.sqrt(g_count * (vector_bound ** 2 + 1.0)), 1),
        GaussianRelease("silhouette sums of every candidate k and the client count",
                        math.sqrt(g_count + 1.0), 1),
    ]


def noise_stds(k_max: int, iterations: int, vector_bound: float,
               noise_multiplier: float) -> NoiseStds:
    """The stds giving every release of :func:`release_plan` the same noise multiplier."""
    plan = release_plan(k_max, iterations, vector_bound)
    if not plan or noise_multiplier <= 0:
        return NoiseStds()
    sums, last, scores = (r.std(noise_multiplier) for r in plan)
    return NoiseStds(sums=sums, last=last, scores=scores)


def releases_per_run(k_max: int, iterations: int) -> int:
    """Gaussian releases (each at the run's noise multiplier) of one clustering run."""
    return sum(r.count for r in release_plan(k_max, iterations, 1.0))
