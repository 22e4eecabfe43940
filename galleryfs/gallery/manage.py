"""Changing what names a revision: tag it, remove a tag or the revision, copy it to
another model, gallery or registry."""

from __future__ import annotations

import json

import trio

from .. import digest as digests
from .. import modelpack
from ..errors import NotFound, UsageError
from ..reference import Reference
from ..registry.client import RegistryClient
from ..trust.accessories import accessory_tags, is_accessory_tag
from .blobs import without_upload
from .defaults import CONCURRENCY, DEFAULT_TAG, ProgressFactory, open_bar
from .pushing import check_revision_tag

MAX_ACCESSORIES = 100


async def tag(client: RegistryClient, ref: Reference, new_tags: list[str]) -> str:
    for t in new_tags:
        check_revision_tag(t)
    manifest = await client.get_manifest(ref.repository, ref.version or DEFAULT_TAG)
    for t in new_tags:
        await client.put_manifest(ref.repository, t, manifest.body,
                                  manifest.media_type or modelpack.OCI_MANIFEST)
    return manifest.digest


async def remove(client: RegistryClient, ref: Reference) -> str:
    """Remove a tag (`REF:TAG`) or a whole revision (`REF@DIGEST`). What is kept beside a
    removed revision (its signatures, chunk tables and their signatures) goes with it."""
    repo = ref.repository
    if ref.digest:
        await client.get_manifest(repo, ref.digest)  # a clear 404 first
        await client.delete_manifest(repo, ref.digest)
        return f"deleted revision {ref.digest} and all its tags" + await _remove_accessories(
            client, repo, ref.digest)
    if not ref.tag:
        raise UsageError(f"{ref}: name a tag (:TAG) or a revision (@sha256:...) to remove")
    digest = await client.head_manifest(repo, ref.tag)
    await client.delete_tag(repo, ref.tag)
    if digest and digests.is_digest(digest) and await client.head_manifest(repo, digest) is None:
        # A registry that cannot remove a tag alone removed the revision (its last tag).
        return (f"untagged {ref.tag}; its revision {digest} is gone with it"
                + await _remove_accessories(client, repo, digest))
    return f"untagged {ref.tag}"


async def accessories(client: RegistryClient, repo: str, digest: str
                      ) -> list[tuple[str, str]]:
    """(tag, digest) of what is kept beside revision `digest`: `sha256-<hex>.sig`,
    `.chunks`, ..., and what is kept beside those in turn (a `.chunks` referrer's own
    signature). A manifest that a revision tag also names is never among them."""
    tags = await client.list_tags(repo)
    revisions = {(await client.get_manifest(repo, t)).digest
                 for t in tags if not is_accessory_tag(t)}
    found: list[tuple[str, str]] = []
    seen, queue = {digest}, [digest]
    while queue and len(found) < MAX_ACCESSORIES:
        parent = queue.pop(0)
        for t in accessory_tags(parent, tags):
            try:
                m = await client.get_manifest(repo, t)
            except NotFound:
                continue
            # A tag's name is anybody's claim: only what is shaped like an accessory of
            # this manifest goes (a signature, a referrer naming it, a referrers index).
            if m.digest in revisions or not _accessory_of(m.body, parent):
                continue
            d = m.digest
            found.append((t, d))
            if d not in seen:
                seen.add(d)
                queue.append(d)
    return found


COSIGN_LAYER = "application/vnd.dev.cosign.simplesigning.v1+json"


def _accessory_of(body: bytes, parent: str) -> bool:
    """The manifest is a cosign signature, a referrer whose subject is `parent`, or an
    index (the referrers tag scheme's): never a model revision."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    if not isinstance(doc, dict):
        return False
    subject = doc.get("subject")
    if isinstance(subject, dict) and subject.get("digest") == parent:
        return True
    if "manifests" in doc:
        return True
    layers = doc.get("layers")
    return (isinstance(layers, list) and bool(layers)
            and all(isinstance(la, dict) and la.get("mediaType") == COSIGN_LAYER for la in layers))


async def _remove_accessories(client: RegistryClient, repo: str, digest: str) -> str:
    found = await accessories(client, repo, digest)
    for _, d in found:
        try:
            await client.delete_manifest(repo, d)
        except NotFound:
            pass  # gone with the revision (Harbor), or with another tag of the same manifest
    if not found:
        return ""
    return "; removed with it: " + ", ".join(t for t, _ in found)


async def copy(src_client: RegistryClient, src: Reference, dst_client: RegistryClient,
               dst: Reference, progress: ProgressFactory | None = None) -> str:
    """Copy a revision to another model or gallery; blobs mounted when on one registry."""
    # The target is checked before anything moves: a refusal must leave no blobs behind.
    if dst.digest:
        raise UsageError("copy target takes a tag, not a digest (a copy keeps the "
                         "revision's digest)")
    target = check_revision_tag(dst.tag or src.tag or DEFAULT_TAG)
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
