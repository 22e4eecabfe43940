"""cosign key-based signatures, in cosign's own on-registry format (its SIGNATURE_SPEC).

The signature of manifest `sha256:<hex>` lives in the same repository under the tag
`sha256-<hex>.sig`: an OCI image manifest whose layers are "simple signing" payloads
(`application/vnd.dev.cosign.simplesigning.v1+json`), one per signature, each with the
base64 ASN.1 DER ECDSA P-256 signature of its payload bytes in the layer annotation
`dev.cosignproject.cosign/signature`. The payload names the signed digest::

    {"critical":{"identity":{"docker-reference":"HOST/REPO"},
                 "image":{"docker-manifest-digest":"sha256:<hex>"},
                 "type":"cosign container image signature"},"optional":null}

Chain of trust: key -> signature -> payload bytes (the layer digest, checked as the blob is
read) -> `docker-manifest-digest` -> the manifest -> every layer. A `.sig` manifest is
mutable and anyone who can push may add layers to it: only a layer that passes every check
for a trusted key and names exactly the digest asked about counts (`verify`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass

from .. import digest as digests
from ..errors import DigestMismatch, GalleryError, NotFound, TooLarge
from ..registry.client import OCI_MANIFEST, RegistryClient
from .keys import PrivateKey, PublicKey

log = logging.getLogger(__name__)

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
COSIGN_TYPE = "cosign container image signature"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
# A payload is ~250 bytes; cosign's own cap on the layers of one `.sig` manifest is 1000.
MAX_PAYLOAD = 64 << 10
MAX_LAYERS = 1000
# Distinct payload blobs read while verifying one digest (signers of one repository share
# one payload, so this is plenty); bounds what a crowded or hostile tag costs.
MAX_PAYLOADS = 64
MAX_SIGNATURE = 512  # base64 characters; a P-521 DER signature is < 200 bytes
_ZERO_TIME = "0001-01-01T00:00:00Z"


def signature_tag(digest: str) -> str:
    """The tag cosign keeps the signatures of `digest` under: `sha256-<hex>.sig`."""
    algo, _, hexpart = digests.validate(digest).partition(":")
    return f"{algo}-{hexpart}.sig"


def _go_json(obj: object) -> bytes:
    # Go's json.Marshal: the struct's field order (kept by the dicts below), no spaces.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def payload(docker_reference: str, digest: str) -> bytes:
    """The simple-signing payload cosign signs for `digest`, byte for byte."""
    return _go_json({"critical": {"identity": {"docker-reference": docker_reference},
                                  "image": {"docker-manifest-digest": digest},
                                  "type": COSIGN_TYPE},
                     "optional": None})


def config_blob(layer_digests: list[str]) -> bytes:
    """The config go-containerregistry writes for `empty.Image` plus one layer per signature
    (what cosign pushes; no verifier reads it)."""
    return _go_json({"architecture": "", "created": _ZERO_TIME,
                     "history": [{"created": _ZERO_TIME} for _ in layer_digests],
                     "os": "", "rootfs": {"type": "layers", "diff_ids": list(layer_digests)},
                     "config": {}})


def manifest(config: bytes, layers: list[dict]) -> bytes:
    return _go_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                     "config": {"mediaType": IMAGE_CONFIG, "size": len(config),
                                "digest": digests.of_bytes(config)},
                     "layers": layers})


@dataclass(frozen=True)
class Candidate:
    """A layer of a `.sig` manifest that may be a signature: its payload blob and signature."""

    digest: str
    size: int
    signature: bytes


def layers_of(body: bytes) -> list[dict]:
    """The layer descriptors of a `.sig` manifest; GalleryError when it is none."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise GalleryError("not JSON") from None
    if not isinstance(doc, dict) or "manifests" in doc or "index" in str(doc.get("mediaType")):
        raise GalleryError("an index or other document, not a signature manifest")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise GalleryError("a manifest without layers")
    return [layer for layer in layers if isinstance(layer, dict)]


def candidates(body: bytes) -> list[Candidate]:
    """The layers of a `.sig` manifest that could hold a signature; junk is skipped."""
    out = []
    for layer in layers_of(body)[:MAX_LAYERS]:
        d, size = layer.get("digest"), layer.get("size")
        annotations = layer.get("annotations")
        if layer.get("mediaType") != SIMPLESIGNING or not isinstance(annotations, dict):
            continue
        if not isinstance(d, str) or not digests.is_digest(d) or not d.startswith("sha256:"):
            continue
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_PAYLOAD:
            continue
        raw = annotations.get(SIGNATURE_ANNOTATION)
        if not isinstance(raw, str) or len(raw) > MAX_SIGNATURE:
            continue
        try:
            signature = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            continue
        out.append(Candidate(d, size, signature))
    return out


