"""Make CrypTen 0.4.1 importable on current torch.

CrypTen 0.4.1 (its last release, 2022) imports ``torch.onnx._internal.registration`` at
import time, a private module that torch removed. That import only serves CrypTen's
ONNX model converter, which fedprompt does not use: secret sharing, MPC arithmetic,
comparisons and argmin work without it. :func:`import_crypten` registers an inert
stand-in for the missing module and then imports CrypTen; the ONNX conversion path
(``crypten.nn.from_pytorch`` / ``from_onnx``) stays unavailable.

Always import CrypTen through :func:`import_crypten`, never with a bare ``import crypten``.

Install note: CrypTen must be installed with ``pip install --no-deps crypten==0.4.1``
(``scripts/install.sh`` does it); its declared requirements name ``torchvision`` (a CUDA
build on PyPI that breaks imports on CPU machines) and ``sklearn`` (an obsolete PyPI name).
"""

from __future__ import annotations

import importlib
import sys
import types
from types import ModuleType

from fedprompt.errors import DependencyError

_MISSING_MODULE = "torch.onnx._internal.registration"
_INSTALL_HINT = "run `bash scripts/install.sh`, or `pip install --no-deps crypten==0.4.1`"


class _UnavailableOnnxRegistry:
    """Stand-in for torch's removed ONNX symbolic registry; fails loudly if ever used."""

    def __getattr__(self, name: str) -> object:
        raise DependencyError(
            f"CrypTen's ONNX model conversion needs `{_MISSING_MODULE}.registry.{name}`, "
            "which this torch version no longer has. fedprompt uses CrypTen for MPC "
            "arithmetic only; convert models with a torch version CrypTen 0.4.1 supports."
        )


def apply_torch_compat() -> None:
    """Register the stand-in for the torch module CrypTen imports (idempotent)."""
    if _MISSING_MODULE in sys.modules:
        return
    try:
        importlib.import_module(_MISSING_MODULE)
        return  # an older torch that still has it
    except ModuleNotFoundError:
        pass
    stub = types.ModuleType(_MISSING_MODULE)
    stub.__doc__ = "fedprompt stand-in: CrypTen's ONNX converter is unavailable on this torch."
    stub.registry = _UnavailableOnnxRegistry()  # type: ignore[attr-defined]
    sys.modules[_MISSING_MODULE] = stub


def import_crypten() -> ModuleType:
    """Import CrypTen after applying the compatibility shim.

    Raises:
        DependencyError: CrypTen is not installed, or fails to import for another reason.
    """
    apply_torch_compat()
    try:
        import crypten
    except ModuleNotFoundError as exc:
        if exc.name == "crypten":
            raise DependencyError(f"CrypTen is not installed: {_INSTALL_HINT}.") from exc
        raise DependencyError(
            f"CrypTen is installed but its requirement `{exc.name}` is missing: "
            f"`pip install {exc.name}`, or {_INSTALL_HINT}."
        ) from exc
    return crypten


def _self_check() -> None:
    """Encrypt, add, multiply and decrypt in a single-party CrypTen session."""
    import torch

    crypten = import_crypten()
    crypten.init()
    a = torch.tensor([1.5, -2.0, 3.25])
    b = torch.tensor([0.5, 4.0, -1.0])
    got = (crypten.cryptensor(a) * crypten.cryptensor(b) + crypten.cryptensor(a)).get_plain_text()
    want = a * b + a
    if not torch.allclose(got, want, atol=1e-3):
        raise DependencyError(
            f"CrypTen self-check failed: got {got.tolist()}, want {want.tolist()}"
        )
    crypten.uninit()
    print(f"CrypTen {getattr(crypten, '__version__', '?')} works: a*b+a = {got.tolist()}")


if __name__ == "__main__":
    _self_check()
