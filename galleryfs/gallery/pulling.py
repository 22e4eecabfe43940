"""Reading a revision: a reference resolved to its manifest, its config read, the two
described (`inspect`), or its files downloaded into a directory (`pull`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import trio

from .. import digest as digests
from .. import modelpack
from ..errors import UnsupportedContent, UsageError
from ..modelpack import Revision
from ..reference import Reference
from ..registry.client import RegistryClient
from .defaults import CONCURRENCY, DEFAULT_TAG, ProgressFactory, open_bar

log = logging.getLogger(__name__)


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
    limiter = trio.CapacityLimiter(CONCURRENCY)
    with open_bar(progress, revision.size, f"pull {ref.model}") as bar:

        async def fetch(f: modelpack.RevisionFile) -> None:
            async with limiter:
                target = staging / f.path
                await trio.to_thread.run_sync(
                    lambda: target.parent.mkdir(parents=True, exist_ok=True))
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
    return revision
