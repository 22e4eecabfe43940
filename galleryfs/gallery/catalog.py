"""What a registry holds, as galleries, models and revisions: the listings of `ls`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from .. import modelpack
from ..errors import NotFound, UnsupportedContent
from ..modelpack import Revision
from ..registry.client import RegistryClient
from ..trust.accessories import is_accessory_tag

log = logging.getLogger(__name__)


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


async def list_root_models(client: RegistryClient) -> list[str]:
    """Repositories at the registry's root (`HOST/model`, which oras, skopeo and docker
    accept): models outside any gallery. Harbor keeps every repository in a project: once
    the client knows it talks to one, it does not page through every project again."""
    if client.is_harbor:
        return []
    return sorted(r for r in await client.repositories() if "/" not in r)


async def list_models(client: RegistryClient, prefix: str) -> list[str]:
    # Asked for one gallery: on Harbor, one project's listing rather than every project's.
    return sorted(r for r in await client.repositories(prefix) if r.startswith(prefix + "/"))


async def list_revisions(client: RegistryClient, repo: str) -> list[RevisionInfo]:
    # Signatures, chunk tables, referrer indexes: kept beside revisions, not revisions.
    tags = [t for t in await client.list_tags(repo) if not is_accessory_tag(t)]
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
                # In a thread: a manifest of thousands of layers takes a moment to check.
                manifests[tag] = await trio.to_thread.run_sync(
                    modelpack.parse_manifest, m.digest, m.body, m.media_type)
            except UnsupportedContent as exc:
                log.warning("%s:%s: %s", repo, tag, exc)
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
