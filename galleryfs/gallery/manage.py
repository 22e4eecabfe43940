"""Changing what names a revision: tag it, remove a tag or the revision, copy it to
another model, gallery or registry."""

from __future__ import annotations

import trio

from .. import digest as digests
from .. import modelpack
from ..errors import UsageError
from ..reference import Reference, check_tag
from ..registry.client import RegistryClient
from .blobs import without_upload
from .defaults import CONCURRENCY, DEFAULT_TAG, ProgressFactory, open_bar


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
    # The target is checked before anything moves: a refusal must leave no blobs behind.
    if dst.digest:
        raise UsageError("copy target takes a tag, not a digest (a copy keeps the "
                         "revision's digest)")
    target = check_tag(dst.tag or src.tag or DEFAULT_TAG)
    manifest = await src_client.get_manifest(src.repository, src.version or DEFAULT_TAG)
    revision = modelpack.parse_manifest(manifest.digest, manifest.body, manifest.media_type)
    blobs: dict[str, int] = {f.digest: f.size for f in revision.files}
    cfg = revision.config_descriptor
    if isinstance(cfg.get("digest"), str) and isinstance(cfg.get("size"), int):
        blobs[digests.validate(cfg["digest"])] = cfg["size"]
    # Within one registry, the registry can mount a blob from the source repository.
    source = src.repository if src_client.host == dst_client.host else None
    limiter = trio.CapacityLimiter(CONCURRENCY)

    with open_bar(progress, sum(blobs.values()), f"copy {src.model}") as bar:

        async def one(d: str, size: int) -> None:
            async with limiter:
                if await without_upload(dst_client, dst.repository, d, source) is None:
                    await dst_client.copy_blob_from(src_client, src.repository,
                                                    dst.repository, d, size, bar)

        async with trio.open_nursery() as nursery:
            for d, size in blobs.items():
                nursery.start_soon(one, d, size)
    await dst_client.put_manifest(dst.repository, target, manifest.body,
                                  manifest.media_type or modelpack.OCI_MANIFEST)
    return manifest.digest