def names_digest(payload_bytes: bytes, digest: str) -> bool:
    """The payload is a cosign simple-signing payload for exactly `digest`."""
    try:
        doc = json.loads(payload_bytes)
    except (ValueError, RecursionError):
        return False
    critical = doc.get("critical") if isinstance(doc, dict) else None
    if not isinstance(critical, dict) or critical.get("type") != COSIGN_TYPE:
        return False
    image = critical.get("image")
    return isinstance(image, dict) and image.get("docker-manifest-digest") == digest


@dataclass(frozen=True)
class Found:
    key: PublicKey | None  # the trusted key that signed, or None
    reason: str  # when None: why not, in a few words


async def verify(client: RegistryClient, repo: str, digest: str,
                 keys: list[PublicKey]) -> Found:
    """Whether one of `keys` made a cosign signature of exactly `digest` in `repo`.

    Anything that is not such a signature (no tag, an index under it, junk layers,
    payloads that are too big or do not match their digest, a signature for another
    digest, another key) is "not signed", with the reason. Outages and refusals of the
    registry are raised: they say nothing about the signature.
    """
    tag = signature_tag(digest)
    try:
        sig = await client.get_manifest(repo, tag)
    except NotFound:
        return Found(None, f"no signature (no tag {tag})")
    except (TooLarge, DigestMismatch) as exc:
        return Found(None, f"the signature tag {tag} is unusable: {exc}")
    try:
        found = candidates(sig.body)
    except GalleryError as exc:
        return Found(None, f"the signature tag {tag} holds {exc}")
    usable = [k for k in keys if k.p256]  # cosign signs P-256 with SHA-256, nothing else
    if not usable:
        return Found(None, "cosign signatures are made with EC P-256 keys only")
    payloads: dict[str, bytes | None] = {}
    for c in found:
        if c.digest not in payloads:
            if len(payloads) >= MAX_PAYLOADS:
                break
            payloads[c.digest] = await _payload(client, repo, c)
        body = payloads[c.digest]
        if body is None or not names_digest(body, digest):
            continue
        for key in usable:
            if key.verifies(c.signature, body):
                return Found(key, "")
    if not found:
        return Found(None, f"no cosign signature in {tag}")
    return Found(None, f"no signature of {digest} by this key in {tag}")


async def _payload(client: RegistryClient, repo: str, c: Candidate) -> bytes | None:
    try:
        # read_blob checks size and digest: these are exactly the bytes the layer names.
        return await client.read_blob(repo, c.digest, c.size)
    except (NotFound, DigestMismatch, TooLarge) as exc:
        log.debug("%s: signature payload %s skipped: %s", repo, c.digest, exc)
        return None


@dataclass(frozen=True)
class Signed:
    digest: str
    tag: str
    added: bool  # False: this key's signature of the digest was there already


async def sign(client: RegistryClient, repo: str, digest: str, key: PrivateKey) -> Signed:
    """Add `key`'s signature of `digest` to its `.sig` manifest (created if absent).

    Like cosign: read the current manifest, append one layer, put it back under the tag
    (two concurrent signers race; the last one wins). A signature by the same key for the
    same digest is not added twice.
    """
    tag = signature_tag(digest)
    layers: list[dict] = []
    try:
        current = await client.get_manifest(repo, tag)
    except NotFound:
        current = None
    if current is not None:
        try:
            layers = layers_of(current.body)
        except GalleryError as exc:
            raise GalleryError(f"{client.host}/{repo}:{tag} holds {exc}; remove it before "
                               "signing") from None
        if (await verify(client, repo, digest, [key.public])).key is not None:
            return Signed(digest, tag, False)
        layers = [layer for layer in layers if _well_formed(layer)]
        if len(layers) >= MAX_LAYERS:
            raise GalleryError(f"{client.host}/{repo}:{tag} already holds {len(layers)} "
                               "signatures, the most cosign reads")
    body = payload(f"{client.host}/{repo}", digest)
    signature = base64.b64encode(key.sign(body)).decode()
    layer = {"mediaType": SIMPLESIGNING, "size": len(body), "digest": digests.of_bytes(body),
             "annotations": {SIGNATURE_ANNOTATION: signature}}
    layers.append(layer)
    config = config_blob([str(layer["digest"]) for layer in layers])
    await _upload(client, repo, body)
    await _upload(client, repo, config)
    await client.put_manifest(repo, tag, manifest(config, layers), OCI_MANIFEST)
    return Signed(digest, tag, True)


def _well_formed(layer: dict) -> bool:
    d, size = layer.get("digest"), layer.get("size")
    return (isinstance(d, str) and digests.is_digest(d) and isinstance(size, int)
            and not isinstance(size, bool) and size >= 0
            and isinstance(layer.get("mediaType"), str))


async def _upload(client: RegistryClient, repo: str, data: bytes) -> None:
    d = digests.of_bytes(data)
    if await client.blob_size(repo, d) != len(data):
        await client.upload_blob_bytes(repo, d, data)
