"""CrypTen's fixed-point encoding, and the input range secure k-means is safe in.

CrypTen stores a real ``x`` as the ring element ``round(x * 2^16) mod 2^64`` (16
fractional bits, :data:`SCALE`), read back as a signed 64-bit integer. A product of two
encoded values carries scale ``2^32`` until it is truncated, so it must stay below
``2^63`` in magnitude; with 2 parties the share-wise truncation also fails with a
probability about ``|value| * 2^32 / 2^64`` per element, which is why every intermediate
is kept small.

**The guarded input range.** Clients submit unit vectors (:func:`reduce_prompt`); we
accept an L2 norm up to :data:`NORM_BOUND` (float slack) and therefore ``|x_i| <=``
:data:`COORD_BOUND`. With ``N <=`` :data:`MAX_CLIENTS` points in the unit ball every
quantity of the k-means stays tiny compared with the ring:

* ``x . c``, ``|c|^2``, ``|x|^2`` in ``[-1, 1]``: raw product ``< 2^33``;
* scores ``|c|^2 - 2 x.c`` in ``[-1, 3]`` (+64 on padding slots): ``< 2^39``;
* counts in ``[0, N]``, centroid sums in ``[-N, N]``: ``< 2^42``;
* ``1 / count`` in ``[1/N, 1]`` (Newton-Raphson from the public ``1/N``): ``< 2^33``;
* distance sums of the silhouette in ``[0, 4 N]``: ``< 2^44``;

so nothing approaches ``2^63``. :data:`MAX_CLIENTS` bounds N where ``1/count`` still has
useful precision (absolute error ``2^-16``, i.e. a relative error up to ``N 2^-16``,
0.8 % at 512) and where the pairwise comparisons of the farthest-point search
(``N (N - 1) / 2`` per step) stay cheap. Inputs outside the range are
rejected (:class:`ShareRejected`), never wrapped: by the client before sealing, by the
plaintext backend, and by the compute parties under MPC (``verify_range``) for shares
whose reconstruction a client could have chosen freely.
"""

from __future__ import annotations

import numpy as np

from fedprompt.secure.errors import ShareRejected

PRECISION_BITS = 16
SCALE = 1 << PRECISION_BITS
RING_BITS = 64
RING_MODULUS = 1 << RING_BITS
NORM_BOUND = 1.0 + 1e-3
COORD_BOUND = NORM_BOUND
MAX_CLIENTS = 512
MAX_DIM = 4096


def check_vector(vector: object, dim: int, who: str = "vector") -> np.ndarray:
    """The vector as float64 (dim,) if it is finite, of length ``dim`` and inside the
    guarded range; otherwise :class:`ShareRejected` naming what is wrong."""
    try:
        arr = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ShareRejected(f"{who} is not a numeric array: {exc}") from exc
    if arr.ndim != 1 or arr.shape[0] != dim:
        raise ShareRejected(f"{who} has shape {tuple(arr.shape)}, expected ({dim},)")
    if not np.all(np.isfinite(arr)):
        raise ShareRejected(f"{who} has non-finite entries (NaN or inf)")
    worst = float(np.max(np.abs(arr))) if dim else 0.0
    if worst > COORD_BOUND:
        raise ShareRejected(
            f"{who} has an entry of magnitude {worst:.4g} > {COORD_BOUND}: outside the "
            "fixed-point range of secure k-means (submit unit vectors, see reduce_prompt)")
    norm = float(np.linalg.norm(arr))
    if norm > NORM_BOUND:
        raise ShareRejected(
            f"{who} has L2 norm {norm:.4g} > {NORM_BOUND}: outside the fixed-point range of "
            "secure k-means (submit unit vectors, see reduce_prompt)")
    return arr


def vector_sensitivity(dim: int, parties: int) -> float:
    """An upper bound on the L2 norm of any vector the compute parties accept, i.e. on one
    client's contribution to a cluster sum: the MPC range check compares the squared norm
    computed with one truncation per coordinate (an error below ``parties`` units of
    ``2^-16`` each) against ``NORM_BOUND^2``, so ``|x|^2 <= NORM_BOUND^2 + parties dim
    2^-16``. (A truncation can also fail outright with probability about ``2^-31`` per
    coordinate; the exact coordinate check still bounds such a vector by
    ``sqrt(dim) COORD_BOUND``.) The plaintext backend checks exactly; it is accounted with
    the same bound."""
    return float(np.sqrt(NORM_BOUND ** 2 + parties * dim / SCALE))


def check_dims(dim: int, n_clients: int | None = None) -> None:
    """Raise ``ValueError`` if the problem size is outside the documented range."""
    if not 1 <= dim <= MAX_DIM:
        raise ValueError(f"dim must be in [1, {MAX_DIM}], got {dim}")
    if n_clients is not None and n_clients > MAX_CLIENTS:
        raise ValueError(
            f"{n_clients} clients exceed the {MAX_CLIENTS} secure k-means supports (CrypTen's "
            "reciprocal of cluster counts converges only below about 666)")


def encode(vector: np.ndarray) -> np.ndarray:
    """Fixed-point encode a checked vector: int64 ``round(x * 2^16)`` (two's complement,
    i.e. the ring element mod 2^64)."""
    return np.rint(np.asarray(vector, dtype=np.float64) * SCALE).astype(np.int64)


def decode(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).astype(np.float64) / SCALE
