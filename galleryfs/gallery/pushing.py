"""Pushing a model directory as a revision: its files listed and hashed, described in a
config, each blob brought into the registry the cheapest way, then the manifest tagged."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .. import digest as digests
from .. import modelpack
from ..errors import UsageError
from ..modelpack import Descriptor
from ..reference import Reference, check_tag
from ..registry.client import RegistryClient
from ..registry.uploads import DirectUploads
from . import metadata
from .blobs import EXISTING, MOUNTED, without_upload
from .defaults import CONCURRENCY, DEFAULT_TAG, Bar, ProgressFactory, open_bar
from .hashcache import HashCache
from .locations import BlobLocations

log = logging.getLogger(__name__)


@dataclass
class LocalFile:
    path: str  # POSIX, relative to the model directory
    source: Path
    digest: str
    size: int
    # Sent while it was hashed (or found not needed then): the bar has counted it.
    sent_while_hashed: bool = False


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


# Sends a file while hashing it and returns (digest, size), or None when that does not
# pay for this file (it is then hashed on its own).
Hasher = Callable[[Path], Awaitable[tuple[str, int] | None]]


async def hash_files(files: list[tuple[str, Path]], cache: HashCache | None = None,
                     hasher: Hasher | None = None) -> list[LocalFile]:
    """Each file's digest and size, from the cache when its metadata is unchanged, else
    from `hasher`, else read here (two files at a time)."""
    out: list[LocalFile] = [None] * len(files)  # type: ignore[list-item]
    limiter = trio.CapacityLimiter(2)

    async def one(i: int, rel: str, src: Path) -> None:
        known = cache.get(src) if cache else None
        sent = False
        if known:
            d, size = known
        else:
            before = await trio.to_thread.run_sync(src.stat)
            got = await hasher(src) if hasher else None
            sent = got is not None
            if got is None:
                async with limiter:
                    got = (await trio.to_thread.run_sync(digests.of_file, src, before.st_size),
                           before.st_size)
            d, size = got
            if cache:
                cache.put(src, d, size, before)
        out[i] = LocalFile(rel, src, d, size, sent)

    async with trio.open_nursery() as nursery:
        for i, (rel, src) in enumerate(files):
            nursery.start_soon(one, i, rel, src)
    if cache:
        cache.save()
    return out


def build_config(root: Path, files: list[LocalFile], annotations: dict[str, str],
                 created: str | None) -> bytes:
    description = metadata.describe(root, [f.path for f in files])
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
        }.items() if v},
        "modelfs": {"type": "layers", "diffIds": [f.digest for f in files]},
        "galleryfs": {
            "files": [{"path": f.path, "size": f.size, "digest": f.digest,
                       "kind": modelpack.layer_kind(f.path)} for f in files],
            "totalSize": sum(f.size for f in files),
            **description,
            "annotations": dict(sorted(annotations.items())),
        },
    }
    return modelpack.dumps(config)


def manifest_for(files: list[LocalFile], config_bytes: bytes, annotations: dict[str, str],
                   created: str | None) -> bytes:
    config = Descriptor(modelpack.CONFIG_TYPE, digests.of_bytes(config_bytes), len(config_bytes))
    layers = [
        Descriptor(modelpack.layer_media_type(modelpack.layer_kind(f.path)), f.digest, f.size,
                   {modelpack.ANNOTATION_FILEPATH: f.path, modelpack.ANNOTATION_TITLE: f.path})
        for f in files
    ]
    manifest_annotations = dict(annotations)
    if created:
        manifest_annotations[modelpack.ANNOTATION_CREATED] = created
    return modelpack.build_manifest(config, layers, manifest_annotations)


async def push(client: RegistryClient, root: Path, ref: Reference, *,
               annotations: dict[str, str] | None = None, created: str | None = None,
               progress: ProgressFactory | None = None,
               locations: BlobLocations | None = None) -> PushResult:
    annotations = dict(annotations or {})
    if ref.digest:
        raise UsageError("push takes a tag, not a digest: the digest follows from the content")
    tag = check_tag(ref.tag or DEFAULT_TAG)
    scanned = await trio.to_thread.run_sync(scan_directory, root)
    sizes = await trio.to_thread.run_sync(lambda: [src.stat().st_size for _, src in scanned])
    with open_bar(progress, sum(sizes), f"push {ref.model}") as bar:
        job = _Push(client, ref.repository,
                    locations if locations is not None else BlobLocations(), bar)
        try:
            files = await hash_files(scanned, HashCache(), job.send_while_hashing)
            config_bytes = build_config(root, files, annotations, created)
            manifest = manifest_for(files, config_bytes, annotations, created)
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

    async def send_while_hashing(self, src: Path) -> tuple[str, int] | None:
        """A `Hasher`: a large file whose digest is not known yet is sent while it is
        hashed (the hash decides at the end whether the upload was needed)."""
        size = (await trio.to_thread.run_sync(src.stat)).st_size
        if not self.uploads.worth_it(size):
            return None
        carrying: _Blob | None = None

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
                    self.repo, str(src), size, decide, self.bar)
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
        return digest, size

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
