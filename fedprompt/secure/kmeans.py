"""Adaptive k-means, the plaintext reference of the algorithm the compute parties run.

The secure version (:mod:`fedprompt.secure.mpc_kmeans`) runs *exactly* this algorithm on
secret shares, step for step, so that on well-separated data both give the same partition
(adjusted Rand index 1.0). Every data-dependent branch of the textbook algorithm is
replaced here by arithmetic and one-hot selections, as MPC needs:

1. **Initialisation: farthest-first traversal** (deterministic k-means++). The first centre
   is the point at a public index drawn from the seed; each next centre is the point
   farthest from the centres chosen so far (first index on ties). The centres for ``k`` are
   the first ``k`` of the ``K = min(k_max, N)`` chosen, so one traversal initialises every
   candidate ``k``.
2. **Lloyd iterations, all candidate k at once**: the ``K`` candidates are a batch of ``K``
   groups with ``K`` centre slots each; in group ``g`` (``k = g + 1``) the slots ``>= k`` are
   padding that can never win. Each of the fixed ``iterations`` assigns every point to
   its nearest centre (score ``|c|^2 - 2 x.c``, first slot on ties) and moves each centre to
   the mean of its points; an empty cluster keeps its centre.
3. **Final assignment** with the last centres.
4. **Adaptive k by the silhouette** (on squared Euclidean distances, computed for every
   candidate ``k >= 2`` from the pairwise distance matrix): for point ``i`` with ``a_i`` the
   mean distance to the other members of its cluster and ``b_i`` the smallest mean distance
   to another non-empty cluster, ``s_i = (b_i - a_i) / (max(a_i, b_i) + eps)``, and
   ``s_i = 0`` in a singleton cluster (as scikit-learn does). The score of ``k`` is the mean
   ``s_i``; ``k = 1`` scores the public threshold ``min_silhouette``, and ``k*`` is the first
   maximum, so ``k = 1`` is chosen unless some ``k`` has a mean silhouette above the
   threshold. (Measured on synthetic unit-vector clusters, N 10..100, d 16..256: the
   silhouette with threshold 0.3 found the true k far more often than an elbow on the
   within-cluster dispersion or a penalised dispersion.)
5. The labels of ``k*`` are relabelled by first appearance (client order) and clusters
   left empty are dropped, so labels are ``0..k-1`` with every cluster non-empty.

Only step 5 runs in the clear in MPC (on the revealed one-hot assignment of ``k*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedprompt.seeding import derived_seed

# Score added to padding slots (and masked means); real scores lie in [-1, 4] for |x| <= 1.
PAD_SCORE = 64.0
DEFAULT_MIN_SILHOUETTE = 0.3
SILHOUETTE_EPS = 1e-3  # keeps 1 / max(a, b) bounded (duplicate points)


@dataclass
class KMeansOutcome:
    k: int  # clusters after dropping empty ones
    labels: np.ndarray  # (N,) int, in [0, k), relabelled by first appearance
    centroids: np.ndarray  # (k, dim) means of the final clusters
    k_chosen: int  # the first maximum of the criterion, before dropping empty clusters
    criterion: np.ndarray  # (K,) min_silhouette for k = 1, mean silhouette for k >= 2


def start_index(n: int, seed: int) -> int:
    """The public index of the first centre (from the seed)."""
    return derived_seed(seed, "kmeans-start", n) % n


def candidate_count(n: int, k_max: int) -> int:
    return max(1, min(k_max, n))


def slot_padding(n_cand: int) -> np.ndarray:
    """(K, K) public scores added to every group's slots: 0 for real, PAD for padding."""
    slot = np.arange(n_cand)[None, :]
    group_k = np.arange(1, n_cand + 1)[:, None]
    return np.where(slot < group_k, 0.0, PAD_SCORE)


def first_argmin(values: np.ndarray) -> np.ndarray:
    """One-hot of the first minimum along the last axis."""
    idx = np.argmin(values, axis=-1)
    return np.eye(values.shape[-1])[idx]


def farthest_first(x: np.ndarray, n_cand: int, seed: int) -> np.ndarray:
    """(K, dim) initial centres by farthest-first traversal from a seeded start."""
    n = x.shape[0]
    sq = (x * x).sum(1)
    centre = x[start_index(n, seed)]
    centres = [centre]
    mind = sq - 2 * x @ centre + centre @ centre
    for _ in range(1, n_cand):
        centre = first_argmin(-mind) @ x  # farthest point (first on ties)
        centres.append(centre)
        mind = np.minimum(mind, sq - 2 * x @ centre + centre @ centre)
    return np.stack(centres)


