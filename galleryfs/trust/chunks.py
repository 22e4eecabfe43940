"""Chunk tables for revisions pushed without them, attached beside the revision and signed.

A revision's digest cannot change, so `galleryfs index REF` cannot add tables to its
layers: it pushes an OCI referrer instead, tagged `sha256-<revision hex>.chunks` (a tag,
so that garbage collection keeps it)::

    artifactType  application/vnd.galleryfs.chunk-table.v1+json
    config        the OCI empty descriptor ({})
    layers[0]     {"<layer digest>": {"size": N, "chunkSize": C, "sha256": "<base64>"}, ...}
    subject       the revision's manifest descriptor

and signs the referrer's digest in cosign's format. A referrer is a mutable link anyone
who can push may write: the mount uses its tables only when a trusted key signed exactly
that referrer and its subject is exactly the revision (`signed_tables`); a table then
fills only a file that has none of its own, and only when it fits the file's size.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .. import digest as digests
from ..errors import DigestMismatch, GalleryError, NotFound, TooLarge
from ..modelpack import (
    ANNOTATION_CHUNK_SHA256,
    ANNOTATION_CHUNK_SIZE,
    OCI_MANIFEST,
    ChunkTable,
    Revision,
    dumps,
    parse_manifest,
)
from ..registry.client import RegistryClient
from . import cosign
from .keys import PrivateKey, PublicKey

log = logging.getLogger(__name__)

CHUNK_TABLE_TYPE = "application/vnd.galleryfs.chunk-table.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
INDEX_CHUNK = 4 << 20
# 32 bytes per 4 MiB chunk, base64: ~11 MB for a 1 TiB revision.
MAX_TABLES = 32 << 20
_PIECE = 1 << 20

Tables = dict[str, tuple[int, ChunkTable]]  # layer digest -> (blob size, table)


def tables_tag(digest: str) -> str:
    algo, _, hexpart = digests.validate(digest).partition(":")
    return f"{algo}-{hexpart}.chunks"


def encode_tables(tables: Tables) -> bytes:
    return dumps({d: {"size": size, "chunkSize": t.chunk_size,
                      "sha256": base64.b64encode(t.digests).decode()}
                  for d, (size, t) in tables.items()})


def decode_tables(body: bytes) -> Tables:
    """The tables a referrer's layer holds; entries that are not tables are left out."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise GalleryError("the chunk table is not JSON") from None
    if not isinstance(doc, dict):
        raise GalleryError("the chunk table is not a JSON object")
    out: Tables = {}
    for d, entry in doc.items():
        size = entry.get("size") if isinstance(entry, dict) else None
        if not digests.is_digest(d) or not isinstance(size, int) or isinstance(size, bool):
            log.warning("chunk table entry %.80r ignored: not a layer digest and size", d)
            continue
        try:
            table = ChunkTable.from_annotations(
                {ANNOTATION_CHUNK_SIZE: str(entry.get("chunkSize")),
                 ANNOTATION_CHUNK_SHA256: entry.get("sha256")}, size)
        except ValueError as exc:
            log.warning("chunk table for %s ignored: %s", d, exc)
            continue
        if table is not None:
            out[d] = (size, table)
    return out


def with_tables(revision: Revision, tables: Tables) -> Revision:
    """The revision with `tables` given to its files that have none of their own (a
    table in the manifest is bound to the digest and wins), where the size fits."""
    if not tables:
        return revision
    files = []
    for f in revision.files:
        entry = tables.get(f.digest)
        if f.table is None and entry is not None and entry[0] == f.size \
                and entry[1].fits(f.size):
            f = dataclasses.replace(f, table=entry[1])
        files.append(f)
    return dataclasses.replace(revision, files=tuple(files))


def without_tables(revision: Revision) -> Revision:
    """The revision with the tables its manifest carries taken off: for a voucher that
    covers the files' digests but not the manifest (model-signing), where a registry
    could have written tables for other bytes beside unchanged layer digests."""
    if all(f.table is None for f in revision.files):
        return revision
    return dataclasses.replace(revision, files=tuple(
        dataclasses.replace(f, table=None) for f in revision.files))


def wants_tables(revision: Revision) -> bool:
    """Some file could use a table it lacks (one chunk or less needs none)."""
    return any(f.table is None and f.servable and f.size > INDEX_CHUNK for f in revision.files)


def referrer(revision_descriptor: dict, table_blob: bytes) -> bytes:
    return dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": CHUNK_TABLE_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": digests.of_bytes(EMPTY),
                   "size": len(EMPTY)},
        "layers": [{"mediaType": CHUNK_TABLE_TYPE, "digest": digests.of_bytes(table_blob),
                    "size": len(table_blob)}],
        "subject": revision_descriptor,
    })


