"""Gallery operations over one registry: push, pull, list, tag, inspect, rm, copy.

Each takes a connected RegistryClient and references; the CLI only parses and prints.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .. import digest as digests
from .. import modelpack
from ..errors import (
    NotFound,
    RegistryError,
    UnsupportedContent,
    UsageError,
)
from ..modelpack import Descriptor, Revision
from ..reference import Reference, check_tag
from ..registry.client import RegistryClient
from ..registry.uploads import DirectUploads
from . import metadata
from .hashcache import HashCache
from .locations import BlobLocations

log = logging.getLogger(__name__)

DEFAULT_TAG = "latest"
CONCURRENCY = 4
ProgressFactory = Callable[[int, str], Callable[[int], None]]


# ---- push -------------------------------------------------------------------------------


@dataclass
class LocalFile:
    path: str  # POSIX, relative to the model directory
    source: Path
    digest: str
    size: int


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


# Hashes a file its own way (while uploading it) and returns (digest, size), or None.
Hasher = Callable[[Path], Awaitable[tuple[str, int] | None]]


async def hash_files(files: list[tuple[str, Path]], cache: HashCache | None = None,
                     hasher: Hasher | None = None) -> list[LocalFile]:
    out: list[LocalFile] = [None] * len(files)  # type: ignore[list-item]
    limiter = trio.CapacityLimiter(2)

    async def one(i: int, rel: str, src: Path) -> None:
        known = cache.get(src) if cache else None
        if known:
            d, size = known
        else:
            before = await trio.to_thread.run_sync(src.stat)
            got = await hasher(src) if hasher else None
            if got is None:
                async with limiter:
                    got = await trio.to_thread.run_sync(digests.file_digest, str(src))
            d, size = got
            if cache:
                cache.put(src, d, size, before)
        out[i] = LocalFile(rel, src, d, size)

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
    bar = progress(sum(sizes), f"push {ref.model}") if progress else None
    job = _Push(client, ref.repository, locations if locations is not None else BlobLocations(),
                bar)
    try:
        files = await hash_files(scanned, HashCache(), job.send_while_hashing)
        config_bytes = build_config(root, files, annotations, created)
        config = Descriptor(modelpack.CONFIG_TYPE, digests.of_bytes(config_bytes),
                            len(config_bytes))
        layers = [
            Descriptor(modelpack.layer_media_type(modelpack.layer_kind(f.path)), f.digest,
                       f.size,
                       {modelpack.ANNOTATION_FILEPATH: f.path, modelpack.ANNOTATION_TITLE: f.path})
            for f in files
        ]
        manifest_annotations = dict(annotations)
        if created:
            manifest_annotations[modelpack.ANNOTATION_CREATED] = created
        manifest = modelpack.build_manifest(config, layers, manifest_annotations)
        result = PushResult(digest=digests.of_bytes(manifest), tags=[tag])
        if not job.sent_early and await client.head_manifest(job.repo, tag) == result.digest:
            # The tag names this very revision already, so the registry holds its blobs
            # (a manifest is only stored once they are there): nothing to send.
            job.all_there(files, result)
        else:
            await job.send_all(files, result)
            if await client.blob_size(job.repo, config.digest) is None:
                await client.upload_blob_bytes(job.repo, config.digest, config_bytes)
            await client.put_manifest(job.repo, tag, manifest, modelpack.OCI_MANIFEST)
    finally:
        job.locations.save()
        if bar and hasattr(bar, "close"):
            bar.close()  # type: ignore[attr-defined]
    return result


# What a second file with the same bytes hears while the first is being sent.
_DUPLICATE = "duplicate"


class _Push:
    """Getting a push's blobs into the registry, each the cheapest way."""

    def __init__(self, client: RegistryClient, repo: str, locations: BlobLocations,
                 bar: Callable[[int], None] | None) -> None:
        self.client = client
        self.repo = repo
        self.locations = locations
        self.bar = bar
        self.uploads = DirectUploads(client)
        self.limiter = trio.CapacityLimiter(CONCURRENCY)
        # Blobs dealt with while their file was hashed: digest -> what needed() said.
        self.settled: dict[str, str | None] = {}
        self.sent_early: set[Path] = set()
        self._asked: dict[str, trio.Event] = {}
        self._sending: dict[str, trio.Event] = {}  # set once that upload is over
        self._answers: dict[str, str | None] = {}

    async def needed(self, digest: str) -> str | None:
        """How the registry gets the blob without an upload: "existing", "mounted", or
        None (it must be sent). Asked once per digest: two files with the same bytes,
        hashed at once, get the same answer."""
        asked = self._asked.get(digest)
        if asked is not None:
            await asked.wait()
            if digest in self._answers:
                return self._answers[digest]
        asked = self._asked[digest] = trio.Event()
        try:
            self._answers[digest] = answer = await self._ask(digest)
        finally:
            asked.set()
        return answer

    async def _ask(self, digest: str) -> str | None:
        client, repo = self.client, self.repo
        if await client.blob_size(repo, digest) is not None:
            return "existing"
        source_repo = self.locations.find(client.host, digest)
        if source_repo and source_repo != repo and await _try_mount(
                client, repo, digest, source_repo):
            return "mounted"
        return None

    async def send_while_hashing(self, src: Path) -> tuple[str, int] | None:
        """A `Hasher`: a large file whose digest is not known yet is sent while it is
        hashed (the hash decides at the end whether the upload was needed)."""
        size = (await trio.to_thread.run_sync(src.stat)).st_size
        if not self.uploads.worth_it(size):
            return None
        mine: list[trio.Event] = []

        async def decide(digest: str) -> str | None:
            answer = await self.needed(digest)
            if answer is None:
                if digest in self._sending:
                    return _DUPLICATE  # another file with these bytes is on its way up
                mine.append(self._sending.setdefault(digest, trio.Event()))
            return answer

        try:
            async with self.limiter:
                digest, outcome = await self.uploads.upload_hashing(
                    self.repo, str(src), size, decide, self.bar)
        finally:
            for sent in mine:
                sent.set()
        if outcome == _DUPLICATE:
            await self._sending[digest].wait()  # its outcome is the one recorded
        else:
            self.settled.setdefault(digest, outcome)
        self.sent_early.add(src)
        return digest, size

    def all_there(self, files: list[LocalFile], result: PushResult) -> None:
        seen: set[str] = set()
        for f in files:
            if f.digest not in seen:  # one blob per digest, as in send_all
                seen.add(f.digest)
                result.existing.append(f.path)
                self.locations.record(self.client.host, f.digest, self.repo)
        if self.bar:
            self.bar(sum(f.size for f in files))

    async def send_all(self, files: list[LocalFile], result: PushResult) -> None:
        # One blob per digest: a model may hold the same bytes twice.
        unique: dict[str, LocalFile] = {}
        for f in files:
            kept = unique.setdefault(f.digest, f) is f
            # The bar counts every file once: a file sent while hashed counted itself;
            # _send counts the one it decides about; the others are counted here.
            if self.bar and f.source not in self.sent_early and (
                    not kept or f.digest in self.settled):
                self.bar(f.size)
        async with trio.open_nursery() as nursery:
            for f in unique.values():
                nursery.start_soon(self._send, f, result)

    async def _send(self, f: LocalFile, result: PushResult) -> None:
        if f.digest in self.settled:
            outcome = self.settled[f.digest]
        else:
            async with self.limiter:
                outcome = await self.needed(f.digest)
                if outcome is None:
                    await self.uploads.upload(self.repo, f.digest, f.size, str(f.source),
                                              self.bar)
                elif self.bar:
                    self.bar(f.size)
        if outcome == "existing":
            result.existing.append(f.path)
        elif outcome == "mounted":
            result.mounted.append(f.path)
        else:
            result.uploaded.append(f.path)
            result.bytes_uploaded += f.size
        self.locations.record(self.client.host, f.digest, self.repo)


