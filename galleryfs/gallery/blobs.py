"""Getting a blob into a repository without sending its bytes: it is there already, or
the registry mounts it from another repository that holds it."""

from __future__ import annotations

import logging

from ..errors import RegistryError
from ..registry.client import RegistryClient

log = logging.getLogger(__name__)

EXISTING = "existing"
MOUNTED = "mounted"


async def without_upload(client: RegistryClient, repo: str, digest: str,
                         source: str | None) -> str | None:
    """EXISTING or MOUNTED (from `source`, a repository of the same registry) when the
    blob needs no upload to `repo`, else None."""
    if await client.blob_size(repo, digest) is not None:
        return EXISTING
    if source and source != repo and await _try_mount(client, repo, digest, source):
        return MOUNTED
    return None


async def _try_mount(client: RegistryClient, repo: str, digest: str, source: str) -> bool:
    # A failed mount only means the blob is sent after all (the source may be a stale
    # hint, or a repository this account cannot read).
    try:
        return await client.mount_blob(repo, digest, source)
    except RegistryError as exc:
        log.debug("cross-repository mount of %s from %s failed: %s", digest, source, exc)
        return False
