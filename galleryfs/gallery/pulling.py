"""Reading a revision: a reference resolved to its manifest, its config read, the two
described (`inspect`), or its files downloaded into a directory (`pull`)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import trio

from .. import digest as digests
from .. import modelpack
from ..errors import GalleryError, UnsupportedContent, UsageError
from ..modelpack import Revision
from ..reference import Reference
from ..registry.client import RegistryClient
from .defaults import CONCURRENCY, DEFAULT_TAG, ProgressFactory, open_bar
from .pushing import (
    FILE_DTYPES,
    FILE_PARAMETERS,
    FILE_TENSORS,
    MODEL_ARCHITECTURES,
    MODEL_PARAMETERS,
    MODEL_TYPE,
)
from .unpack import unpack_layers

log = logging.getLogger(__name__)


class Terminated(GalleryError):
    """SIGTERM during a pull (exit status as for a process killed by it)."""

    exit_code = 128 + signal.SIGTERM


async def resolve(client: RegistryClient, ref: Reference) -> Revision:
    if not ref.repository:  # a model at the registry's root (HOST/model) is fine
        raise UsageError(f"{ref}: expected HOST/GALLERY/MODEL[:TAG|@DIGEST]")
    version = ref.version or DEFAULT_TAG
    manifest = await client.get_manifest(ref.repository, version)
    # In a thread: a manifest of thousands of layers takes a moment to check.
    return await trio.to_thread.run_sync(
        modelpack.parse_manifest, manifest.digest, manifest.body, manifest.media_type)


async def read_config(client: RegistryClient, repo: str, revision: Revision) -> dict | None:
    desc = revision.config_descriptor
    d, size = desc.get("digest"), desc.get("size")
    if not isinstance(d, str) or not digests.is_digest(d) or not isinstance(size, int):
        return None
    if size > modelpack.MAX_CONFIG_SIZE:
        log.warning("%s: config of %d bytes ignored (too large)", revision.digest, size)
        return None
    data = await client.read_blob(repo, d, size)
    return modelpack.parse_config(data)


def _count(raw: object) -> int | None:
    """A count from an annotation (a string a pusher wrote: maybe anything)."""
    if isinstance(raw, str) and raw.isdigit() and len(raw) <= 20:
        return int(raw)
    return None


def _text(raw: object) -> str | None:
    return raw if isinstance(raw, str) else None


def _names(raw: object) -> list[str]:
    if not isinstance(raw, str):
        return []
    return [n for n in raw.split(",") if n]


_LayerKey = tuple[str, str, int]


def _key(f: modelpack.RevisionFile) -> _LayerKey:
    return f.path, f.digest, f.size


def _layer_annotations(revision: Revision) -> dict[_LayerKey, dict]:
    """The annotations of each file's layer, by (path, digest, size)."""
    out: dict[_LayerKey, dict] = {}
    for layer in revision.manifest.get("layers") or []:
        annotations = layer.get("annotations") if isinstance(layer, dict) else None
        if not isinstance(annotations, dict):
            continue
        path = modelpack.safe_path(modelpack.layer_path(annotations))
        digest, size = layer.get("digest"), layer.get("size")
        if path is not None and isinstance(digest, str) and isinstance(size, int):
            out.setdefault((path, digest, size), annotations)
    return out


def _file_facts(f: modelpack.RevisionFile, annotations: dict) -> dict:
    facts: dict = {}
    dtypes = _names(annotations.get(FILE_DTYPES))
    if dtypes:
        facts["dtypes"] = dtypes
    for key, name in ((FILE_TENSORS, "tensors"), (FILE_PARAMETERS, "parameters")):
        count = _count(annotations.get(key))
        if count is not None:
            facts[name] = count
    if f.table is not None:
        facts["chunkTable"] = {"chunkSize": f.table.chunk_size, "chunks": len(f.table)}
    return facts


