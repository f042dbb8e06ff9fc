"""Noise calibration and privacy accounting (Opacus accountants).

* :func:`calibrate_noise`: the noise multiplier that reaches ``(epsilon, delta)`` after a
  planned number of steps at a sampling rate (Opacus ``get_noise_multiplier``).
* :func:`nominal_noise_multiplier`: DP-FPL's published recipe
  ``sigma = sqrt(T ln(1/delta)) / epsilon`` with ``T`` the number of *rounds*. It is
  offered for comparison with the papers' tables and always labelled "nominal": DP-FPL
  adds that noise at every local step, not once per round, so the epsilon it claims is
  not the epsilon of what it does. The accountant's epsilon is reported beside it.
* :class:`Accountant`: an Opacus accountant whose history can be saved and restored, so a
  client's spent budget survives across rounds (it lives in the client's state).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Literal

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedprompt.errors import ConfigError

AccountantName = Literal["rdp", "prv"]

#: RDP orders: Opacus' defaults extended to large orders, which matter when the noise is
#: small (the bound is valid for any order set; more orders give a tighter epsilon)
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [
    64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024]


def _epsilon_kwargs(kind: str) -> dict:
    return {"alphas": RDP_ORDERS} if kind == "rdp" else {}


def nominal_noise_multiplier(epsilon: float, delta: float, rounds: int) -> float:
    """DP-FPL's nominal recipe: ``sqrt(rounds * ln(1/delta)) / epsilon``."""
    return math.sqrt(rounds * math.log(1.0 / delta)) / epsilon


@functools.lru_cache(maxsize=256)
def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: AccountantName = "rdp") -> float:
    """Smallest noise multiplier whose accountant epsilon after ``steps`` steps at
    ``sample_rate`` is at most ``epsilon``.

    Memoized: every client calls it every round with the same arguments, and a binary
    search over RDP accountants costs seconds at high sampling rates."""
    if steps < 1:
        raise ConfigError("noise calibration needs at least one planned step")
    try:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=accountant, epsilon_tolerance=0.005,
                                          **_epsilon_kwargs(accountant)))
    except ValueError as exc:
        raise ConfigError(
            f"cannot reach epsilon={epsilon} at delta={delta} over {steps} steps with "
            f"sampling rate {sample_rate:.4g}: {exc}. Raise privacy.epsilon or lower the "
            "number of rounds/local epochs"
        ) from exc


class Accountant:
    """A saved/restored Opacus accountant (``rdp`` or ``prv``)."""

    def __init__(self, kind: AccountantName = "rdp",
                 history: list[tuple[float, float, int]] | None = None) -> None:
        self.kind = kind
        self._impl: IAccountant = RDPAccountant() if kind == "rdp" else PRVAccountant()
        self._impl.history = [tuple(h) for h in (history or [])]

    @property
    def opacus(self) -> IAccountant:
        return self._impl

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(float(z), float(q), int(n)) for z, q, n in self._impl.history]

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        for _ in range(steps):
            self._impl.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far (0 before any noisy step)."""
        if not self._impl.history:
            return 0.0
        return float(self._impl.get_epsilon(delta=delta, **_epsilon_kwargs(self.kind)))

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int,
                      delta: float) -> float:
        """Epsilon if ``steps`` more steps were taken (the accountant is not changed)."""
        trial = Accountant(self.kind, self.history)
        trial._impl.history.append((noise_multiplier, sample_rate, steps))
        return trial.epsilon(delta)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "history": self.history})

    @classmethod
    def from_json(cls, text: str) -> Accountant:
        data = json.loads(text)
        return cls(data["kind"], [tuple(h) for h in data["history"]])
