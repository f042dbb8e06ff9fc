"""Secure clustering: fixed-point guard, sealing, share privacy, plaintext reference, and
the CrypTen compute parties (real processes over loopback) against the reference."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats
from sklearn.metrics import adjusted_rand_score

from fedprompt.secure.clustering import (
    ClusteringError,
    ClusteringSettings,
    ShareRejected,
    make_backend,
    round_seed,
    seal,
)
from fedprompt.secure.fixed_point import COORD_BOUND, SCALE, check_vector, decode, encode
from fedprompt.secure.kmeans import Releases, assign, dp_spherical_kmeans
from fedprompt.secure.plaintext_clustering import PlaintextClustering
from fedprompt.secure.sealing import (
    open_part,
    public_key_bytes,
    seal_encoded,
    seal_vector,
    split_sealed,
    split_shares,
)


def clustered(n: int, dim: int, k: int, spread: float, seed: int) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """Unit vectors around k random unit centres; labels balanced and shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.arange(n) % k
    rng.shuffle(labels)
    x = centres[labels] + spread * rng.normal(size=(n, dim)) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def keys(parties: int = 2) -> tuple[list[X25519PrivateKey], dict[str, bytes]]:
    private = [X25519PrivateKey.generate() for _ in range(parties)]
    material = {"backend": b"secure", "dim": b"8", "parties": str(parties).encode()}
    for i, key in enumerate(private):
        material[f"party_key_{i}"] = public_key_bytes(key.public_key())
    return private, material


# -- plaintext reference ------------------------------------------------------------------

@pytest.mark.parametrize(("n", "dim", "k"), [(30, 16, 3), (60, 64, 4), (40, 256, 1)])
def test_reference_kmeans_finds_known_clusters(n, dim, k):
    x, labels = clustered(n, dim, k, 0.4, seed=n + dim)
    out = dp_spherical_kmeans(x, k_max=8, iterations=10, seed=1)
    assert out.k == k
    assert adjusted_rand_score(labels, out.labels) == 1.0
    if k > 1:
        assert out.centres.shape == (k, dim)
        assert np.allclose(np.linalg.norm(out.centres, axis=1), 1.0)
        # the centres are the clusters' mean directions; the sizes are exact without noise
        for j in range(k):
            mean = x[out.labels == j].mean(0)
            assert out.centres[j] @ mean / np.linalg.norm(mean) > 0.999
        assert np.array_equal(out.counts, np.bincount(out.labels, minlength=k))
    else:
        assert out.centres is None and out.counts.tolist() == [n]


def test_reference_kmeans_is_deterministic_and_starts_from_public_centres():
    x, _ = clustered(25, 8, 3, 0.3, seed=4)
    a = dp_spherical_kmeans(x, 5, 10, seed=7)
    b = dp_spherical_kmeans(x, 5, 10, seed=7)
    assert np.array_equal(a.labels, b.labels) and a.k == b.k
    # the start does not depend on the data: permuting the clients permutes the labels
    perm = np.random.default_rng(0).permutation(25)
    c = dp_spherical_kmeans(x[perm], 5, 10, seed=7)
    assert np.array_equal(c.labels, a.labels[perm])
    # every release is recorded: iterations - 1 sums, then sums | sizes, then scores
    assert len(a.releases.sums) == 9 and a.releases.last.shape == (4, 5, 9)
    assert a.releases.scores.shape == (5,) and a.releases.scores[-1] == 25
    with pytest.raises(ValueError, match="k_max must be >= 2"):
        dp_spherical_kmeans(x, 1, 10, seed=7)


