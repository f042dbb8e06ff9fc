"""Differential privacy: per-sample gradients, clipping and noise, accountants, ledgers."""

from fedprompt.privacy.ledger import PrivacyLedger

__all__ = ["PrivacyLedger"]
