"""Signing keys: elliptic-curve PEM files, read once and checked before any registry is asked.

A private key is what `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`
writes (PKCS#8 or SEC1 PEM, unencrypted); a public key is a SubjectPublicKeyInfo PEM, as
`openssl pkey -pubout` or `cosign generate-key-pair` writes. cosign's own encrypted private
keys are refused with a hint: galleryfs never asks for a key password.

`cryptography` is imported when a key is first loaded, not with this module: every mount
imports the trust layer, and the library costs a mount that checks no signature about
9 MiB of resident memory (scripts/bench G9).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

MAX_KEY_FILE = 64 << 10
# cosign signs with P-256 only; model-signing also uses P-384 and P-521, each with its hash.
_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def _hash(curve: str):  # noqa: ANN202 - a cryptography hash class
    from cryptography.hazmat.primitives import hashes

    return {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384,
            "secp521r1": hashes.SHA512}[curve]


@dataclass(frozen=True)
class PublicKey:
    """A trusted public key; `name` (its file, or its fingerprint) says which one matched."""

    key: ec.EllipticCurvePublicKey
    name: str

    @property
    def fingerprint(self) -> str:
        """sha256 of the DER SubjectPublicKeyInfo, in hex (first 16 digits are plenty)."""
        from cryptography.hazmat.primitives import serialization

        der = self.key.public_bytes(serialization.Encoding.DER,
                                    serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(der).hexdigest()

    @property
    def p256(self) -> bool:
        return self.key.curve.name == "secp256r1"

    def verifies(self, signature: bytes, message: bytes) -> bool:
        """True iff `signature` (ASN.1 DER ECDSA) is this key's over `message`."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            self.key.verify(signature, message, ec.ECDSA(_hash(self.key.curve.name)()))
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def pem(self) -> str:
        from cryptography.hazmat.primitives import serialization

        return self.key.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass(frozen=True)
class PrivateKey:
    key: ec.EllipticCurvePrivateKey
    name: str

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.key.public_key(), self.name)

    def sign(self, message: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        return self.key.sign(message, ec.ECDSA(hashes.SHA256()))


def _read(path: str | Path, what: str) -> bytes:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_KEY_FILE:
            raise UsageError(f"{what} {p}: not a key file (larger than {MAX_KEY_FILE} bytes)")
        return p.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} {p}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {p}: is a folder, not a key file") from None
    except OSError as exc:
        raise UsageError(f"{what} {p}: {exc.strerror or exc}") from None


def load_private(path: str | Path) -> PrivateKey:
    """An unencrypted EC P-256 private key PEM; UsageError (one line) for anything else."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = _read(path, "key")
    if b"ENCRYPTED" in data:
        raise UsageError(f"key {path}: an encrypted private key; galleryfs takes an unencrypted "
                         "EC P-256 PEM (e.g. `openssl genpkey -algorithm EC -pkeyopt "
                         "ec_paramgen_curve:P-256`), kept private by its file mode")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        if b"PUBLIC KEY" in data:
            raise UsageError(f"key {path}: a public key; signing needs the private key") from None
        raise UsageError(f"key {path}: not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise UsageError(f"key {path}: {_describe(key)}; cosign signatures need an EC P-256 key")
    return PrivateKey(key, str(path))


def load_public(path: str | Path) -> PublicKey:
    """An EC public key PEM (P-256, P-384 or P-521); a private key file gives its public half."""
    return parse_public(_read(path, "key"), str(path))


def parse_public(data: bytes, name: str) -> PublicKey:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        if b"PRIVATE KEY" in data:
            raise UsageError(f"key {name}: a private key; verifying takes the public key "
                             "(`openssl pkey -in KEY -pubout`)") from None
        raise UsageError(f"key {name}: not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVES:
        raise UsageError(f"key {name}: {_describe(key)}; expected an EC P-256 "
                         "(or P-384/P-521) public key")
    return PublicKey(key, name)


def _describe(key: object) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec

    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"an EC key on curve {key.curve.name}"
    kind = type(key).__name__.lstrip("_").replace("PrivateKey", "").replace("PublicKey", "")
    return f"a {kind or 'non-EC'} key"