def test_reference_labels_depend_on_the_own_vector_and_the_releases_only():
    """Replaying the releases of a run on all clients, any subset of the clients gets
    the same k, centres, sizes and labels (the billboard structure the DP argument
    needs), also when the releases are noisy."""
    x, _ = clustered(20, 8, 3, 0.5, seed=3)
    rng = np.random.default_rng(5)
    stds = ClusteringSettings(dim=8, k_max=4, iterations=4, noise_multiplier=0.8).noise_stds()
    full = dp_spherical_kmeans(x, 4, 4, seed=2, noise=stds,
                               draw=lambda shape, std: rng.normal(0.0, std, shape))
    subset = np.arange(20)[rng.random(20) < 0.5]
    part = dp_spherical_kmeans(x[subset], 4, 4, seed=2, noise=stds, replay=full.releases)
    assert part.k == full.k and np.array_equal(part.labels, full.labels[subset])
    assert np.array_equal(part.counts, full.counts)
    with pytest.raises(ValueError, match="replayed scores has shape"):
        dp_spherical_kmeans(x, 4, 4, seed=2, noise=stds, replay=Releases(
            sums=full.releases.sums, last=full.releases.last, scores=np.zeros(2)))


def test_plaintext_backend_clusters_and_excludes_bad_submissions(caplog):
    x, labels = clustered(20, 8, 2, 0.3, seed=2)
    backend = make_backend(ClusteringSettings(dim=8, k_max=4), "plaintext")
    assert isinstance(backend, PlaintextClustering) and backend.insecure
    material = backend.client_material()
    subs = {cid: seal(x[cid], material, 5, cid) for cid in range(20)}
    subs[100] = subs[0][:-8]  # truncated
    subs[101] = subs[1]  # sealed for another client
    result = backend.cluster(5, subs)
    assert set(result.excluded) == {100, 101}
    assert "size" in result.excluded[100] and "client 1" in result.excluded[101]
    assert "client 100 excluded" in caplog.text
    got = np.array([result.assignments[c] for c in range(20)])
    assert result.k == 2 and adjusted_rand_score(labels, got) == 1.0
    assert result.private is False and result.centres.shape == (2, 8)
    # no submission at all: the releases are made anyway (nobody's presence is a branch)
    empty = backend.cluster(6, {})
    assert empty.assignments == {} and empty.releases.scores[-1] == 0.0
    # labelling against public centres releases nothing but each client's own label
    found, bad = backend.assign(7, {c: seal(x[c], material, 7, c) for c in range(5)},
                                result.centres)
    assert not bad and found == {c: result.assignments[c] for c in range(5)}


def test_settings_are_validated():
    with pytest.raises(ValueError, match="n_parties must be >= 2"):
        ClusteringSettings(n_parties=1)
    with pytest.raises(ValueError, match="party_addresses"):
        ClusteringSettings(n_parties=2, party_addresses=("h:1",))
    with pytest.raises(ValueError, match="unknown clustering backend"):
        make_backend(ClusteringSettings(), "magic")


# -- fixed-point range guard ----------------------------------------------------------------

@pytest.mark.parametrize(("vector", "message"), [
    (np.r_[1.5, np.zeros(7)], "magnitude 1.5"),
    (np.full(8, 0.5), "L2 norm"),
    (np.r_[np.nan, np.zeros(7)], "non-finite"),
    (np.zeros(5), r"shape \(5,\), expected \(8,\)"),
])
def test_out_of_range_vectors_are_rejected_with_a_clear_error(vector, message):
    with pytest.raises(ShareRejected, match=message):
        check_vector(vector, 8)
    _, material = keys()
    with pytest.raises(ShareRejected, match=message):
        seal_vector(vector, material, 0, 1)
    with pytest.raises(ShareRejected, match=message):
        PlaintextClustering.seal(vector, {"dim": b"8"}, 0, 1)


def test_encoding_is_crypten_fixed_point_and_shares_reconstruct():
    v = np.array([0.5, -0.25, 1.0, -1.0, 1 / 3, 0.0, 1e-6, -0.7])
    assert np.array_equal(encode(v), np.rint(v * SCALE).astype(np.int64))
    shares = split_shares(encode(v), 3)
    total = sum(shares[1:], shares[0].copy())  # uint64 wraps mod 2^64
    assert np.array_equal(total.view(np.int64), encode(v))