async def _try_mount(client: RegistryClient, repo: str, digest: str, source: str) -> bool:
    try:
        return await client.mount_blob(repo, digest, source)
    except RegistryError as exc:
        log.debug("cross-repository mount of %s from %s failed: %s", digest, source, exc)
        return False


# ---- reading revisions ------------------------------------------------------------------


async def resolve(client: RegistryClient, ref: Reference) -> Revision:
    if not ref.repository or "/" not in ref.repository:
        raise UsageError(f"{ref}: expected HOST/GALLERY/MODEL[:TAG|@DIGEST]")
    version = ref.version or DEFAULT_TAG
    manifest = await client.get_manifest(ref.repository, version)
    return modelpack.parse_manifest(manifest.digest, manifest.body, manifest.media_type)


async def read_config(client: RegistryClient, repo: str, revision: Revision) -> dict | None:
    desc = revision.config_descriptor
    d, size = desc.get("digest"), desc.get("size")
    if not isinstance(d, str) or not digests.is_digest(d) or not isinstance(size, int):
        return None
    if size > modelpack.MAX_CONFIG_SIZE:
        log.warning("%s: config of %d bytes ignored (too large)", revision.digest, size)
        return None
    data = await client.read_blob(repo, d, size)
    try:
        config = json.loads(data)
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


