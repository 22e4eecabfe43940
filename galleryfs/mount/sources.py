"""Where the tree's listings and manifests come from: the registry, through its client."""

from __future__ import annotations

from ..modelpack import Revision, parse_manifest
from ..registry.client import RegistryClient


class RegistrySource:
    """A `Source` over a RegistryClient.

    Repositories come from Harbor's project API where the registry has it, else from
    `/v2/_catalog` (see `RegistryClient.repositories`).
    """

    def __init__(self, client: RegistryClient) -> None:
        self.client = client

    async def catalog(self) -> list[str]:
        return await self.client.repositories()

    async def tags(self, repo: str) -> list[str]:
        return await self.client.list_tags(repo)

    async def manifest(self, repo: str, reference: str) -> Revision:
        m = await self.client.get_manifest(repo, reference)
        return parse_manifest(m.digest, m.body, m.media_type)