# -- sealing: who can read what -------------------------------------------------------------

def test_a_share_opens_only_for_its_party_and_any_tampering_is_rejected():
    private, material = keys()
    v = np.full(8, 1 / np.sqrt(8))
    blob = seal_vector(v, material, round_id=3, client_id=9)
    parts = split_sealed(blob, 3, 9, 8, 2)  # the server needs no key to relay
    shares = [open_part(parts[i], private[i], i, 3, 9, 8, 2) for i in range(2)]
    assert np.array_equal((shares[0].view(np.uint64) + shares[1].view(np.uint64)).view(
        np.int64), encode(v))
    with pytest.raises(ShareRejected, match="does not decrypt"):
        open_part(parts[0], private[1], 0, 3, 9, 8, 2)  # party 1's key on party 0's part
    with pytest.raises(ShareRejected, match="does not decrypt"):
        open_part(parts[0], private[1], 1, 3, 9, 8, 2)  # ... claimed as party 1's part
    tampered = bytearray(parts[1])
    tampered[-20] ^= 1
    with pytest.raises(ShareRejected, match="does not decrypt"):
        open_part(bytes(tampered), private[1], 1, 3, 9, 8, 2)
    with pytest.raises(ShareRejected, match="does not match"):
        open_part(parts[1], private[1], 1, 4, 9, 8, 2)  # replayed into another round
    with pytest.raises(ShareRejected, match="expected round 3, client 8"):
        split_sealed(blob, 3, 8, 8, 2)
    with pytest.raises(ShareRejected, match="bytes, expected"):
        split_sealed(blob + b"x", 3, 9, 8, 2)


def test_shares_and_ciphertexts_do_not_depend_on_the_prompt():
    """What one party (a share) or the server (the sealed bytes) receives is uniformly
    random whatever the vector: prompts A and B are indistinguishable to KS and chi-square
    tests, and each party's share is uniform on the ring."""
    private, material = keys()
    dim, reps = 8, 600
    a = np.zeros(dim)
    a[0] = 1.0
    b = np.full(dim, -1 / np.sqrt(dim))
    alpha = 1e-4
    draws: dict[str, list[list[np.ndarray]]] = {"a": [[], []], "b": [[], []]}
    wire: dict[str, list[bytes]] = {"a": [], "b": []}
    for name, vec in (("a", a), ("b", b)):
        for r in range(reps):
            blob = seal_vector(vec, material, r, 1)
            wire[name].append(blob[26:])  # after the public header
            for party, part in enumerate(split_sealed(blob, r, 1, dim, 2)):
                share = open_part(part, private[party], party, r, 1, dim, 2)
                draws[name][party].append(share.view(np.uint64))
    for party in range(2):
        u_a = np.concatenate(draws["a"][party]).astype(np.float64) / 2.0**64
        u_b = np.concatenate(draws["b"][party]).astype(np.float64) / 2.0**64
        assert stats.kstest(u_a, "uniform").pvalue > alpha
        assert stats.kstest(u_b, "uniform").pvalue > alpha
        assert stats.ks_2samp(u_a, u_b).pvalue > alpha
        bytes_a = np.frombuffer(np.concatenate(draws["a"][party]).tobytes(), np.uint8)
        bytes_b = np.frombuffer(np.concatenate(draws["b"][party]).tobytes(), np.uint8)
        table = np.stack([np.bincount(bytes_a, minlength=256),
                          np.bincount(bytes_b, minlength=256)])
        assert stats.chi2_contingency(table).pvalue > alpha
    on_wire = [np.frombuffer(b"".join(wire[n]), np.uint8) for n in ("a", "b")]
    assert len(on_wire[0]) == len(on_wire[1])
    table = np.stack([np.bincount(w, minlength=256) for w in on_wire])
    assert stats.chi2_contingency(table).pvalue > alpha


# -- the CrypTen compute parties ------------------------------------------------------------

SETTINGS = ClusteringSettings(dim=16, k_max=6, iterations=6, seed=11, timeout_s=90.0)


