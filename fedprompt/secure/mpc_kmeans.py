"""DP adaptive spherical k-means on CrypTen secret shares: :mod:`fedprompt.secure.kmeans`,
step for step.

Runs inside every compute party (all parties call the same functions on their shares).
The clients' vectors ``x`` are the only secret input; every centre, mask and threshold is
public (from the seed, or post-processing of released values) and is computed by every
party in the clear with the reference's own NumPy functions, from identical opened
values, so all parties hold identical public state. Opened values:

* one bit per client from the range check (:func:`range_violations`);
* the Gaussian releases of :func:`fedprompt.secure.kmeans.release_plan`: before a noisy
  value is opened, **every party adds its own Gaussian noise** (std ``sigma /
  sqrt(P - 1)``, from its own CSPRNG stream) to its share, so against any single party
  (who knows its own draw) the opened value carries at least ``N(0, sigma^2)``, and
  against the server ``N(0, sigma^2 P / (P - 1))``;
* the labels of the chosen k (each a function of the client's own vector and the public
  centres).

Encodings (CrypTen): comparison results and one-hots are *integer* encoded (scale 1),
data are fixed point (scale 2^16). Integer x fixed products need no truncation and are
exact; integer tensors are moved to fixed point with :func:`to_fixed` (a local, exact
share rescaling), never by multiplying with public fractional constants (which CrypTen
would round to integers). Opened values are read as raw ring integers and scaled in
float64 (CrypTen's own decoding goes through float32).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedprompt.secure.crypten_compat import import_crypten
from fedprompt.secure.fixed_point import COORD_BOUND, NORM_BOUND, PRECISION_BITS, SCALE
from fedprompt.secure.kmeans import (
    PAD_SCORE,
    SILHOUETTE_EPS,
    NoiseStds,
    Releases,
    choose_k,
    cluster_means,
    count_threshold,
    group_centres,
    initial_centres,
    next_centres,
    on_grid,
    real_slots,
    reseed_vectors,
    silhouette_factors,
    unit_rows,
    weak_threshold,
)

MPC = Any  # crypten.mpc.MPCTensor (CrypTen is imported lazily, through the shim)


@dataclass
class SecureOutcome:
    k: int
    labels: np.ndarray  # (N,) opened labels of the chosen k (slot indices)
    centres: np.ndarray | None  # (k, dim) public centres; None for k = 1
    counts: np.ndarray  # (k,) released cluster sizes
    criterion: np.ndarray  # (k_max,)
    releases: Releases


def _crypten() -> Any:
    return import_crypten()


def to_fixed(t: MPC) -> MPC:
    """An integer-encoded MPCTensor as fixed point (local share rescaling, exact)."""
    crypten = _crypten()
    out = t.clone()
    if out.encoder.scale == 1:
        out._tensor.encode_(crypten.encoder.FixedPointEncoder(precision_bits=PRECISION_BITS))
    return out


def less_than(a: MPC, b: MPC | float | torch.Tensor) -> MPC:
    """Integer-encoded ``a < b`` (one comparison, 8 rounds, for the whole tensor)."""
    return (a - b)._ltz()


def shared_constant(value: torch.Tensor) -> MPC:
    """A public integer tensor as an integer-encoded share (party 0 holds it)."""
    crypten = _crypten()
    rank = crypten.comm.get().get_rank()
    share = value.long() if rank == 0 else torch.zeros_like(value, dtype=torch.long)
    return crypten.mpc.MPCTensor.from_shares(share, precision=0)


def product(factors: MPC) -> MPC:
    """Product along the last dim by a tree (ceil(log2 m) multiplication rounds)."""
    crypten = _crypten()
    while factors.size(-1) > 1:
        m = factors.size(-1)
        half = m // 2
        prod = factors[..., :half] * factors[..., half: 2 * half]
        factors = crypten.cat([prod, factors[..., 2 * half:]], dim=-1) if m % 2 else prod
    return factors.squeeze(-1)


@functools.lru_cache(maxsize=64)
def _pair_index(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs (i < j) and, per element i, where its m-1 factors sit in cat([t, 1 - t])."""
    ii, jj = torch.triu_indices(m, m, offset=1)
    pos = {(int(i), int(j)): p for p, (i, j) in enumerate(zip(ii, jj, strict=True))}
    n_pairs = len(pos)
    idx = torch.empty(m, m - 1, dtype=torch.long)
    for i in range(m):
        col = 0
        for j in range(m):
            if j < i:
                idx[i, col] = pos[(j, i)]  # t(j, i) = [v_i < v_j]
            elif j > i:
                idx[i, col] = n_pairs + pos[(i, j)]  # 1 - t(i, j) = [v_i <= v_j]
            else:
                continue
            col += 1
    return ii, jj, idx


