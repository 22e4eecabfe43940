"""Where the tree's listings and manifests come from: the registry, through its client."""

from __future__ import annotations

from ..modelpack import Revision, parse_manifest
from ..registry.client import RegistryClient
from ..trust.keys import PublicKey
from ..trust.policy import Verdict
from ..trust.vouch import vouch


class RegistrySource:
    """A `Source` (and, with keys, a `Voucher`) over a RegistryClient.

    Repositories come from Harbor's project API where the registry has it, else from
    `/v2/_catalog` (see `RegistryClient.repositories`). Signatures and signed chunk tables
    are looked up beside each revision (`trust.vouch`).
    """

    def __init__(self, client: RegistryClient, keys: tuple[PublicKey, ...] = ()) -> None:
        self.client = client
        self.keys = keys

    async def catalog(self) -> list[str]:
        return await self.client.repositories()

    async def tags(self, repo: str) -> list[str]:
        return await self.client.list_tags(repo)

    async def manifest(self, repo: str, reference: str) -> Revision:
        m = await self.client.get_manifest(repo, reference)
        return parse_manifest(m.digest, m.body, m.media_type)

    async def vouch(self, repo: str, revision: Revision) -> Verdict:
        return await vouch(self.client, repo, revision, list(self.keys))