def table_layer(body: bytes, subject: str) -> tuple[str, int]:
    """The table blob (digest, size) a referrer manifest names for revision `subject`;
    GalleryError when it is not a chunk-table referrer of exactly that revision."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise GalleryError("not JSON") from None
    if not isinstance(doc, dict):
        raise GalleryError("not a manifest")
    sub = doc.get("subject")
    if not isinstance(sub, dict) or sub.get("digest") != subject:
        raise GalleryError(f"its subject is not {subject}")
    if doc.get("artifactType") != CHUNK_TABLE_TYPE:
        raise GalleryError("not a galleryfs chunk table")
    layers = doc.get("layers")
    layer = layers[0] if isinstance(layers, list) and len(layers) == 1 else None
    if not isinstance(layer, dict) or layer.get("mediaType") != CHUNK_TABLE_TYPE:
        raise GalleryError("not one chunk-table layer")
    d, size = layer.get("digest"), layer.get("size")
    if not isinstance(d, str) or not digests.is_digest(d) or not isinstance(size, int) \
            or isinstance(size, bool) or not 0 < size <= MAX_TABLES:
        raise GalleryError("a table layer with a bad digest or size")
    return d, size


async def signed_tables(client: RegistryClient, repo: str, digest: str,
                        keys: list[PublicKey]) -> Tables:
    """The tables of `digest`'s `.chunks` referrer, if one of `keys` signed that referrer
    and its subject is `digest`; else none (with the reason logged)."""
    tag = tables_tag(digest)
    try:
        ref = await client.get_manifest(repo, tag)
    except NotFound:
        return {}
    except (TooLarge, DigestMismatch) as exc:
        log.warning("%s:%s ignored: %s", repo, tag, exc)
        return {}
    try:
        layer, size = table_layer(ref.body, digest)
    except GalleryError as exc:
        log.warning("%s:%s ignored: %s", repo, tag, exc)
        return {}
    # ref.digest is the hash of the bytes just parsed: the signature must cover them.
    found = await cosign.verify(client, repo, ref.digest, keys)
    if found.key is None:
        log.warning("%s:%s (chunk tables) not used: %s", repo, tag, found.reason)
        return {}
    try:
        body = await client.read_blob(repo, layer, size)
    except (NotFound, DigestMismatch, TooLarge) as exc:
        log.warning("%s:%s: chunk tables not used: %s", repo, tag, exc)
        return {}
    try:
        return decode_tables(body)
    except GalleryError as exc:  # signed, but not tables: the signer pushed something else
        log.warning("%s:%s: chunk tables not used: %s", repo, tag, exc)
        return {}


@dataclass(frozen=True)
class Indexed:
    revision: str
    tag: str  # the referrer's tag
    referrer: str  # the referrer's digest
    files: int  # files given a table
    signature: cosign.Signed | None


async def index(client: RegistryClient, repo: str, reference: str, key: PrivateKey,
                chunk_size: int = INDEX_CHUNK,
                progress: Callable[[int], None] | None = None) -> Indexed:
    """Compute the chunk tables of a revision's files (each blob streamed once and checked
    against its digest), push them as a referrer and sign it with `key`."""
    m = await client.get_manifest(repo, reference)
    revision = parse_manifest(m.digest, m.body, m.media_type)
    tables: Tables = {}
    for f in revision.files:
        if f.table is None and f.servable and f.size > chunk_size and f.digest not in tables:
            tables[f.digest] = (f.size, await _table_of(client, repo, f.digest, f.size,
                                                        chunk_size, progress))
    tag = tables_tag(revision.digest)
    if not tables:
        return Indexed(revision.digest, tag, "", 0, None)
    blob = encode_tables(tables)
    body = referrer({"mediaType": m.media_type or OCI_MANIFEST, "digest": revision.digest,
                     "size": len(m.body)}, blob)
    for data in (blob, EMPTY):
        d = digests.of_bytes(data)
        if await client.blob_size(repo, d) != len(data):
            await client.upload_blob_bytes(repo, d, data)
    ref_digest = await client.put_manifest(repo, tag, body, OCI_MANIFEST)
    signed = await cosign.sign(client, repo, ref_digest, key)
    files = sum(1 for f in revision.files if f.digest in tables)
    return Indexed(revision.digest, tag, ref_digest, files, signed)


async def _table_of(client: RegistryClient, repo: str, digest: str, size: int,
                    chunk_size: int, progress: Callable[[int], None] | None) -> ChunkTable:
    hasher = _ChunkHasher(digest, size, chunk_size)
    async with client.open_blob(repo, digest) as response:
        async for piece in response.aiter_bytes(_PIECE):
            # hashlib lets go of the GIL on large buffers: hashing off the event loop.
            await trio.to_thread.run_sync(hasher.update, piece)
            if progress:
                progress(len(piece))
    return hasher.finish()


class _ChunkHasher:
    def __init__(self, digest: str, size: int, chunk_size: int) -> None:
        self.verifier = digests.Verifier(digest, size)
        self.chunk_size = chunk_size
        self.chunk = hashlib.sha256()
        self.in_chunk = 0
        self.table: list[bytes] = []

    def update(self, piece: bytes) -> None:
        self.verifier.update(piece)
        view = memoryview(piece)
        while view:
            n = min(len(view), self.chunk_size - self.in_chunk)
            self.chunk.update(view[:n])
            self.in_chunk += n
            view = view[n:]
            if self.in_chunk == self.chunk_size:
                self.table.append(self.chunk.digest())
                self.chunk = hashlib.sha256()
                self.in_chunk = 0

    def finish(self) -> ChunkTable:
        self.verifier.check()
        if self.in_chunk:
            self.table.append(self.chunk.digest())
        return ChunkTable(self.chunk_size, b"".join(self.table))
