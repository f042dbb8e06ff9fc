"""Create ECDSA P-384 OpenSSH key pairs for Flower SuperNode authentication.

Flower 1.41 reads the private key with ``cryptography``'s ``load_ssh_private_key`` (it
must be an elliptic-curve key: ``flower-supernode --auth-supernode-private-key``) and the
public key with ``load_ssh_public_key`` (a NIST curve: ``flwr supernode register``). This
writes exactly that: ``<name>`` (OpenSSH private key, mode 600, no passphrase) and
``<name>.pub`` (``ecdsa-sha2-nistp384 AAAA... <comment>``), as ``ssh-keygen -t ecdsa -b
384 -N ""`` would.

Usage::

    python scripts/make_supernode_keys.py KEY_DIR --count N [--prefix supernode-]

Idempotent: an existing private key is kept (its ``.pub`` is rewritten from it only when
missing); only missing keys are created. Needs only ``cryptography`` (a Flower dependency).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def _public_line(key: ec.EllipticCurvePrivateKey, comment: str) -> bytes:
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return public + b" " + comment.encode() + b"\n"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    path.chmod(0o600)


def ensure_keypair(path: Path, comment: str | None = None) -> bool:
    """Make sure ``path`` (private) and ``path.pub`` exist; return True if a key was created.

    An existing private key must be an ECDSA OpenSSH key; otherwise ``ValueError``.
    """
    path = Path(path)
    comment = comment or path.name
    pub = path.with_name(path.name + ".pub")
    if path.exists():
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an ECDSA key; remove it to create a new one")
        if not pub.exists():
            pub.write_bytes(_public_line(key, comment))
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    pub.write_bytes(_public_line(key, comment))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Create ECDSA P-384 OpenSSH key pairs for SuperNode authentication "
                    "(KEY_DIR/<prefix><i> and KEY_DIR/<prefix><i>.pub, i = 0..N-1).")
    parser.add_argument("key_dir", type=Path)
    parser.add_argument("--count", type=int, required=True, help="number of SuperNodes")
    parser.add_argument("--prefix", default="supernode-")
    args = parser.parse_args(argv)
    if args.count < 0:
        parser.error("--count must be >= 0")
    for i in range(args.count):
        path = args.key_dir / f"{args.prefix}{i}"
        try:
            created = ensure_keypair(path, comment=f"fedprompt-{args.prefix}{i}")
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{'created' if created else 'kept   '} {path} (+ .pub)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