def describe_model(revision: Revision, config: dict | None,
                   layers: dict[_LayerKey, dict] | None = None) -> dict:
    """What the revision says about its model: from the ModelPack config (descriptor,
    config) and galleryfs's annotations on the manifest and its layers."""
    layers = _layer_annotations(revision) if layers is None else layers
    section = config.get("config") if isinstance(config, dict) else None
    section = section if isinstance(section, dict) else {}
    descriptor = config.get("descriptor") if isinstance(config, dict) else None
    descriptor = descriptor if isinstance(descriptor, dict) else {}
    annotations = revision.annotations
    dtypes: set[str] = set()
    for f in revision.files:
        dtypes.update(_names((layers.get(_key(f)) or {}).get(FILE_DTYPES)))
    model = {
        "format": section.get("format"),
        "architecture": section.get("architecture"),
        "architectures": _names(annotations.get(MODEL_ARCHITECTURES)),
        "modelType": _text(annotations.get(MODEL_TYPE)),
        "precision": section.get("precision"),
        "paramSize": section.get("paramSize"),
        "parameters": _count(annotations.get(MODEL_PARAMETERS)),
        "dtypes": sorted(dtypes),
        "createdAt": descriptor.get("createdAt"),
    }
    return {k: v for k, v in model.items() if v not in (None, "", [])}


async def inspect(client: RegistryClient, ref: Reference) -> dict:
    revision = await resolve(client, ref)
    config = await read_config(client, ref.repository, revision)
    layers = _layer_annotations(revision)
    return {
        "reference": str(ref.with_version(ref.tag, None) if ref.tag else ref),
        "digest": revision.digest,
        "mediaType": revision.manifest.get("mediaType"),
        "artifactType": revision.manifest.get("artifactType"),
        "size": revision.size,
        "created": revision.created,
        "model": describe_model(revision, config, layers),
        "files": [
            {"path": f.path, "size": f.size, "digest": f.digest, "mediaType": f.media_type,
             **_file_facts(f, layers.get(_key(f)) or {}),
             # A packed layer: its members are what pull writes and the mount shows.
             **({"packed": f.packing} if f.packing else
                {} if f.servable else {"unsupported": f.reason})}
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
    # dest is replaced by renaming the staging folder onto it: a link, "." or ".." cannot
    # be, and would fail only after the whole download.
    if dest.is_symlink():
        raise UsageError(f"{dest}: is a symbolic link: name the folder itself")
    if dest.name in ("", ".."):
        raise UsageError(f"{dest}: name the folder to create by its own name")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{dest}: already exists and is not an empty directory")
    revision = await resolve(client, ref)
    # Packed layers are unpacked (unpack.py); one packed some unknown way cannot be.
    unsupported = [f for f in revision.files if not f.servable and not f.packing]
    if unsupported:
        names = ", ".join(f"{f.path} ({f.media_type})" for f in unsupported[:5])
        raise UnsupportedContent(f"cannot pull {ref}: layers galleryfs cannot unpack: {names}")
    parent = dest.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{parent}: no such directory")
    limiter = trio.CapacityLimiter(CONCURRENCY)
    # SIGTERM (a service stopped, a pod evicted) cleans up as Ctrl-C does: the staging
    # folder is removed, not left beside `dest` (SIGTERM's default would kill us first).
    with _sigterm() as signals:
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.galleryfs-", dir=parent))
        terminated = False
        with open_bar(progress, revision.size, f"pull {ref.model}") as bar:

            async def fetch(f: modelpack.RevisionFile) -> None:
                async with limiter:
                    target = staging / f.path
                    await trio.to_thread.run_sync(
                        lambda: target.parent.mkdir(parents=True, exist_ok=True))
                    await client.download_blob(ref.repository, f.digest, f.size, target, bar)
                    os.chmod(target, 0o644)

            async def until_sigterm(cancel: trio.CancelScope) -> None:
                nonlocal terminated
                if signals is None:
                    return
                async for _ in signals:
                    terminated = True
                    cancel.cancel()
                    return

            try:
                async with trio.open_nursery() as watcher:
                    watcher.start_soon(until_sigterm, watcher.cancel_scope)
                    async with trio.open_nursery() as nursery:
                        for f in revision.files:
                            if not f.packing:
                                nursery.start_soon(fetch, f)
                        nursery.start_soon(unpack_layers, client, ref.repository, revision,
                                           staging, bar, limiter)
                    watcher.cancel_scope.cancel()
                if terminated:
                    raise Terminated(f"pull of {ref} terminated (SIGTERM); nothing was "
                                     f"written to {dest}")
                if dest.exists():
                    dest.rmdir()
                os.replace(staging, dest)
                os.chmod(dest, 0o755)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    return revision


@contextlib.contextmanager
def _sigterm() -> Iterator[trio.abc.ReceiveChannel[int] | None]:
    """SIGTERM as a channel while in the block (None off the main thread, where Python
    cannot take signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        yield signals
