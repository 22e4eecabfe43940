"""Packed (tar) layers of a revision, pulled: each downloaded (verified), decompressed if
it must be, listed and placed by `tarindex` (the mount's rules: the same files at the
same paths, the same members skipped), and its members written into the pull's staging
folder. Links are written as copies of the file they name, never as links."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import trio

from .. import tarindex
from ..errors import UnsupportedContent
from ..modelpack import TAR, Revision, RevisionFile
from ..registry.client import ProgressFn, RegistryClient

log = logging.getLogger(__name__)

_COPY_PIECE = 1 << 20
# Free space kept when a layer is decompressed (what a bomb may not take).
_SPARE = 256 << 20


def _open_new(path: Path) -> int:
    # O_EXCL | O_NOFOLLOW: never through a link, never over a file already written.
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)


def _decompress(blob: Path, packing: str, tar: Path) -> None:
    limit = max(0, shutil.disk_usage(tar.parent).free - _SPARE)
    with open(blob, "rb") as raw, open(tar, "wb") as out:
        try:
            tarindex.inflate(raw, packing, out.write, limit)
        except ValueError as exc:
            raise UnsupportedContent(f"packed layer {blob.name}: {exc}") from None


def _list(tar: Path) -> tarindex.Listing:
    fd = os.open(tar, os.O_RDONLY)
    try:
        return tarindex.index(lambda off, n: os.pread(fd, n, off), os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _write(tar: Path, members: list[RevisionFile], staging: Path) -> None:
    fd = os.open(tar, os.O_RDONLY)
    try:
        for f in members:
            assert f.member is not None
            target = staging / f.path
            if f.member.folder:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            out = _open_new(target)
            try:
                pos, end = f.member.offset, f.member.offset + f.size
                while pos < end:
                    data = os.pread(fd, min(_COPY_PIECE, end - pos), pos)
                    if not data:
                        raise UnsupportedContent(f"{f.path}: its layer ends early")
                    os.write(out, data)
                    pos += len(data)
            finally:
                os.close(out)
    finally:
        os.close(fd)


async def unpack_layers(client: RegistryClient, repo: str, revision: Revision,
                        staging: Path, progress: ProgressFn | None = None,
                        limiter: trio.CapacityLimiter | None = None) -> None:
    """Write the members of every packed layer of `revision` into `staging`. Layer
    blobs are downloaded beside it (in a folder removed on return, error or not)."""
    packed = [f for f in revision.files if f.packing]
    if not packed:
        return
    limiter = limiter or trio.CapacityLimiter(1)
    tars: dict[str, Path] = {}
    listings: dict[str, tarindex.Listing | None] = {}
    with tempfile.TemporaryDirectory(prefix=f".{staging.name}-layers-",
                                     dir=staging.parent) as work:

        async def fetch(f: RevisionFile) -> None:
            if f.digest in tars:
                return
            hex_ = f.digest.partition(":")[2]
            blob = Path(work) / f"{hex_}.blob"
            tars[f.digest] = blob
            async with limiter:
                await client.download_blob(repo, f.digest, f.size, blob, progress)
            if f.packing != TAR:
                tar = Path(work) / f"{hex_}.tar"
                await trio.to_thread.run_sync(_decompress, blob, f.packing, tar)
                blob.unlink()
                tars[f.digest] = tar
            listings[f.digest] = await trio.to_thread.run_sync(_list, tars[f.digest])

        async with trio.open_nursery() as nursery:
            for f in packed:
                nursery.start_soon(fetch, f)
        expanded = tarindex.expand(revision, listings)
        by_layer: dict[str, list[RevisionFile]] = {}
        for f in expanded.files:
            if f.member is not None:
                by_layer.setdefault(f.digest, []).append(f)
        for digest, members in by_layer.items():
            await trio.to_thread.run_sync(_write, tars[digest], members, staging)
