"""A per-party record of every privacy-relevant release and the epsilon it has cost.

Every run writes its ledger (``privacy_ledger.json``) next to its results. A run that adds
no noise records that it is not private: its epsilon is infinite, written as ``null``
with ``"private": false``, never as a number that could be mistaken for a guarantee.

A ledger only grows: its entries' epsilon, step count and round never decrease. Recording
an entry that would lower any of them raises :class:`LedgerRegression` and records
nothing (a client that forgot its spent budget, or a reply claiming less than was spent,
is an error, not a record). Both a client's own ledger (on its disk,
:mod:`fedprompt.federated.client_store`) and the server's copies obey this.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedprompt.atomic import atomic_write_text
from fedprompt.errors import FedPromptError

if TYPE_CHECKING:
    from fedprompt.config import PrivacyConfig

#: the mechanism of a client's local DP rounds
CLIENT_MECHANISM = "DP-SGD (Opacus DPOptimizer)"


class LedgerError(FedPromptError, ValueError):
    """An entry cannot be recorded in a ledger (invalid figures)."""


class LedgerRegression(LedgerError):
    """An entry would make a ledger's epsilon, step count or round go down."""


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

    @property
    def steps(self) -> int:
        """Steps accounted so far (0 before the first entry)."""
        return self.entries[-1].steps if self.entries else 0

    def check(self, entry: LedgerEntry) -> None:
        """Raise unless ``entry`` may follow this ledger's entries: a finite, non-negative
        epsilon (``inf`` is allowed: no noise), no fewer steps, no smaller epsilon and no
        earlier round than the last entry. Records nothing."""
        if not isinstance(entry.epsilon, int | float) or math.isnan(entry.epsilon) or (
                entry.epsilon < 0):
            raise LedgerError(f"{self.party}: epsilon {entry.epsilon!r} is not a number >= 0")
        if not isinstance(entry.steps, int) or entry.steps < 0:
            raise LedgerError(f"{self.party}: step count {entry.steps!r} is not an integer "
                              ">= 0")
        if not self.entries:
            return
        last = self.entries[-1]
        if entry.epsilon < last.epsilon:
            raise LedgerRegression(
                f"{self.party}: epsilon {entry.epsilon:.6g} (round {entry.round}) is below "
                f"the {last.epsilon:.6g} already spent by round {last.round}; a ledger's "
                "epsilon never decreases")
        if entry.steps < last.steps:
            raise LedgerRegression(
                f"{self.party}: {entry.steps} steps (round {entry.round}) are fewer than the "
                f"{last.steps} already accounted by round {last.round}")
        if entry.round is not None and last.round is not None and entry.round < last.round:
            raise LedgerRegression(f"{self.party}: round {entry.round} comes after round "
                                   f"{last.round} was recorded")

    def record(self, entry: LedgerEntry) -> None:
        """Append ``entry``; :class:`LedgerRegression` (nothing recorded) if it would make
        the ledger go down (see :meth:`check`)."""
        self.check(entry)
        self.entries.append(entry)

    @property
    def nominal(self) -> bool:
        """Whether any entry ran DP-FPL's nominal recipe (its epsilon is no guarantee)."""
        return any(e.nominal_epsilon is not None for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        note = None if self.private else (
            "no noise was added: this run has no differential-privacy guarantee"
        )
        if self.nominal:
            note = ("nominal recipe (privacy.mode = 'nominal'): the papers' layout leaves "
                    "tensors un-noised, so 'epsilon' is what the accountant gives for the "
                    "noised tensors alone and is NOT a guarantee for what was released")
        return {
            "party": self.party,
            "private": self.private,
            "valid": self.private and not self.nominal,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "note": note,
            "entries": [asdict(e) for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        """The ledger :meth:`to_dict` wrote (its entries re-checked in order)."""
        names = {f.name for f in fields(LedgerEntry)}
        ledger = cls(str(data["party"]), data.get("delta"))
        for item in data.get("entries", []):
            ledger.record(LedgerEntry(**{k: v for k, v in item.items() if k in names}))
        return ledger

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        return cls.from_dict(json.loads(text))

    @staticmethod
    def write_all(ledgers: list[PrivacyLedger], path: Path) -> None:
        """Write ``{"ledgers": [...]}`` to ``path`` atomically."""
        atomic_write_text(path, json.dumps({"ledgers": [lg.to_dict() for lg in ledgers]},
                                           indent=2))


def client_party(client_id: int) -> str:
    """The party name of client ``client_id`` in every ledger."""
    return f"client-{client_id}"


def client_round_entry(client_id: int, privacy: PrivacyConfig, tensors: Sequence[str],
                       metrics: Mapping[str, Any], server_round: int) -> LedgerEntry | None:
    """The ledger entry of one local-DP round of a client, from the figures its train reply
    reports (``epsilon``, ``noise-multiplier``, ``sample-rate`` and the cumulative
    ``steps``); ``None`` when the reply reports no epsilon (local DP off) or the client
    declined the round. The client records exactly this entry in its own ledger and the
    server in its copy, so both agree."""
    epsilon = _number(metrics, "epsilon", -1.0)
    if metrics.get("declined") or epsilon < 0:
        return None
    steps = _number(metrics, "steps", 0)
    if not math.isfinite(steps) or steps != int(steps):
        raise LedgerError(f"{client_party(client_id)}: step count {steps!r} is not an integer")
    return LedgerEntry(
        party=client_party(client_id), mechanism=CLIENT_MECHANISM, tensors=list(tensors),
        noise_multiplier=_number(metrics, "noise-multiplier", 0.0),
        clipping_norm=privacy.clip_norm, sample_rate=_number(metrics, "sample-rate", 0.0),
        steps=int(steps), accountant=privacy.accountant, epsilon=epsilon,
        delta=privacy.delta, round=server_round,
        nominal_epsilon=privacy.epsilon if privacy.mode == "nominal" else None,
    )


def _number(metrics: Mapping[str, Any], key: str, default: float) -> float:
    value = metrics.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LedgerError(f"metric {key!r} is {value!r}, not a number")
    return float(value)
