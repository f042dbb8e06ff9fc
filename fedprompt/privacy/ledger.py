"""A per-party record of every privacy-relevant release and the epsilon it has cost.

Every run writes its ledger (``privacy_ledger.json``) next to its results. A run that adds
no noise records that it is not private: its epsilon is infinite, written as ``null``
with ``"private": false``, never as a number that could be mistaken for a guarantee.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LedgerEntry:
    """One accounted mechanism run: which tensors, how much noise, over how many steps."""

    party: str
    mechanism: str
    tensors: list[str]
    noise_multiplier: float
    clipping_norm: float
    sample_rate: float
    steps: int
    accountant: str
    epsilon: float
    delta: float
    round: int | None = None
    nominal_epsilon: float | None = None


@dataclass
class PrivacyLedger:
    """All releases of one party (a client, or the server's global aggregate)."""

    party: str
    delta: float | None = None
    entries: list[LedgerEntry] = field(default_factory=list)

    @property
    def private(self) -> bool:
        return bool(self.entries)

    @property
    def epsilon(self) -> float | None:
        """Epsilon spent so far (the accountant's latest total); ``None``: not private."""
        return self.entries[-1].epsilon if self.entries else None

    def record(self, entry: LedgerEntry) -> None:
        self.entries.append(entry)

    def to_dict(self) -> dict[str, Any]:
        note = None if self.private else (
            "no noise was added: this run has no differential-privacy guarantee"
        )
        return {
            "party": self.party,
            "private": self.private,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "note": note,
            "entries": [asdict(e) for e in self.entries],
        }

    @staticmethod
    def write_all(ledgers: list[PrivacyLedger], path: Path) -> None:
        path.write_text(json.dumps({"ledgers": [lg.to_dict() for lg in ledgers]}, indent=2))
