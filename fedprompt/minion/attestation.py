"""Attestation providers (server side) and verifiers (client side) for the enclave channel.

Evidence carries ``report_data``: the channel's :func:`~fedprompt.minion.channel.binding_digest`
(session id, server channel public key, client public key and the client's nonce), the nonce
itself and a timestamp. :func:`verify_evidence` checks everything generic (provider allowed,
nonce, key binding, freshness window) and then calls the provider-specific verifier.

Providers:

* :class:`InsecureMockAttestation` - **INSECURE, for CPU tests and demos only**. It has no root
  of trust: anyone can produce its evidence. The client refuses it unless the caller passes
  ``allow_insecure_mock=True`` explicitly.
* :class:`NvidiaGpuAttestation` - NVIDIA confidential-computing GPU attestation (H100 in CC
  mode) through NVIDIA's ``nv_attestation_sdk``. The server collects GPU evidence with the
  binding digest as the SDK nonce; the client has it verified by NVIDIA's verifier (NRAS:
  certificate chains, RIM measurements, revocation), checks the signed token against a
  policy the user pins, and checks the token's nonce equals the expected binding digest.
  Without the SDK installed it raises :class:`~fedprompt.errors.DependencyError`.
"""

from __future__ import annotations

import base64
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedprompt.errors import DependencyError, FedPromptError
from fedprompt.minion.channel import NONCE_BYTES, constant_time_equal

DEFAULT_MAX_AGE_S = 60.0
DEFAULT_CLOCK_SKEW_S = 5.0
MOCK_PROVIDER = "insecure-mock"
NVIDIA_PROVIDER = "nvidia-gpu-cc"


class AttestationError(FedPromptError):
    """Attestation evidence was rejected; nothing may be sent to the server."""


class EvidenceFormatError(AttestationError, ValueError):
    """The evidence is malformed."""


class NonceMismatchError(AttestationError):
    """The evidence answers another nonce than the one this client chose."""


class KeyBindingError(AttestationError):
    """The evidence is bound to another channel key or session than the one offered."""


class StaleAttestationError(AttestationError):
    """The evidence's timestamp is outside the freshness window."""


class InsecureAttestationError(AttestationError):
    """Insecure mock attestation offered or configured without explicit opt-in."""


class ProviderMismatchError(AttestationError):
    """The evidence comes from another provider than the one the client trusts."""


