"""Secure DP adaptive spherical k-means (2 CrypTen compute parties + TTP, separate
processes over loopback) against the plaintext reference, for several client counts and
dimensions.

    python experiments/benchmarks/secure_kmeans.py [--clients 10 50 100] [--dims 64 256]
        [--k-max 8] [--iterations 10] [--true-k 4] [--repeats 2] [--noise 0.0]

For every (N, dim): N unit vectors around ``--true-k`` centres are sealed exactly as
clients seal them, and the server-side ``SecureClustering.cluster`` is timed:

* cold: the first round of this size; each party first traces the tuple requests of the
  protocol by a local dry run (cached per size afterwards);
* warm: the best of ``--repeats`` later rounds of the same size (what a federated run
  with a fixed cohort pays every round);
* MB: bytes exchanged in the warm round as CrypTen's communicators count them (each
  party counts what it sends and receives; summed over the parties and halved, as
  CrypTen documents; party 0's count includes its traffic with the TTP);
* rounds: communication rounds counted by party 1;
* plaintext: the same algorithm in NumPy (``fedprompt.secure.kmeans``) on the same data;
* ARI and k: the MPC partition against the plaintext one (1.0 and equal k expected with
  ``--noise 0``; with noise the two runs draw different noise).

Party start-up (spawning 3 processes, importing torch and CrypTen, rendezvous) is timed
once per dimension and printed apart. Prints a table, then one JSON line with everything.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from fedprompt.secure.clustering import ClusteringSettings, round_seed, seal
from fedprompt.secure.fixed_point import decode, encode
from fedprompt.secure.kmeans import KMeansOutcome, dp_spherical_kmeans
from fedprompt.secure.mpc_clustering import SecureClustering


def clustered(n: int, dim: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.arange(n) % k
    rng.shuffle(labels)
    x = centres[labels] + 0.4 * rng.normal(size=(n, dim)) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference(x: np.ndarray, settings: ClusteringSettings, round_id: int) -> KMeansOutcome:
    """The plaintext reference on the fixed-point values the parties see (noise as set)."""
    rng = np.random.default_rng(round_id)
    return dp_spherical_kmeans(decode(encode(x)), settings.k_max, settings.iterations,
                               round_seed(settings.seed, round_id), settings.min_silhouette,
                               settings.noise_stds(),
                               lambda shape, std: rng.normal(0.0, std, shape))


def plaintext_seconds(x: np.ndarray, settings: ClusteringSettings, round_id: int) -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        reference(x, settings, round_id)
        times.append(time.perf_counter() - start)
    return min(times)


def measure(args: argparse.Namespace) -> tuple[list[dict], dict[int, float]]:
    rows: list[dict] = []
    startup: dict[int, float] = {}
    round_id = 0
    for dim in args.dims:
        settings = ClusteringSettings(dim=dim, k_max=args.k_max, iterations=args.iterations,
                                      seed=0, timeout_s=600.0, noise_multiplier=args.noise)
        start = time.perf_counter()
        with SecureClustering(settings) as backend:
            startup[dim] = time.perf_counter() - start
            material = backend.client_material()
            for n in args.clients:
                x = clustered(n, dim, args.true_k, seed=n * 1000 + dim)
                timings = []
                for _ in range(1 + args.repeats):
                    round_id += 1
                    subs = {cid: seal(x[cid], material, round_id, cid) for cid in range(n)}
                    start = time.perf_counter()
                    result = backend.cluster(round_id, subs)
                    timings.append((time.perf_counter() - start, result, round_id))
                cold = timings[0][0]
                warm, result, rid = min(timings[1:], key=lambda t: t[0])
                plain = reference(x, settings, rid)
                labels = np.array([result.assignments[c] for c in range(n)])
                seconds = plaintext_seconds(x, settings, rid)
                rows.append({
                    "clients": n, "dim": dim, "cold_s": cold, "warm_s": warm,
                    "bytes": result.stats["comm_bytes"],
                    "rounds": result.stats["party1_comm_rounds"],
                    "plaintext_s": seconds, "ratio": warm / seconds,
                    "k_mpc": result.k, "k_plain": plain.k,
                    "ari": adjusted_rand_score(plain.labels, labels),
                })
                print(f"  N={n:4d} dim={dim:4d}: cold {cold:6.2f} s, warm {warm:6.2f} s, "
                      f"k {result.k} (plaintext {plain.k})", flush=True)
    return rows, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--true-k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.0,
                        help="noise multiplier of every release (0: none)")
    args = parser.parse_args()
    wall = time.perf_counter()
    rows, startup = measure(args)
    print()
    print(f"secure DP spherical k-means, k_max {args.k_max}, {args.iterations} iterations, "
          f"noise multiplier {args.noise}, 2 parties + TTP on loopback")
    print("   N   dim   cold s   warm s   MB exch.    rounds   plaintext ms   warm/plain"
          "   k mpc/plain   ARI")
    for r in rows:
        print(f"{r['clients']:4d} {r['dim']:5d} {r['cold_s']:8.2f} {r['warm_s']:8.2f} "
              f"{r['bytes'] / 1e6:11.1f} {r['rounds']:8.0f} {r['plaintext_s'] * 1e3:14.2f} "
              f"{r['ratio']:12.0f} {r['k_mpc']:7d}/{r['k_plain']:<5d} {r['ari']:5.2f}")
    print("party start-up: " + ", ".join(f"dim {d}: {s:.1f} s" for d, s in startup.items())
          + f"; whole benchmark {time.perf_counter() - wall:.0f} s")
    print(json.dumps({"rows": rows, "startup_s": startup}))


if __name__ == "__main__":
    main()