def assign(x: np.ndarray, centres: np.ndarray, padding: np.ndarray) -> np.ndarray:
    """One-hot (N, K groups, K slots): every point's nearest slot in every group."""
    scores = (centres * centres).sum(-1)[None] - 2 * np.einsum("nd,gkd->ngk", x, centres)
    return first_argmin(scores + padding[None])


def lloyd(x: np.ndarray, init: np.ndarray, iterations: int) -> np.ndarray:
    """Final one-hot assignments (N, K, K) of every candidate k after the iterations."""
    n_cand = init.shape[0]
    padding = slot_padding(n_cand)
    real = (padding == 0.0).astype(np.float64)
    centres = init[None, :, :] * real[:, :, None]  # (K groups, K slots, dim)
    for _ in range(iterations):
        onehot = assign(x, centres, padding)
        counts = onehot.sum(0)  # (K, K)
        sums = np.einsum("ngk,nd->gkd", onehot, x)
        empty = counts < 0.5
        means = sums / np.where(empty, 1.0, counts)[..., None]
        centres = np.where(empty[..., None], centres, means)
    return assign(x, centres, padding)


def silhouettes(x: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """(K,) mean silhouette (squared Euclidean) of each group's assignment; entry 0 (k=1)
    is 0 and unused."""
    sq = (x * x).sum(1)
    dist = sq[:, None] + sq[None, :] - 2 * x @ x.T  # (N, N)
    sums = np.einsum("nm,mgk->ngk", dist, onehot)  # distance of i to each cluster
    counts = onehot.sum(0)  # (K, K)
    empty = counts < 0.5
    single = counts < 1.5
    own_mean = sums / np.maximum(counts - 1, 1)[None]
    other_mean = sums / np.maximum(counts, 1)[None] + PAD_SCORE * (onehot + empty[None])
    a = (onehot * own_mean).sum(-1)  # (N, K)
    b = other_mean.min(-1)
    s = (b - a) / (np.maximum(a, b) + SILHOUETTE_EPS)
    in_single = (onehot * single[None]).sum(-1)
    s = s * (1 - in_single)
    return s.mean(0)


def criterion_scores(x: np.ndarray, onehot: np.ndarray, min_silhouette: float) -> np.ndarray:
    crit = silhouettes(x, onehot)
    crit[0] = min_silhouette
    return crit


def adaptive_kmeans(x: np.ndarray, k_max: int, iterations: int, seed: int,
                    min_silhouette: float = DEFAULT_MIN_SILHOUETTE) -> KMeansOutcome:
    """Adaptive k-means of the rows of ``x`` (N, dim); see the module docstring."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"adaptive_kmeans needs a non-empty (N, dim) array, got {x.shape}")
    n = x.shape[0]
    n_cand = candidate_count(n, k_max)
    onehot = lloyd(x, farthest_first(x, n_cand, seed), iterations)
    criterion = criterion_scores(x, onehot, min_silhouette)
    choice = first_argmin(-criterion)  # (K,) first maximum
    chosen = np.einsum("g,ngk->nk", choice, onehot)  # (N, K) one-hot
    labels, k = relabel(chosen)
    centroids = np.stack([x[labels == j].mean(0) for j in range(k)])
    return KMeansOutcome(k=k, labels=labels, centroids=centroids,
                         k_chosen=int(np.argmax(choice)) + 1, criterion=criterion)


def relabel(onehot: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels from a revealed (N, K) one-hot, renumbered by first appearance; returns
    (labels, number of non-empty clusters). Raises if a row is not one-hot."""
    onehot = np.rint(np.asarray(onehot, dtype=np.float64)).astype(np.int64)
    if onehot.ndim != 2 or not np.all(onehot.sum(1) == 1) or not np.all(
            (onehot == 0) | (onehot == 1)):
        raise ValueError("assignment is not one-hot (a corrupted reveal?)")
    raw = onehot.argmax(1)
    mapping: dict[int, int] = {}
    labels = np.empty(len(raw), dtype=np.int64)
    for i, slot in enumerate(raw.tolist()):
        labels[i] = mapping.setdefault(slot, len(mapping))
    return labels, len(mapping)