def first_argmin(values: MPC) -> MPC:
    """Integer-encoded one-hot of the first minimum along the last dim: all pairwise
    comparisons in one round of comparisons, then element i wins iff it is below every
    earlier element and not above any later one (a product of m-1 bits), so ties go to
    the lower index exactly as ``np.argmin``."""
    crypten = _crypten()
    m = values.size(-1)
    if m == 1:
        return shared_constant(torch.ones(tuple(values.size()), dtype=torch.long))
    ii, jj, idx = _pair_index(m)
    t = less_than(values[..., jj], values[..., ii])  # t(i, j) = [v_j < v_i], i < j
    both = crypten.cat([t, 1 - t], dim=-1)
    return product(both[..., idx])


def squared_norms(x: MPC) -> MPC:
    return x.square().sum(-1)


def range_violations(x: MPC) -> np.ndarray:
    """(N,) bool, opened: client rows with a coordinate outside [-COORD_BOUND, COORD_BOUND]
    or a squared norm above NORM_BOUND^2 (the ring comparison is exact for any shared
    value, so a client cannot pass a wrapped value)."""
    crypten = _crypten()
    n = x.size(0)
    coord = crypten.cat([x * -1 + COORD_BOUND, x + COORD_BOUND], dim=0)  # >= 0 when in range
    bad_coord = coord._ltz().sum(-1)  # (2N,)
    bad_coord = bad_coord[:n] + bad_coord[n:]
    bad_norm = less_than(squared_norms(x) * -1, -(NORM_BOUND ** 2))  # |x|^2 > bound^2
    bad = bad_coord + bad_norm  # integer counts
    flag = 1 - (bad - 1)._ltz()  # bad >= 1
    return flag.get_plain_text().numpy() > 0.5


def _public(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))


def assign(x: MPC, centres: np.ndarray, active: np.ndarray) -> MPC:
    """(N, G, k_max) integer one-hot: per group, the first argmax of ``<x_i, c_j>`` over
    the active slots (public centres (G, k_max, dim) on the fixed-point grid, public mask
    (G, k_max)). The scores are compared *unscaled* (scale 2^32, no truncation): each
    party multiplies its share by the public integer centres, so the order, ties
    included, is exactly the reference's."""
    crypten = _crypten()
    n, dim = x.size()
    g_count, k_max = active.shape
    grid = np.rint(on_grid(centres).reshape(g_count * k_max, dim).T * SCALE)
    share = x._tensor.share.matmul(torch.from_numpy(grid.astype(np.int64)))
    negated = -share.reshape(n, g_count, k_max)  # argmax of scores = argmin of -scores
    if crypten.comm.get().get_rank() == 0:  # padding and inactive slots never win
        pad = np.rint(PAD_SCORE * (1.0 - active) * SCALE * SCALE).astype(np.int64)
        negated = negated + torch.from_numpy(pad).unsqueeze(0)
    # the values are at scale 2^32, but only subtractions and sign tests touch them, which
    # do not depend on the scale (CrypTen's comparison fails with a 32-bit encoder)
    return first_argmin(crypten.mpc.MPCTensor.from_shares(negated, precision=PRECISION_BITS))


def open_noisy(value: MPC, share_std: float, mask: np.ndarray | None,
               noise: Any) -> np.ndarray:
    """Open ``value`` (fixed point) after adding this party's Gaussian noise share of std
    ``share_std`` (on the entries where ``mask`` broadcasts to 1); float64."""
    if share_std > 0:
        draw = noise.normal(tuple(value.size()), share_std).numpy()
        if mask is not None:
            draw = draw * mask
        encoded = torch.from_numpy(np.rint(draw * SCALE).astype(np.int64))
        value = value.clone()
        value._tensor.share = value._tensor.share + encoded  # this party's own noise
    raw = value._tensor.reveal()
    return raw.numpy().astype(np.float64) / SCALE