@pytest.fixture(scope="module")
def secure():
    from fedprompt.secure.mpc_clustering import SecureClustering

    backend = SecureClustering(SETTINGS)
    yield backend
    backend.close()
    assert all(p.poll() is not None for p in backend._procs) or not backend._procs


def _reference(x: np.ndarray, round_id: int, settings: ClusteringSettings = SETTINGS):
    """The plaintext reference on the fixed-point values the parties compute with."""
    return dp_spherical_kmeans(decode(encode(x)), settings.k_max, settings.iterations,
                               round_seed(settings.seed, round_id), settings.min_silhouette)


def test_mpc_equals_the_plaintext_reference_without_noise(secure):
    """Same public start, same iterations: identical k and labels, and the same released
    values (the cluster sums exactly: integer one-hots times fixed-point vectors)."""
    for round_id, (n, k) in ((1, (24, 3)), (4, (12, 2)), (5, (15, 1))):
        x, labels = clustered(n, 16, k, 0.4, seed=5 + round_id)
        material = secure.client_material()
        result = secure.cluster(round_id, {cid: seal(x[cid], material, round_id, cid)
                                           for cid in range(n)})
        reference = _reference(x, round_id)
        got = np.array([result.assignments[cid] for cid in range(n)])
        assert result.k == reference.k == k
        assert np.array_equal(got, reference.labels)
        assert adjusted_rand_score(labels, got) == 1.0
        assert not result.excluded and result.private is False
        for mpc, plain in zip(result.releases.sums, reference.releases.sums, strict=True):
            assert np.array_equal(mpc, plain)
        assert np.array_equal(result.releases.last, reference.releases.last)
        # silhouettes go through a fixed-point reciprocal: close, not identical
        assert np.allclose(result.criterion, reference.criterion, atol=2e-3)
        assert np.array_equal(result.counts, reference.counts)
        if k > 1:
            assert np.allclose(result.centres, reference.centres, atol=1e-9)
        # every Beaver tuple came from the batched prefetch
        assert result.stats["party0_kmeans_tuple_misses"] == 0
        assert result.stats["comm_bytes"] > 0
    # labelling against public centres: the same as the reference
    found, bad = secure.assign(6, {cid: seal(x[cid], material, 6, cid) for cid in range(n)},
                               np.eye(16)[:3])
    assert not bad
    assert [found[c] for c in range(n)] == assign(decode(encode(x)), np.eye(16)[:3]).tolist()


def test_mpc_noise_has_the_configured_std():
    """Every party adds its own N(0, sigma^2 / (P - 1)) to its share before a release is
    opened, so the server sees N(0, sigma^2 P / (P - 1)) with sigma = noise_multiplier x
    the release's sensitivity. Measured against the exact values the reference computes
    from the same public centres (fixed data, 8 rounds): the first iteration's sums, the
    last iteration's sums and sizes, and the scores."""
    from fedprompt.secure.mpc_clustering import SecureClustering

    settings = ClusteringSettings(dim=16, k_max=3, iterations=2, seed=3, timeout_s=90.0,
                                  noise_multiplier=0.7)
    stds = settings.noise_stds()
    factor = np.sqrt(settings.n_parties / (settings.n_parties - 1))
    x, _ = clustered(12, 16, 2, 0.4, seed=1)
    xq = decode(encode(x))

    def zero(shape: tuple[int, ...], std: float) -> np.ndarray:
        return np.zeros(shape)  # exact values under the same public thresholds

    real = np.array([[1, 1, 0], [1, 1, 1]], dtype=bool)
    z = {"sums": [], "last": [], "scores": []}
    with SecureClustering(settings) as backend:
        material = backend.client_material()
        for round_id in range(1, 9):
            got = backend.cluster(round_id, {c: seal(x[c], material, round_id, c)
                                             for c in range(12)}).releases
            seed = round_seed(settings.seed, round_id)
            exact = dp_spherical_kmeans(xq, 3, 2, seed, noise=stds, draw=zero)
            assert np.all(got.sums[0][~real] == 0)  # padding slots: no noise, nothing
            z["sums"].append((got.sums[0] - exact.releases.sums[0])[real].ravel()
                             / (stds.sums * factor))
            given = dp_spherical_kmeans(xq, 3, 2, seed, noise=stds, draw=zero,
                                        replay=Releases(sums=got.sums))
            z["last"].append((got.last - given.releases.last)[real].ravel()
                             / (stds.last * factor))
            scored = dp_spherical_kmeans(xq, 3, 2, seed, noise=stds, draw=zero,
                                         replay=Releases(sums=got.sums, last=got.last))
            z["scores"].append((got.scores - scored.releases.scores) / (stds.scores * factor))
    for name, parts in z.items():
        sample = np.concatenate(parts)
        assert stats.kstest(sample, "norm").pvalue > 1e-4, name
        if len(sample) > 100:
            assert 0.9 < sample.std() < 1.1, (name, sample.std())


