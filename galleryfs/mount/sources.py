"""Where the tree's listings and manifests come from: the registry, through its client."""

from __future__ import annotations

import trio

from ..errors import UnsupportedContent
from ..modelpack import Revision, parse_manifest
from ..registry.client import RegistryClient
from ..trust.keys import PublicKey
from ..trust.policy import Verdict
from ..trust.vouch import vouch

# Manifests parsed, by digest: a listing refresh fetches each tag's manifest again, and
# one already parsed is neither parsed (and warned about) again.
PARSED_KEPT = 256


class RegistrySource:
    """A `Source` (and, with keys, a `Voucher`) over a RegistryClient.

    Repositories come from Harbor's project API where the registry has it, else from
    `/v2/_catalog` (see `RegistryClient.repositories`); tags and repository names that do
    not follow the distribution spec's grammar are left out there. Signatures and signed
    chunk tables are looked up beside each revision (`trust.vouch`).
    """

    def __init__(self, client: RegistryClient, keys: tuple[PublicKey, ...] = ()) -> None:
        self.client = client
        self.keys = keys
        self._parsed: dict[str, Revision | UnsupportedContent] = {}

    async def catalog(self) -> list[str]:
        return await self.client.repositories()

    async def tags(self, repo: str) -> list[str]:
        return await self.client.list_tags(repo)

    async def manifest(self, repo: str, reference: str) -> Revision:
        m = await self.client.get_manifest(repo, reference)
        parsed = self._parsed.get(m.digest)
        if parsed is None:
            try:
                # In a worker thread: a manifest of thousands of layers takes a moment to
                # check, and reads of other files must not wait for it.
                parsed = await trio.to_thread.run_sync(
                    parse_manifest, m.digest, m.body, m.media_type)
            except UnsupportedContent as exc:
                parsed = exc
            if len(self._parsed) >= PARSED_KEPT:
                del self._parsed[next(iter(self._parsed))]
            self._parsed[m.digest] = parsed
        if isinstance(parsed, UnsupportedContent):
            raise UnsupportedContent(str(parsed))
        return parsed

    async def vouch(self, repo: str, revision: Revision) -> Verdict:
        return await vouch(self.client, repo, revision, list(self.keys))