def silhouettes(x: MPC, sq: MPC, onehot: MPC, means: np.ndarray, active: np.ndarray,
                own: np.ndarray, groups_ok: np.ndarray) -> MPC:
    """(N, G) silhouettes (see :func:`fedprompt.secure.kmeans.silhouettes`), shared."""
    crypten = _crypten()
    n, dim = x.size()
    g_count, k_max = active.shape
    flat = _public(means.reshape(g_count * k_max, dim).T)
    xm = x.matmul(flat).reshape(n, g_count, k_max)
    dist = xm * -2 + 1.0 + sq.reshape(n, 1, 1)  # (N, G, k_max)
    a = (onehot * (dist * _public(own).unsqueeze(0))).sum(-1)  # (N, G)
    keep_mask = torch.from_numpy(((own > 0) * groups_ok[:, None]).astype(np.int64))
    keep = (onehot * keep_mask.unsqueeze(0)).sum(-1)  # integer 0/1
    push = to_fixed(onehot) * PAD_SCORE + _public(PAD_SCORE * (1.0 - active)).unsqueeze(0)
    b = (first_argmin(dist + push) * dist).sum(-1)
    ab = a + less_than(a, b) * (b - a)  # max(a, b)
    larger = ab + less_than(ab, SILHOUETTE_EPS) * (ab * -1 + SILHOUETTE_EPS)
    with crypten.cfg.temp_override({"functions.reciprocal_all_pos": True}):
        s = (b - a) * larger.reciprocal()
    out = crypten.stack([s + 1.0, s * -1 + 1.0])._ltz()  # s < -1, s > 1
    s = s + out[0] * (s * -1 - 1.0) + out[1] * (s * -1 + 1.0)
    return keep * s


def secure_dp_kmeans(x: MPC, k_max: int, iterations: int, seed: int, min_silhouette: float,
                     stds: NoiseStds, parties: int, noise: Any,
                     dummy: bool = False) -> SecureOutcome:
    """Run on every party with its share ``x`` (N, dim), fixed point. ``stds`` are the
    nominal noise stds of the releases (the reference's); this party adds its share
    ``std / sqrt(parties - 1)``. ``noise`` draws Gaussians (a CSPRNG stream of this
    party). ``dummy``: ``x`` is one public zero row standing for *no* client (its count
    is removed from the released values, which are then those of an empty input)."""
    n, dim = x.size()
    real = real_slots(k_max)
    share = 1.0 / math.sqrt(parties - 1)
    centres = group_centres(initial_centres(dim, k_max, seed))
    releases = Releases()
    threshold = weak_threshold(stds.sums, dim)
    sums_mask = real[..., None]
    for t in range(iterations - 1):
        onehot = assign(x, centres, real)
        sums = onehot.reshape(n, -1).t().matmul(x).reshape(k_max - 1, k_max, dim)
        noisy = open_noisy(sums, stds.sums * share, sums_mask, noise)
        releases.sums.append(noisy)
        centres, _ = next_centres(noisy, centres, threshold,
                                  reseed_vectors(dim, k_max, seed, t))
    onehot = assign(x, centres, real)
    sums = onehot.reshape(n, -1).t().matmul(x).reshape(k_max - 1, k_max, dim)
    counts = to_fixed(onehot.sum(0)).unsqueeze(-1)
    noisy_last = open_noisy(_crypten().cat([sums, counts], dim=-1), stds.last * share,
                            sums_mask, noise)
    if dummy:
        noisy_last[:, 0, -1] -= 1.0  # the zero row is in slot 0 of every group
    releases.last = noisy_last
    means, sizes = cluster_means(noisy_last)
    active, own, groups_ok = silhouette_factors(sizes, real, count_threshold(stds.last))
    sil = silhouettes(x, squared_norms(x), onehot, means, active, own, groups_ok)
    if dummy:
        sil = sil * 0
    count = to_fixed(shared_constant(torch.tensor([n], dtype=torch.long)))
    noisy_scores = open_noisy(_crypten().cat([sil.sum(0), count]), stds.scores * share,
                              None, noise)
    if dummy:
        noisy_scores[-1] -= 1.0
    releases.scores = noisy_scores
    k, criterion = choose_k(noisy_scores, min_silhouette, stds.scores)
    if k == 1 or dummy:
        labels = np.zeros(0 if dummy else n, dtype=np.int64)
    else:
        chosen = onehot[:, k - 2, :k]._tensor.reveal().numpy()
        labels = chosen.argmax(1).astype(np.int64)
    if k == 1:
        return SecureOutcome(k=1, labels=labels, centres=None,
                             counts=np.array([noisy_scores[-1]]), criterion=criterion,
                             releases=releases)
    return SecureOutcome(k=k, labels=labels,
                         centres=unit_rows(means[k - 2, :k], centres[k - 2, :k]),
                         counts=sizes[k - 2, :k].copy(), criterion=criterion,
                         releases=releases)


def secure_assign(x: MPC, centres: np.ndarray) -> np.ndarray:
    """(N,) opened labels of the rows of ``x`` against public centres (k, dim): the first
    argmax of ``<x_i, c_j>`` (no release beyond each client's own label)."""
    k = centres.shape[0]
    onehot = assign(x, centres[None], np.ones((1, k)))[:, 0, :]
    return onehot._tensor.reveal().numpy().argmax(1).astype(np.int64)