def test_server_object_holds_no_private_key(secure):
    seen: set[int] = set()

    def walk(obj: object, depth: int = 0) -> None:
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        assert not isinstance(obj, X25519PrivateKey), "the server holds a private key"
        if isinstance(obj, dict):
            for value in obj.values():
                walk(value, depth + 1)
        elif isinstance(obj, list | tuple | set):
            for value in obj:
                walk(value, depth + 1)
        elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                walk(value, depth + 1)

    walk(secure)
    material = secure.client_material()
    assert set(material) == {"backend", "dim", "parties", "party_key_0", "party_key_1"}
    # the key files sit with the party processes; the server object never read them
    for key_file in secure._state_dir.glob("*.key"):
        assert key_file.stat().st_mode & 0o077 == 0
        assert key_file.read_bytes() not in {v for v in material.values()}


def test_bad_submissions_are_excluded_not_fatal(secure, caplog):
    x, labels = clustered(16, 16, 2, 0.3, seed=8)
    material = secure.client_material()
    rnd = 2
    subs = {cid: seal(x[cid], material, rnd, cid) for cid in range(16)}
    subs[50] = seal(x[2], material, rnd, 50)[:-1]  # wrong size
    subs[51] = seal(np.ones(8) / np.sqrt(8),
                    {**material, "dim": b"8"}, rnd, 51)  # wrong dimension
    stranger = {**material, "party_key_1": public_key_bytes(
        X25519PrivateKey.generate().public_key())}
    subs[52] = seal(x[1], stranger, rnd, 52)  # party 1 cannot decrypt its part
    big = np.zeros(16)
    big[3] = 3.0 * COORD_BOUND  # a client that skips the range check
    subs[53] = seal_encoded(encode(big), [material["party_key_0"], material["party_key_1"]],
                            rnd, 53)
    result = secure.cluster(rnd, subs)
    assert set(result.excluded) == {50, 51, 52, 53}
    assert "bytes, expected" in result.excluded[50]
    assert "dim 8" in result.excluded[51]
    assert "party 1" in result.excluded[52] and "decrypt" in result.excluded[52]
    assert "fixed-point range" in result.excluded[53]
    assert "client 53 excluded" in caplog.text
    got = np.array([result.assignments[c] for c in range(16)])
    assert set(result.assignments) == set(range(16))
    assert result.k == 2 and adjusted_rand_score(labels, got) == 1.0


