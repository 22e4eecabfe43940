"""OpenSSF model-signing signatures (PyPI `model-signing`, key-based), checked from the
revision's manifest alone.

Where it is attached: a file `model.sig` at the root of the revision, which the user
wrote into the model folder before `galleryfs push` (`model_signing sign key DIR
--signature DIR/model.sig`, which records `model.sig` among the ignored paths). That is
how model repositories on the Hugging Face hub ship it, and `galleryfs pull` gives a folder
the library verifies as it is.

What is checked, without reading any file but the signature itself: the bundle is a
Sigstore bundle holding a DSSE envelope signed (ECDSA, over the DSSE pre-authentication
encoding) by a trusted key; its in-toto statement is a model-signing v1.0 statement whose
files were hashed one by one with sha256 (`method: files`); its subject digest is the
hash of the listed digests; and the listed files are exactly the revision's files but
`model.sig`, each with the digest of its layer (a raw layer's digest is the sha256 of the
file). A file the revision has and the signature does not list, or the other way round,
is a refusal: the mount would otherwise serve an unsigned file. Shard serialisation,
other hashes and packed (tar) layers cannot be checked this way and are refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging

from ..errors import DigestMismatch, NotFound, TooLarge
from ..modelpack import Revision, safe_path
from ..registry.client import RegistryClient
from .cosign import Found
from .keys import PublicKey

log = logging.getLogger(__name__)

SIGNATURE_FILE = "model.sig"
BUNDLE_TYPES = ("application/vnd.dev.sigstore.bundle.v0.3+json",
                "application/vnd.dev.sigstore.bundle+json;version=0.3")
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
MAX_BUNDLE = 16 << 20


class NotSigned(Exception):
    """The bundle does not vouch for the revision; the message says why."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature is made over."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def signed_files(bundle: bytes, keys: list[PublicKey]) -> tuple[PublicKey, dict[str, str]]:
    """The trusted key that signed `bundle` and the files it signed ({path: sha256 hex});
    NotSigned with the reason otherwise."""
    try:
        doc = json.loads(bundle)
    except (ValueError, RecursionError):
        raise NotSigned("model.sig is not JSON") from None
    if not isinstance(doc, dict) or doc.get("mediaType") not in BUNDLE_TYPES:
        raise NotSigned("model.sig is not a Sigstore bundle (v0.3)")
    envelope = doc.get("dsseEnvelope")
    if not isinstance(envelope, dict) or envelope.get("payloadType") != PAYLOAD_TYPE:
        raise NotSigned("model.sig holds no in-toto DSSE envelope")
    try:
        payload = base64.b64decode(envelope.get("payload", ""), validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise NotSigned("model.sig: the envelope's payload is not base64") from None
    message = pae(PAYLOAD_TYPE, payload)
    signatures = envelope.get("signatures")
    key = None
    for entry in signatures if isinstance(signatures, list) else []:
        raw = entry.get("sig") if isinstance(entry, dict) else None
        if not isinstance(raw, str) or len(raw) > 1024:
            continue
        try:
            signature = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            continue
        key = next((k for k in keys if k.verifies(signature, message)), None)
        if key is not None:
            break
    if key is None:
        raise NotSigned("model.sig is not signed by this key")
    # Only now, signed by a trusted key, is the statement worth reading.
    try:
        statement = json.loads(payload)
    except (ValueError, RecursionError):
        raise NotSigned("model.sig: the signed statement is not JSON") from None
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE \
            or statement.get("predicateType") != PREDICATE_TYPE:
        raise NotSigned("model.sig: not a model-signing v1.0 statement")
    predicate = statement.get("predicate")
    serialization = predicate.get("serialization") if isinstance(predicate, dict) else None
    if not isinstance(serialization, dict) or serialization.get("method") != "files" \
            or serialization.get("hash_type") != "sha256":
        raise NotSigned("model.sig: only per-file sha256 signatures can be checked against "
                        "a revision's layers")
    resources = predicate.get("resources")
    if not isinstance(resources, list):
        raise NotSigned("model.sig: the statement lists no files")
    files: dict[str, str] = {}
    for r in resources:
        if not isinstance(r, dict) or r.get("algorithm", "sha256") != "sha256":
            raise NotSigned("model.sig: a listed file is not a sha256 entry")
        name, hexdigest = safe_path(r.get("name")), r.get("digest")
        if name is None or name in files or not isinstance(hexdigest, str) \
                or len(hexdigest) != 64 or hexdigest.strip("0123456789abcdef"):
            raise NotSigned(f"model.sig: bad entry for {str(r.get('name'))[:100]!r}")
        files[name] = hexdigest
    root = hashlib.sha256(b"".join(bytes.fromhex(str(r["digest"])) for r in resources))
    subject = statement.get("subject")
    first = subject[0] if isinstance(subject, list) and subject else None
    digest = first.get("digest") if isinstance(first, dict) else None
    if not isinstance(digest, dict) or digest.get("sha256") != root.hexdigest():
        raise NotSigned("model.sig: the subject digest does not cover the listed files")
    return key, files


def mismatch(revision: Revision, files: dict[str, str]) -> str | None:
    """Why the signed file list is not exactly the revision's files (but model.sig)."""
    ours = {f.path: f.digest for f in revision.files if f.path != SIGNATURE_FILE}
    for path in sorted(ours.keys() - files.keys()):
        return f"{path} is in the revision but not signed"
    for path in sorted(files.keys() - ours.keys()):
        return f"{path} is signed but not in the revision"
    for path, d in sorted(ours.items()):
        if d != f"sha256:{files[path]}":
            return f"{path}: its layer digest {d} is not the signed sha256:{files[path]}"
    return None


def attached(revision: Revision) -> bool:
    return any(f.path == SIGNATURE_FILE for f in revision.files)


async def verify(client: RegistryClient, repo: str, revision: Revision,
                 keys: list[PublicKey]) -> Found:
    """Whether the revision's model.sig is a model-signing signature by one of `keys` of
    exactly its other files. Registry outages are raised, as in `cosign.verify`."""
    sig = next((f for f in revision.files if f.path == SIGNATURE_FILE), None)
    if sig is None:
        return Found(None, f"no {SIGNATURE_FILE} in the revision")
    if sig.size > MAX_BUNDLE:
        return Found(None, f"{SIGNATURE_FILE} is too large ({sig.size} bytes)")
    try:
        bundle = await client.read_blob(repo, sig.digest, sig.size)
    except (NotFound, DigestMismatch, TooLarge) as exc:
        return Found(None, f"{SIGNATURE_FILE} cannot be read: {exc}")
    try:
        key, files = signed_files(bundle, keys)
    except NotSigned as exc:
        return Found(None, str(exc))
    reason = mismatch(revision, files)
    if reason:
        return Found(None, f"{SIGNATURE_FILE} does not cover this revision: {reason}")
    return Found(key, "")
