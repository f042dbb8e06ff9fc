"""The errors of secure clustering (re-exported by :mod:`fedprompt.secure.clustering`)."""

from __future__ import annotations

from fedprompt.errors import FedPromptError


class ClusteringError(FedPromptError, RuntimeError):
    """Secure clustering failed this round (a party died, a wait timed out, ...)."""


class ShareRejected(FedPromptError, ValueError):
    """One client's sealed submission is malformed, of the wrong size, or out of range."""
