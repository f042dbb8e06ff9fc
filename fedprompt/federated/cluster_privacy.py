"""What SecFPP's clustering costs in privacy, and the noise that pays for it.

Every clustering run (:func:`fedprompt.secure.kmeans.release_plan`) is a fixed number of
Gaussian mechanisms on the set of clients that submitted, each at the same noise
multiplier ``z_c`` (its std is ``z_c`` times its L2 sensitivity under adding or removing
one client). They are accounted in the **server's** user-level accountant beside the
domain-prompt releases, as ``(z_c, 1.0, releases)`` entries of the Opacus RDP history
(entries compose additively):

* sample rate 1: the clustering uses the round's submitters (a Poisson sample at rate
  ``q``), but no amplification by that sampling is claimed. Composing it with the
  round's own domain-prompt release, which *is* accounted as subsampled, is sound: given
  everything released before, the clustering's output distribution is a mixture (over
  whether the client was sampled) of the Gaussian with and without the client, and a
  Rényi divergence of such a mixture to either component is at most that of the
  Gaussian pair (convexity), which is what the rate-1 entry accounts;
* every attempt counts in full, also one that failed (the parties may have opened some
  values among themselves before failing).

Noise multipliers (server DP on: ``privacy.mode != "off"`` and ``privacy.server``):

* ``z_c = clustering.noise_multiplier`` when given; else the smallest ``z_c`` whose
  planned clusterings alone spend ``clustering.epsilon_share x privacy.epsilon``;
* in ``target-epsilon`` mode the domain prompts' ``z`` is then calibrated so that the
  *composition* (``rounds`` releases at ``(z, q)`` plus the planned clusterings) reaches
  ``privacy.epsilon``; other modes keep their ``z`` and report the composed epsilon.

Without server DP the clustering adds no noise and is recorded as not private.
"""

from __future__ import annotations

import functools
import math

from fedprompt.config import RunConfig
from fedprompt.errors import ConfigError
from fedprompt.privacy.accounting import Accountant, AccountantName, calibrate_noise
from fedprompt.secure.fixed_point import vector_sensitivity
from fedprompt.secure.kmeans import release_plan, releases_per_run


def server_dp(config: RunConfig) -> bool:
    """Whether the domain prompts get user-level DP (then so does the clustering)."""
    return config.privacy.mode != "off" and config.privacy.server


def clusters_at_all(config: RunConfig) -> bool:
    return config.clustering.k_max > 1


def scheduled(config: RunConfig, server_round: int) -> bool:
    """Rounds 1, 1 + n, 1 + 2n, ... (n = cluster_every >= 1); round 1 for n = 0."""
    every = config.clustering.cluster_every
    if every == 0:
        return server_round == 1
    return (server_round - 1) % every == 0


def planned_clusterings(config: RunConfig) -> int:
    """Clustering runs the schedule plans over ``federation.rounds`` (retries after a
    failure are extra and must fit the budget)."""
    if not clusters_at_all(config):
        return 0
    return sum(scheduled(config, r) for r in range(1, config.federation.rounds + 1))


def vector_bound(config: RunConfig) -> float:
    return vector_sensitivity(config.clustering.reduce_dim, config.clustering.parties)


def run_releases(config: RunConfig) -> int:
    """Gaussian releases of one clustering run (all at ``z_c``)."""
    c = config.clustering
    return releases_per_run(c.k_max, c.iterations) if clusters_at_all(config) else 0


def describe_run(config: RunConfig) -> str:
    """The releases of one run, with their sensitivities, for the ledger."""
    c = config.clustering
    parts = [f"{r.count} x {r.name} (L2 sensitivity {r.sensitivity:.4g})"
             for r in release_plan(c.k_max, c.iterations, vector_bound(config)) if r.count]
    return "; ".join(parts)


def clustering_noise_multiplier(config: RunConfig) -> float:
    """``z_c`` (0: the clustering adds no noise: server DP is off, or k_max = 1)."""
    if not server_dp(config) or not clusters_at_all(config):
        return 0.0
    given = config.clustering.noise_multiplier
    if given > 0:
        return given
    privacy = config.privacy
    steps = planned_clusterings(config) * run_releases(config)
    if steps == 0:
        return 0.0
    return calibrate_noise(privacy.epsilon * config.clustering.epsilon_share, privacy.delta,
                           1.0, steps, privacy.accountant)


def domain_noise_multiplier(config: RunConfig, default: float) -> float:
    """The domain prompts' noise multiplier: ``default`` (the global methods' choice)
    except in target-epsilon mode, where it is calibrated for the composition with the
    planned clusterings."""
    privacy = config.privacy
    if not server_dp(config) or privacy.mode != "target-epsilon":
        return default
    z_c = clustering_noise_multiplier(config)
    steps = planned_clusterings(config) * run_releases(config)
    return calibrate_composed(privacy.epsilon, privacy.delta, config.federation.fraction_train,
                              config.federation.rounds, z_c, steps, privacy.accountant)


@functools.lru_cache(maxsize=64)
def calibrate_composed(epsilon: float, delta: float, sample_rate: float, rounds: int,
                       fixed_noise: float, fixed_steps: int, kind: AccountantName) -> float:
    """Smallest ``z`` (to a relative 1e-4) with epsilon(``rounds`` steps at
    ``(z, sample_rate)`` + ``fixed_steps`` at ``(fixed_noise, 1)``) <= ``epsilon``."""
    fixed = [(fixed_noise, 1.0, fixed_steps)] if fixed_steps and fixed_noise > 0 else []

    def spent(z: float) -> float:
        return Accountant(kind, [(z, sample_rate, rounds), *fixed]).epsilon(delta)

    floor = Accountant(kind, fixed).epsilon(delta) if fixed else 0.0
    if floor >= epsilon:
        raise ConfigError(
            f"the planned clusterings alone spend epsilon {floor:.4g} >= privacy.epsilon="
            f"{epsilon}: raise clustering.noise_multiplier (or lower clustering."
            "epsilon_share), lower clustering.iterations or k_max, cluster less often "
            "(clustering.cluster_every), or raise privacy.epsilon")
    lo, hi = 1e-3, 1.0
    while spent(hi) > epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e7:
            raise ConfigError(f"cannot reach epsilon={epsilon} over {rounds} rounds at "
                              f"sampling rate {sample_rate:.4g} next to the clustering")
    while hi / lo > 1.0 + 1e-4:
        mid = math.sqrt(lo * hi)
        if spent(mid) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi
