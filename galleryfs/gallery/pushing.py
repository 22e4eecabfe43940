"""Pushing a model directory as a revision: its files listed and hashed, described in a
config, each blob brought into the registry the cheapest way, then the manifest tagged."""

from __future__ import annotations

import logging
import math
import os
import re
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import trio

from .. import digest as digests
from .. import modelpack
from ..errors import UsageError
from ..modelpack import ChunkTable, Descriptor
from ..reference import Reference, check_tag
from ..registry.client import RegistryClient
from ..registry.uploads import DirectUploads
from ..trust.accessories import is_accessory_tag
from . import metadata
from .blobs import EXISTING, MOUNTED, without_upload
from .defaults import CONCURRENCY, DEFAULT_TAG, Bar, ProgressFactory, open_bar
from .hashcache import HashCache
from .locations import BlobLocations

log = logging.getLogger(__name__)

# Chunk tables (README, Security and integrity): every file larger than one table chunk
# gets one, in its layer's annotations. A table chunk is also the smallest unit a mount
# can verify, so the smallest a read outside a stream (one tensor by `get_tensor`) can
# fetch: tables are as fine as TABLE_FINEST while they take at most FINE_BUDGET bytes of
# annotations, then coarser, up to TABLE_CHUNK (the MiniLM weights, 87 MiB, keep 64 KiB
# pieces: 60 KB of annotations; a 1 GiB file 64 KiB; a 14 GiB one 1 MiB). A finer table
# costs the mount memory and every listing manifest bytes, hence the smaller budget.
# Beyond TABLE_CHUNK the chunk doubles for the whole revision while the tables would
# take more than TABLE_BUDGET (the manifest must stay below the 4 MiB registries and
# clients accept). That budget is as large as that allows: a mount reading in 4 MiB
# chunks (its default) can use only tables whose chunk divides its own, so every
# doubling past 4 MiB is a revision a default mount must verify whole instead (about
# 290 GiB of files and more).
TABLE_FINEST = modelpack.MIN_TABLE_CHUNK
FINE_BUDGET = 1 << 20
TABLE_CHUNK = 4 << 20
TABLE_BUDGET = 3 << 20

# galleryfs's own annotations. On a layer: what a safetensors file holds. On the
# manifest: model-level facts the config schema has no key for.
ANNOTATION_PREFIX = "io.galleryfs."
FILE_DTYPES = "io.galleryfs.file.dtypes"  # "F32,I64": safetensors dtypes of its tensors
FILE_TENSORS = "io.galleryfs.file.tensors"  # tensor count
FILE_PARAMETERS = "io.galleryfs.file.parameters"  # element count of its tensors
MODEL_PARAMETERS = "io.galleryfs.model.parameters"  # exact (config.paramSize is rounded)
MODEL_TYPE = "io.galleryfs.model.type"  # Hugging Face model_type
MODEL_ARCHITECTURES = "io.galleryfs.model.architectures"  # comma-separated
_DTYPE_NAME = re.compile(r"^[A-Za-z0-9_]{1,32}$")

# RFC 3339 section 5.6 date-time: a date, "T", a time and an offset (or Z), nothing less
# (ModelPack's config schema checks descriptor.createdAt as a JSON Schema date-time).
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", re.IGNORECASE | re.ASCII)


def check_created(text: str) -> str:
    """`text` if it is an RFC 3339 date-time, else UsageError."""
    valid = bool(_RFC3339.fullmatch(text))
    if valid:
        try:
            datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        except ValueError:
            valid = False  # 2025-02-30, 25:00, an offset of +24:00
    if not valid:
        raise UsageError(f"--created {text[:60]!r}: not an RFC 3339 date-time "
                         "(e.g. 2025-06-01T12:00:00Z or 2025-06-01T14:00:00+02:00)")
    return text


def check_annotations(annotations: dict[str, str]) -> None:
    for key in annotations:
        if key.startswith(ANNOTATION_PREFIX):
            raise UsageError(f"--annotation {key[:60]}: the {ANNOTATION_PREFIX} keys are "
                             "galleryfs's own")


def table_annotation_bytes(size: int, chunk_size: int) -> int:
    """What the chunk table of a `size`-byte file takes in its layer's annotations."""
    if size <= chunk_size:
        return 0  # one chunk: the blob digest checks it
    chunks = math.ceil(size / chunk_size)
    return (len(modelpack.ANNOTATION_CHUNK_SIZE) + len(str(chunk_size))
            + len(modelpack.ANNOTATION_CHUNK_SHA256)
            + 4 * math.ceil(chunks * modelpack.CHUNK_DIGEST / 3))


def table_chunk_size(sizes: list[int]) -> int:
    """The table chunk size of a revision with files of these sizes: TABLE_FINEST,
    doubled while the tables would exceed FINE_BUDGET (up to TABLE_CHUNK) or
    TABLE_BUDGET (beyond). Depends on the sizes only, so the same files give the same
    tables (and the same revision digest)."""
    chunk = TABLE_FINEST

    def over(budget: int) -> bool:
        return sum(table_annotation_bytes(s, chunk) for s in sizes) > budget

    while chunk < modelpack.MAX_TABLE_CHUNK and (
            chunk < TABLE_CHUNK and over(FINE_BUDGET) or over(TABLE_BUDGET)):
        chunk *= 2
    return chunk


def hash_file(path: str | os.PathLike[str], size: int, chunk_size: int
              ) -> tuple[str, ChunkTable | None]:
    """A file's digest and, when it is larger than one chunk, its chunk table: one read."""
    if size <= chunk_size:
        return digests.of_file(path, size), None
    digest, body = digests.of_file_chunks(path, size, chunk_size)
    return digest, ChunkTable(chunk_size, body)


@dataclass
class LocalFile:
    path: str  # POSIX, relative to the model directory
    source: Path
    digest: str
    size: int
    # Sent while it was hashed (or found not needed then): the bar has counted it.
    sent_while_hashed: bool = False
    table: ChunkTable | None = None


@dataclass
class PushResult:
    digest: str
    tags: list[str]
    uploaded: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0


def scan_directory(root: Path) -> list[tuple[str, Path]]:
    """Regular files below root, sorted by their POSIX relative path."""
    if not root.exists():
        raise UsageError(f"{root}: no such directory")
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory (push takes a model directory)")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # VCS metadata is not part of a model.
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", ".hg", ".svn"))
        for name in filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            try:
                st = full.stat()  # follows symlinks: Hugging Face caches link to blobs
            except OSError as exc:
                raise UsageError(f"{full}: cannot read ({exc.strerror})") from None
            if not stat.S_ISREG(st.st_mode):
                log.warning("skipping %s: not a regular file", rel)
                continue
            if modelpack.safe_path(rel) != rel:
                raise UsageError(f"{rel}: file name cannot be stored in a revision")
            found.append((rel, full))
    if not found:
        raise UsageError(f"{root}: the directory holds no files")
    found.sort()
    return found


# Sends a file while hashing it (with chunks of the given size) and returns (digest,
# size, chunk table), or None when that does not pay for this file (it is then hashed
# on its own).
Hashed = tuple[str, int, ChunkTable | None]
Hasher = Callable[[Path, int], Awaitable[Hashed | None]]


def _remembered(cache: HashCache, src: Path, chunk_size: int) -> Hashed | None:
    known = cache.get(src)
    if known is None:
        return None
    digest, size = known
    if size <= chunk_size:
        return digest, size, None
    table = cache.get_table(src, digest, chunk_size)
    return (digest, size, table) if table is not None else None


async def hash_files(files: list[tuple[str, Path]], cache: HashCache | None = None,
                     hasher: Hasher | None = None, chunk_size: int = TABLE_CHUNK
                     ) -> list[LocalFile]:
    """Each file's digest, size and chunk table, from the cache when its metadata is
    unchanged, else from `hasher`, else read here (two files at a time)."""
    out: list[LocalFile] = [None] * len(files)  # type: ignore[list-item]
    limiter = trio.CapacityLimiter(2)

    async def one(i: int, rel: str, src: Path) -> None:
        known = _remembered(cache, src, chunk_size) if cache else None
        sent = False
        if known:
            d, size, table = known
        else:
            before = await trio.to_thread.run_sync(src.stat)
            got = await hasher(src, chunk_size) if hasher else None
            sent = got is not None
            if got is None:
                async with limiter:
                    d, table = await trio.to_thread.run_sync(
                        hash_file, src, before.st_size, chunk_size)
                got = d, before.st_size, table
            d, size, table = got
            if cache:
                cache.put(src, d, size, before, table)
        out[i] = LocalFile(rel, src, d, size, sent, table)

    async with trio.open_nursery() as nursery:
        for i, (rel, src) in enumerate(files):
            nursery.start_soon(one, i, rel, src)
    if cache:
        cache.save()
    return out


def build_config(description: dict, files: list[LocalFile], created: str | None,
                 names: modelpack.Names = modelpack.CNCF) -> bytes:
    """The ModelPack config: only the keys its published schema allows (every object
    there has additionalProperties: false). What has no key goes into annotations."""
    descriptor: dict = {}
    if created:
        descriptor["createdAt"] = created
    config = {
        "descriptor": descriptor,
        "config": {k: v for k, v in {
            "architecture": description["architecture"],
            "format": description["format"],
            "paramSize": description["paramSize"],
            "precision": description["precision"],
        }.items() if v and isinstance(v, str)},
        # Raw layers: each layer's uncompressed digest is its digest.
        "modelfs": {"type": "layers", names.diff_ids: [f.digest for f in files]},
    }
    return modelpack.dumps(config)


def file_annotations(summary: dict | None) -> dict[str, str]:
    """What a safetensors file holds (`metadata.describe`'s per-file summary)."""
    if not summary:
        return {}
    dtypes = summary.get("tensorDtypes") or {}
    names = sorted(d for d in dtypes if _DTYPE_NAME.match(d))
    out = {FILE_TENSORS: str(sum(dtypes.values())), FILE_PARAMETERS: str(summary["parameters"])}
    if names:
        out[FILE_DTYPES] = ",".join(names)
    return out


def model_annotations(description: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    if description.get("parameters"):
        out[MODEL_PARAMETERS] = str(description["parameters"])
    if isinstance(description.get("modelType"), str) and description["modelType"]:
        out[MODEL_TYPE] = description["modelType"]
    architectures = [a for a in description.get("architectures") or [] if isinstance(a, str)]
    if architectures:
        out[MODEL_ARCHITECTURES] = ",".join(architectures)
    return out


def manifest_for(files: list[LocalFile], config_bytes: bytes, annotations: dict[str, str],
                 created: str | None, description: dict | None = None,
                 names: modelpack.Names = modelpack.CNCF) -> bytes:
    description = description or {}
    per_file = description.get("files") or {}
    config = Descriptor(names.config_type, digests.of_bytes(config_bytes), len(config_bytes))
    layers = [
        Descriptor(names.layer_media_type(modelpack.layer_kind(f.path)), f.digest, f.size,
                   {names.filepath: f.path, modelpack.ANNOTATION_TITLE: f.path,
                    **file_annotations(per_file.get(f.path)),
                    **(f.table.to_annotations() if f.table else {})})
        for f in files
    ]
    manifest_annotations = {**annotations, **model_annotations(description)}
    if created:
        manifest_annotations[modelpack.ANNOTATION_CREATED] = created
    return modelpack.build_manifest(config, layers, manifest_annotations, names)


def check_revision_tag(tag: str) -> str:
    """A tag that may name a revision: the OCI grammar, and not shaped like what is
    kept beside a revision (`ls` and the mount would never show it, `rm` of the revision
    it is shaped after would take it)."""
    check_tag(tag)
    if is_accessory_tag(tag):
        raise UsageError(f"invalid tag {tag!r}: tags named sha256-<hex>[.suffix] are kept "
                         "for signatures and referrers, and never shown as revisions")
    return tag


async def push(client: RegistryClient, root: Path, ref: Reference, *,
               annotations: dict[str, str] | None = None, created: str | None = None,
               progress: ProgressFactory | None = None,
               locations: BlobLocations | None = None,
               names: modelpack.Names = modelpack.CNCF) -> PushResult:
    annotations = dict(annotations or {})
    check_annotations(annotations)
    if created is not None:
        check_created(created)
    if ref.digest:
        raise UsageError("push takes a tag, not a digest: the digest follows from the content")
    tag = check_revision_tag(ref.tag or DEFAULT_TAG)
    scanned = await trio.to_thread.run_sync(scan_directory, root)
    if len(scanned) > modelpack.MAX_LAYERS:
        raise UsageError(f"{root}: {len(scanned)} files; a revision holds at most "
                         f"{modelpack.MAX_LAYERS} (pack small files into an archive)")
    sizes = await trio.to_thread.run_sync(lambda: [src.stat().st_size for _, src in scanned])
    chunk_size = table_chunk_size(sizes)
    with open_bar(progress, sum(sizes), f"push {ref.model}") as bar:
        job = _Push(client, ref.repository,
                    locations if locations is not None else BlobLocations(), bar)
        try:
            files = await hash_files(scanned, HashCache(), job.send_while_hashing, chunk_size)
            description = await trio.to_thread.run_sync(
                metadata.describe, root, [f.path for f in files])
            config_bytes = build_config(description, files, created, names)
            manifest = manifest_for(files, config_bytes, annotations, created, description, names)
            result = PushResult(digest=digests.of_bytes(manifest), tags=[tag])
            if (not any(f.sent_while_hashed for f in files)
                    and await client.head_manifest(job.repo, tag) == result.digest):
                # The tag names this very revision already, so the registry holds its
                # blobs (a manifest is only stored once they are there): nothing to send.
                job.all_there(files, result)
            else:
                await job.send_all(files, result)
                config_digest = digests.of_bytes(config_bytes)
                if await client.blob_size(job.repo, config_digest) is None:
                    await client.upload_blob_bytes(job.repo, config_digest, config_bytes)
                await client.put_manifest(job.repo, tag, manifest, modelpack.OCI_MANIFEST)
        finally:
            job.locations.save()
    return result


# What a second file with the same bytes hears while the first is being sent: it stops.
_DUPLICATE = "duplicate"


@dataclass(eq=False)
class _Blob:
    """One blob of a push (the bytes of one file, or of several alike) and how far it got."""

    digest: str
    # How the registry gets it: EXISTING, MOUNTED, or None (it must be sent). Asked once
    # per blob, so two files with the same bytes, hashed at once, hear the same answer.
    answer: str | None = None
    answered: bool = False
    asking: trio.Event | None = None  # the question is in flight
    # A file sent while hashed carries the bytes up; the event is set once that is over.
    sending: trio.Event | None = None
    # Dealt with while a file was hashed (sent, or found not needed): only reported now.
    settled: bool = False


def _by_digest(files: list[LocalFile]) -> dict[str, list[LocalFile]]:
    """The files of each blob, first file first: a model may hold the same bytes twice."""
    groups: dict[str, list[LocalFile]] = {}
    for f in files:
        groups.setdefault(f.digest, []).append(f)
    return groups


class _Push:
    """Getting a push's blobs into the registry, each the cheapest way."""

    def __init__(self, client: RegistryClient, repo: str, locations: BlobLocations,
                 bar: Bar | None) -> None:
        self.client = client
        self.repo = repo
        self.locations = locations
        self.bar = bar
        self.uploads = DirectUploads(client)
        self.limiter = trio.CapacityLimiter(CONCURRENCY)
        self.blobs: dict[str, _Blob] = {}

    def _blob(self, digest: str) -> _Blob:
        blob = self.blobs.get(digest)
        if blob is None:
            blob = self.blobs[digest] = _Blob(digest)
        return blob

    async def _answer(self, blob: _Blob) -> str | None:
        while not blob.answered:
            if blob.asking is not None:
                await blob.asking.wait()  # asked for another file (again here if that failed)
                continue
            asking = blob.asking = trio.Event()
            try:
                source = self.locations.find(self.client.host, blob.digest)
                blob.answer = await without_upload(self.client, self.repo, blob.digest, source)
                blob.answered = True
            finally:
                blob.asking = None
                asking.set()
        return blob.answer

    async def send_while_hashing(self, src: Path, chunk_size: int) -> Hashed | None:
        """A `Hasher`: a large file whose digest is not known yet is sent while it is
        hashed, its chunk table with it (the hash decides at the end whether the upload
        was needed)."""
        size = (await trio.to_thread.run_sync(src.stat)).st_size
        if not self.uploads.worth_it(size):
            return None
        carrying: _Blob | None = None
        table: ChunkTable | None = None

        def hashing(path: str, size: int) -> str:  # in the uploader's hashing thread
            nonlocal table
            digest, table = hash_file(path, size, chunk_size)
            return digest

        async def decide(digest: str) -> str | None:
            nonlocal carrying
            blob = self._blob(digest)
            answer = await self._answer(blob)
            if answer is None:
                if blob.sending is not None:
                    return _DUPLICATE  # another file with these bytes is on its way up
                blob.sending = trio.Event()
                carrying = blob
            return answer

        try:
            async with self.limiter:
                digest, outcome = await self.uploads.upload_hashing(
                    self.repo, str(src), size, decide, self.bar, hash_file=hashing)
        finally:
            if carrying is not None:
                assert carrying.sending is not None
                carrying.sending.set()
        blob = self._blob(digest)
        if outcome == _DUPLICATE:
            assert blob.sending is not None
            await blob.sending.wait()  # the file that sent it settles the blob
        else:
            blob.settled = True  # outcome is blob.answer: what decide() said
        return digest, size, table

    def all_there(self, files: list[LocalFile], result: PushResult) -> None:
        for digest, same in _by_digest(files).items():
            result.existing.append(same[0].path)
            self.locations.record(self.client.host, digest, self.repo)
        if self.bar:
            self.bar(sum(f.size for f in files))

    async def send_all(self, files: list[LocalFile], result: PushResult) -> None:
        async with trio.open_nursery() as nursery:
            for digest, same in _by_digest(files).items():
                blob = self._blob(digest)
                # The bar counts every file once: a file sent while hashed counted itself;
                # _send counts the first file of a blob not settled yet; the others here.
                for f in same:
                    if self.bar and not f.sent_while_hashed and (
                            f is not same[0] or blob.settled):
                        self.bar(f.size)
                nursery.start_soon(self._send, blob, same[0], result)

    async def _send(self, blob: _Blob, f: LocalFile, result: PushResult) -> None:
        if blob.settled:
            outcome = blob.answer
        else:
            async with self.limiter:
                outcome = await self._answer(blob)
                if outcome is None:
                    await self.uploads.upload(self.repo, f.digest, f.size, str(f.source),
                                              self.bar)
                elif self.bar:
                    self.bar(f.size)
        if outcome == EXISTING:
            result.existing.append(f.path)
        elif outcome == MOUNTED:
            result.mounted.append(f.path)
        else:
            result.uploaded.append(f.path)
            result.bytes_uploaded += f.size
        self.locations.record(self.client.host, f.digest, self.repo)
