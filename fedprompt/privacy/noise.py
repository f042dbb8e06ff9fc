"""Randomness for DP mechanisms: Gaussian noise and Poisson sampling from a CSPRNG.

A DP guarantee assumes the adversary cannot predict the noise or which records a step
sampled. torch's and NumPy's generators (Mersenne Twister, PCG64) are not
cryptographically secure: their outputs reveal their state. Opacus' ``secure_mode`` fixes
this with ``torchcsprng``, which has no build for recent torch releases. So fedprompt
draws every DP-relevant random number from :class:`SecureRandom`:

* the bits are a ChaCha20 keystream from the ``cryptography`` package (the stream cipher
  the Linux kernel's CSPRNG uses), keyed by 256 bits from ``os.urandom``; nothing is
  hand-rolled: uniform floats take the top 53 bits of 64-bit words, Gaussians come from
  the Box-Muller transform, both in float64;
* every Gaussian coordinate is ``(g_1 + g_2 + g_3 + g_4) / 2`` with four independent
  standard draws, exactly as Opacus' ``secure_mode`` does against floating-point attacks
  on the noise's low bits (Holohan & Braghin 2021, Jin et al. 2021: summing ``2n`` draws
  with ``n = 2`` raises an attack's cost to about ``2^159``);
* noise is float64 and added to float64 sums; a result is cast to the parameter's dtype
  only after the noise is in.

Reproducible streams (tests, bit-exact comparisons: ``privacy.reproducible_noise``) key
the same cipher by a SHA-256 of a seed and a purpose. Only they have a state worth
saving (key and offset); a secure stream's key never leaves the process, so a client
that is restarted draws from a fresh key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_BLOCK = 64  # ChaCha20 block size in bytes


class SecureRandom:
    """Uniform and Gaussian draws from a ChaCha20 keystream.

    ``SecureRandom()`` is keyed from ``os.urandom`` (the default for every DP mechanism);
    :meth:`from_seed` gives a reproducible stream for tests.
    """

    def __init__(self, key: bytes | None = None, offset: int = 0, *,
                 reproducible: bool = False) -> None:
        if key is not None and len(key) != 32:
            raise ValueError("a ChaCha20 key has 32 bytes")
        if offset < 0:
            raise ValueError("the stream offset cannot be negative")
        self.reproducible = reproducible
        self._key = key if key is not None else os.urandom(32)
        self._offset = 0
        self._encryptor = Cipher(algorithms.ChaCha20(self._key, bytes(16)), mode=None
                                 ).encryptor()
        if offset:
            self._seek(offset)

    @classmethod
    def from_seed(cls, *parts: object) -> SecureRandom:
        """A reproducible stream keyed by SHA-256 of ``parts`` (a seed and a purpose)."""
        material = "/".join(["fedprompt-secure-random", *map(str, parts)]).encode()
        return cls(hashlib.sha256(material).digest(), reproducible=True)

    def _seek(self, offset: int) -> None:
        block, rest = divmod(offset, _BLOCK)
        nonce = block.to_bytes(4, "little") + bytes(12)
        self._encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        self._encryptor.update(bytes(rest))
        self._offset = offset

    # ------------------------------------------------------------------- draws
    def random_bytes(self, n: int) -> bytes:
        self._offset += n
        return self._encryptor.update(bytes(n))

    def uniform(self, size: int | tuple[int, ...]) -> np.ndarray:
        """Floats uniform on ``[0, 1)`` with 53 random bits each (float64)."""
        shape = (size,) if isinstance(size, int) else tuple(size)
        count = math.prod(shape)
        words = np.frombuffer(self.random_bytes(8 * count), dtype="<u8")
        return ((words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53).reshape(shape)

    def standard_normal(self, count: int) -> np.ndarray:
        """``count`` independent standard normal draws (Box-Muller, float64)."""
        pairs = (count + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))  # 1 - u in (0, 1]
        angle = 2.0 * math.pi * u[pairs:]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]

    def normal(self, shape: tuple[int, ...] | torch.Size, std: float,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """Gaussian noise ``N(0, std^2)`` of ``shape`` in float64, each coordinate the
        halved sum of four standard draws (Opacus' ``secure_mode`` construction)."""
        shape = tuple(shape)
        if std == 0:
            return torch.zeros(shape, dtype=torch.float64, device=device)
        count = math.prod(shape)
        draws = self.standard_normal(4 * count).reshape(4, count).sum(axis=0) / 2.0
        return torch.from_numpy(draws * std).reshape(shape).to(device)

    # ------------------------------------------------------------------- state
    def state(self) -> str:
        """JSON state of a reproducible stream ("" for a secure one: its key is never
        written anywhere)."""
        if not self.reproducible:
            return ""
        return json.dumps({"key": self._key.hex(), "offset": self._offset})

    @classmethod
    def from_state(cls, state: str) -> SecureRandom:
        """The stream :meth:`state` describes; a fresh secure stream for ``""``."""
        if not state:
            return cls()
        data = json.loads(state)
        return cls(bytes.fromhex(data["key"]), int(data["offset"]), reproducible=True)


def dp_random(reproducible_seed: tuple[object, ...] | None) -> SecureRandom:
    """A secure stream, or a reproducible one for ``reproducible_seed`` (tests)."""
    return SecureRandom() if reproducible_seed is None else SecureRandom.from_seed(
        *reproducible_seed)