class AttestationVerificationError(AttestationError):
    """The provider-specific verification (signatures, measurements, policy) failed."""


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64d(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise EvidenceFormatError(f"evidence field {name!r} must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise EvidenceFormatError(f"evidence field {name!r} is not valid base64") from exc


@dataclass(frozen=True)
class AttestationEvidence:
    provider: str
    report_data: bytes
    nonce: bytes
    timestamp: float
    payload: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "report_data": _b64e(self.report_data),
            "nonce": _b64e(self.nonce),
            "timestamp": self.timestamp,
            "payload": self.payload,
        }

    @classmethod
    def from_json(cls, data: Any) -> AttestationEvidence:
        if not isinstance(data, dict):
            raise EvidenceFormatError("evidence must be a JSON object")
        provider = data.get("provider")
        timestamp = data.get("timestamp")
        payload = data.get("payload", {})
        if not isinstance(provider, str):
            raise EvidenceFormatError("evidence 'provider' must be a string")
        if not isinstance(timestamp, int | float) or isinstance(timestamp, bool):
            raise EvidenceFormatError("evidence 'timestamp' must be a number")
        if not isinstance(payload, dict):
            raise EvidenceFormatError("evidence 'payload' must be an object")
        return cls(provider, _b64d(data.get("report_data"), "report_data"),
                   _b64d(data.get("nonce"), "nonce"), float(timestamp), payload)


class AttestationProvider(ABC):
    """Server side: produce evidence that binds ``report_data`` inside the enclave."""

    name: str
    insecure: bool = False

    @abstractmethod
    def generate(self, report_data: bytes, nonce: bytes) -> AttestationEvidence: ...


class AttestationVerifier(ABC):
    """Client side: provider-specific checks (the generic ones are in :func:`verify_evidence`)."""

    name: str
    insecure: bool = False

    @abstractmethod
    def verify(self, evidence: AttestationEvidence, expected_report_data: bytes) -> None:
        """Raise :class:`AttestationError` unless the evidence is genuine for this binding."""


# --------------------------------------------------------------------------- mock

INSECURE_WARNING = (
    "INSECURE MOCK ATTESTATION: no hardware root of trust; anyone can forge this evidence. "
    "For CPU tests and demos only."
)


class InsecureMockAttestation(AttestationProvider, AttestationVerifier):
    """INSECURE mock provider and verifier: checks only the binding, nonce and freshness."""

    name = MOCK_PROVIDER
    insecure = True

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock

    def generate(self, report_data: bytes, nonce: bytes) -> AttestationEvidence:
        return AttestationEvidence(
            MOCK_PROVIDER, report_data, nonce, float(self._clock()),
            {"insecure": True, "warning": INSECURE_WARNING},
        )

    def verify(self, evidence: AttestationEvidence, expected_report_data: bytes) -> None:
        if evidence.payload.get("insecure") is not True:
            raise AttestationVerificationError("mock evidence must declare itself insecure")


# --------------------------------------------------------------------------- NVIDIA

def _import_nv_sdk() -> Any:
    try:
        from nv_attestation_sdk import attestation  # type: ignore[import-not-found]
    except ImportError as exc:
        raise DependencyError(
            "NVIDIA GPU attestation needs NVIDIA's attestation SDK: `pip install "
            "nv-attestation-sdk` on the H100 confidential-computing VM (server) and on the "
            "client; it is not installed here"
        ) from exc
    return attestation


class NvidiaGpuAttestation(AttestationProvider, AttestationVerifier):
    """NVIDIA H100 confidential-computing GPU attestation via ``nv_attestation_sdk``.

    Server: ``generate`` collects GPU evidence with the binding digest (hex) as the SDK nonce.
    Client: ``verify`` sends that evidence to NVIDIA's remote verifier (NRAS; certificate
    chains, RIM measurements and revocation are checked there), validates the returned
    signed token against ``policy`` (the user's pinned appraisal policy, e.g. requiring
    ``x-nvidia-gpu-measurements-match`` and the expected driver/VBIOS RIM), and requires the
    token's ``eat_nonce`` to equal the expected binding digest. Not testable without an H100
    in CC mode; it fails closed with clear errors.
    """

    name = NVIDIA_PROVIDER

    def __init__(self, policy: str | Path | dict[str, Any] | None = None,
                 verifier_url: str = "") -> None:
        self._sdk = _import_nv_sdk()
        self.verifier_url = verifier_url
        if policy is None:
            self.policy: str | None = None
        elif isinstance(policy, dict):
            self.policy = json.dumps(policy)
        else:
            path = Path(policy)
            self.policy = path.read_text() if path.exists() else str(policy)
            json.loads(self.policy)  # a pinned policy must be valid JSON; raise otherwise

    def _client(self, nonce_hex: str) -> Any:
        att = self._sdk
        client = att.Attestation()
        client.set_name("fedprompt-minion")
        client.set_nonce(nonce_hex)
        client.add_verifier(att.Devices.GPU, att.Environment.REMOTE, self.verifier_url, "")
        return client

    def generate(self, report_data: bytes, nonce: bytes) -> AttestationEvidence:
        evidence_list = self._client(report_data.hex()).get_evidence()
        if not evidence_list:
            raise AttestationVerificationError("the GPU returned no attestation evidence")
        return AttestationEvidence(NVIDIA_PROVIDER, report_data, nonce, time.time(),
                                   {"gpu_evidence": evidence_list})

    def verify(self, evidence: AttestationEvidence, expected_report_data: bytes) -> None:
        if self.policy is None:
            raise AttestationVerificationError(
                "NVIDIA attestation needs a pinned policy (JSON) on the client")
        gpu_evidence = evidence.payload.get("gpu_evidence")
        if not isinstance(gpu_evidence, list) or not gpu_evidence:
            raise EvidenceFormatError("NVIDIA evidence lacks 'gpu_evidence'")
        client = self._client(expected_report_data.hex())
        if client.attest(gpu_evidence) is not True:
            raise AttestationVerificationError("NVIDIA verifier rejected the GPU evidence")
        token = client.get_token()
        if client.validate_token(self.policy) is not True:
            raise AttestationVerificationError("GPU attestation token violates the pinned policy")
        nonces = _token_nonces(client.decode_token(token))
        if not nonces or any(n != expected_report_data.hex() for n in nonces):
            raise KeyBindingError("GPU attestation token nonce does not match the channel binding")


def _token_nonces(decoded: Any) -> list[str]:
    """Every ``eat_nonce`` found in the SDK's decoded token structure."""
    found: list[str] = []
    if isinstance(decoded, dict):
        for key, value in decoded.items():
            if key == "eat_nonce" and isinstance(value, str):
                found.append(value.lower())
            else:
                found.extend(_token_nonces(value))
    elif isinstance(decoded, list):
        for item in decoded:
            found.extend(_token_nonces(item))
    return found


# --------------------------------------------------------------------------- generic checks

@dataclass(frozen=True)
class VerifiedAttestation:
    provider: str
    insecure: bool
    timestamp: float


def verify_evidence(
    evidence: AttestationEvidence,
    verifier: AttestationVerifier,
    *,
    expected_nonce: bytes,
    expected_report_data: bytes,
    allow_insecure_mock: bool = False,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
    now: float | None = None,
) -> VerifiedAttestation:
    """All checks the client makes before it derives keys and sends anything."""
    if (verifier.insecure or evidence.provider == MOCK_PROVIDER) and not allow_insecure_mock:
        raise InsecureAttestationError(
            "the server offered (or the client is configured for) INSECURE mock attestation; "
            "pass allow_insecure_mock=True only for tests and demos")
    if evidence.provider != verifier.name:
        raise ProviderMismatchError(
            f"evidence from provider {evidence.provider!r}, but this client trusts "
            f"{verifier.name!r}")
    if len(expected_nonce) != NONCE_BYTES or not constant_time_equal(
        evidence.nonce, expected_nonce
    ):
        raise NonceMismatchError("attestation evidence answers another nonce than ours")
    if not constant_time_equal(evidence.report_data, expected_report_data):
        raise KeyBindingError(
            "attestation evidence is bound to another channel key, session or nonce")
    now = time.time() if now is None else now
    age = now - evidence.timestamp
    if age > max_age_s or age < -clock_skew_s:
        raise StaleAttestationError(
            f"attestation timestamp is {age:.1f} s old; allowed window is "
            f"[-{clock_skew_s}, {max_age_s}] s")
    verifier.verify(evidence, expected_report_data)
    return VerifiedAttestation(evidence.provider, verifier.insecure, evidence.timestamp)