def test_a_killed_party_fails_the_round_quickly_and_nothing_hangs(secure):
    """Runs last on the shared backend: afterwards its processes are gone."""
    x, _ = clustered(400, 16, 3, 0.4, seed=9)  # a new size: traced first, then run
    material = secure.client_material()
    subs = {cid: seal(x[cid], material, 3, cid) for cid in range(400)}
    victim = secure.party_pids()[1]
    killer = threading.Timer(0.5, os.kill, (victim, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    with pytest.raises(ClusteringError, match="round 3 failed") as info:
        secure.cluster(3, subs)
    elapsed = time.monotonic() - start
    killer.join()
    assert elapsed < SETTINGS.timeout_s
    assert "party 1 exited" in str(info.value) or "closed" in str(info.value)
    assert secure.party_pids() == []  # survivors were killed, to restart next round


@pytest.mark.slow
def test_parties_restart_after_a_failure_and_refuse_replayed_shares():
    from fedprompt.secure.mpc_clustering import SecureClustering

    x, labels = clustered(20, 16, 2, 0.3, seed=12)
    with SecureClustering(SETTINGS) as b:
        material = b.client_material()
        ok = b.cluster(1, {c: seal(x[c], material, 1, c) for c in range(20)})
        assert ok.k == 2 and not ok.private and len(ok.releases.sums) == 5
        replayed = {c: seal(x[c], material, 1, c) for c in range(20)}
        assert b.cluster(1, replayed).k == 2  # a round may be re-run with fresh seals
        again_old = b.cluster(1, {**replayed, 99: seal(x[0], material, 1, 99)})
        assert set(again_old.excluded) == set(range(20))  # but no share is used twice
        assert "replayed" in again_old.excluded[0]
        assert again_old.assignments == {99: 0}
        assert b.cluster(2, {c: seal(x[c], material, 2, c) for c in range(20)}).k == 2
        os.kill(b.party_pids()[0], signal.SIGKILL)
        with pytest.raises(ClusteringError, match="party 0"):
            b.cluster(3, {c: seal(x[c], material, 3, c) for c in range(20)})
        again = b.cluster(4, {c: seal(x[c], b.client_material(), 4, c) for c in range(20)})
        assert b.client_material() == material  # the restarted parties kept their keys
        got = np.array([again.assignments[c] for c in range(20)])
        assert adjusted_rand_score(labels, got) == 1.0


def test_party_command_line_is_validated(capsys):
    from fedprompt.secure.party import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--rank", "0", "--parties", "1", "--rendezvous", "tcp://h:1"])
    assert "at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--rank", "0", "--parties", "2", "--rendezvous", "tcp://h:1"])
    assert "--listen and --key-file" in capsys.readouterr().err
    args = parse_args(["--ttp", "--parties", "2", "--rendezvous", "tcp://h:1"])
    assert args.ttp and args.supervise is False


@pytest.mark.slow
def test_standalone_parties_started_from_the_command_line(tmp_path):
    """Deployment shape: parties and TTP started by `python -m fedprompt.secure.party
    --supervise`; the server connects to them (party_addresses) and only relays."""
    import socket
    import subprocess
    import sys

    from fedprompt.secure.mpc_clustering import SecureClustering

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    token = "test-token-" + os.urandom(8).hex()
    env = {**os.environ, "FEDPROMPT_PARTY_TOKEN": token, "OMP_NUM_THREADS": "1"}
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    ports = [free_port(), free_port()]
    base = [sys.executable, "-m", "fedprompt.secure.party", "--parties", "2",
            "--rendezvous", rendezvous, "--supervise"]
    commands = [[*base, "--rank", str(r), "--listen", f"127.0.0.1:{ports[r]}",
                 "--key-file", str(tmp_path / f"party{r}.key")] for r in range(2)]
    commands.append([*base, "--ttp"])
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for c in commands]
    try:
        settings = dataclasses.replace(
            SETTINGS, party_addresses=tuple(f"127.0.0.1:{p}" for p in ports),
            auth_token=token)
        x, labels = clustered(18, 16, 3, 0.3, seed=21)
        with SecureClustering(settings) as backend:
            material = backend.client_material()
            result = backend.cluster(1, {c: seal(x[c], material, 1, c) for c in range(18)})
        got = np.array([result.assignments[c] for c in range(18)])
        assert result.k == 3 and adjusted_rand_score(labels, got) == 1.0
        with pytest.raises(ClusteringError, match="token"):
            SecureClustering(dataclasses.replace(settings, auth_token="x" * 20,
                                                 startup_timeout_s=5.0))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