async def inspect(client: RegistryClient, ref: Reference) -> dict:
    revision = await resolve(client, ref)
    config = await read_config(client, ref.repository, revision)
    return {
        "reference": str(ref.with_version(ref.tag, None) if ref.tag else ref),
        "digest": revision.digest,
        "mediaType": revision.manifest.get("mediaType"),
        "artifactType": revision.manifest.get("artifactType"),
        "size": revision.size,
        "created": revision.created,
        "files": [
            {"path": f.path, "size": f.size, "digest": f.digest, "mediaType": f.media_type,
             **({} if f.servable else {"unsupported": f.reason})}
            for f in revision.files
        ],
        "skippedLayers": list(revision.skipped),
        "annotations": revision.annotations,
        "config": config,
        "manifest": revision.manifest,
    }


# ---- pull -------------------------------------------------------------------------------


async def pull(client: RegistryClient, ref: Reference, dest: Path, *,
               progress: ProgressFactory | None = None) -> Revision:
    """Download a revision into dest, verified; dest appears complete or not at all."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{dest}: already exists and is not an empty directory")
    revision = await resolve(client, ref)
    unsupported = [f for f in revision.files if not f.servable]
    if unsupported:
        names = ", ".join(f"{f.path} ({f.media_type})" for f in unsupported[:5])
        raise UnsupportedContent(f"cannot pull {ref}: packed layers are not supported yet: {names}")
    parent = dest.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{parent}: no such directory")
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.galleryfs-", dir=parent))
    bar = progress(revision.size, f"pull {ref.model}") if progress else None
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def fetch(f: modelpack.RevisionFile) -> None:
        async with limiter:
            target = staging / f.path
            await trio.to_thread.run_sync(lambda: target.parent.mkdir(parents=True, exist_ok=True))
            await client.download_blob(ref.repository, f.digest, f.size, target, bar)
            os.chmod(target, 0o644)

    try:
        async with trio.open_nursery() as nursery:
            for f in revision.files:
                nursery.start_soon(fetch, f)
        if dest.exists():
            dest.rmdir()
        os.replace(staging, dest)
        os.chmod(dest, 0o755)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if bar and hasattr(bar, "close"):
            bar.close()  # type: ignore[attr-defined]
    return revision


# ---- listing ----------------------------------------------------------------------------


@dataclass
class RevisionInfo:
    digest: str
    tags: list[str]
    size: int
    created: str | None
    files: int


async def list_galleries(client: RegistryClient) -> dict[str, int]:
    counts: dict[str, int] = {}
    for repo in await client.repositories():
        if "/" in repo:
            gallery = repo.split("/", 1)[0]
            counts[gallery] = counts.get(gallery, 0) + 1
    return dict(sorted(counts.items()))


async def list_models(client: RegistryClient, prefix: str) -> list[str]:
    return sorted(r for r in await client.repositories() if r.startswith(prefix + "/"))


async def list_revisions(client: RegistryClient, repo: str) -> list[RevisionInfo]:
    tags = await client.list_tags(repo)
    by_digest: dict[str, RevisionInfo] = {}
    limiter = trio.CapacityLimiter(8)
    manifests: dict[str, Revision | None] = {}

    async def one(tag: str) -> None:
        async with limiter:
            try:
                m = await client.get_manifest(repo, tag)
            except NotFound:
                return  # deleted between the listing and now
            try:
                manifests[tag] = modelpack.parse_manifest(m.digest, m.body, m.media_type)
            except UnsupportedContent:
                manifests[tag] = None
                by_digest.setdefault(m.digest, RevisionInfo(m.digest, [], 0, None, 0)).tags.append(tag)

    async with trio.open_nursery() as nursery:
        for tag in tags:
            nursery.start_soon(one, tag)
    for tag in sorted(tags):
        rev = manifests.get(tag)
        if rev is None:
            continue
        info = by_digest.setdefault(
            rev.digest, RevisionInfo(rev.digest, [], rev.size, rev.created, len(rev.files)))
        info.tags.append(tag)
    for info in by_digest.values():
        info.tags.sort()
    return sorted(by_digest.values(), key=lambda i: (i.created or "", i.tags), reverse=True)


# ---- tag, rm, copy ------------------------------------------------------------------------


async def tag(client: RegistryClient, ref: Reference, new_tags: list[str]) -> str:
    for t in new_tags:
        check_tag(t)
    manifest = await client.get_manifest(ref.repository, ref.version or DEFAULT_TAG)
    for t in new_tags:
        await client.put_manifest(ref.repository, t, manifest.body,
                                  manifest.media_type or modelpack.OCI_MANIFEST)
    return manifest.digest


async def remove(client: RegistryClient, ref: Reference) -> str:
    """Remove a tag (`REF:TAG`) or a whole revision (`REF@DIGEST`)."""
    if ref.digest:
        await client.get_manifest(ref.repository, ref.digest)  # a clear 404 first
        await client.delete_manifest(ref.repository, ref.digest)
        return f"deleted revision {ref.digest} and all its tags"
    if not ref.tag:
        raise UsageError(f"{ref}: name a tag (:TAG) or a revision (@sha256:...) to remove")
    await client.delete_tag(ref.repository, ref.tag)
    return f"untagged {ref.tag}"


async def copy(src_client: RegistryClient, src: Reference, dst_client: RegistryClient,
               dst: Reference, progress: ProgressFactory | None = None) -> str:
    """Copy a revision to another model or gallery; blobs mounted when on one registry."""
    manifest = await src_client.get_manifest(src.repository, src.version or DEFAULT_TAG)
    revision = modelpack.parse_manifest(manifest.digest, manifest.body, manifest.media_type)
    blobs: dict[str, int] = {f.digest: f.size for f in revision.files}
    cfg = revision.config_descriptor
    if isinstance(cfg.get("digest"), str) and isinstance(cfg.get("size"), int):
        blobs[digests.validate(cfg["digest"])] = cfg["size"]
    same_registry = src_client.host == dst_client.host
    limiter = trio.CapacityLimiter(CONCURRENCY)
    bar = progress(sum(blobs.values()), f"copy {src.model}") if progress else None

    async def one(d: str, size: int) -> None:
        async with limiter:
            if await dst_client.blob_size(dst.repository, d) is not None:
                return
            if same_registry and await _try_mount(dst_client, dst.repository, d, src.repository):
                return
            await dst_client.copy_blob_from(src_client, src.repository, dst.repository, d, size, bar)

    async with trio.open_nursery() as nursery:
        for d, size in blobs.items():
            nursery.start_soon(one, d, size)
    target = check_tag(dst.tag or src.tag or DEFAULT_TAG)
    if dst.digest:
        raise UsageError("copy target takes a tag, not a digest")
    await dst_client.put_manifest(dst.repository, target, manifest.body,
                                  manifest.media_type or modelpack.OCI_MANIFEST)
    return manifest.digest
