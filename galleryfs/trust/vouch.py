"""Who vouches for a revision: its signatures and signed chunk tables, looked up in its
repository and checked against the trusted keys (the mount's `--require-signed-by`)."""

from __future__ import annotations

from ..errors import UnsupportedContent
from ..modelpack import Revision, parse_manifest
from ..registry.client import RegistryClient
from . import chunks, cosign, modelsig
from .keys import PublicKey
from .policy import Verdict


async def vouch(client: RegistryClient, repo: str, revision: Revision,
                keys: list[PublicKey]) -> Verdict:
    """The verdict on `revision` for `keys`. Registry outages and refusals are raised (a
    verdict is cached; an outage says nothing about a signature)."""
    found = await cosign.verify(client, repo, revision.digest, keys)
    scheme = "cosign"
    if found.key is None and modelsig.attached(revision):
        other = await modelsig.verify(client, repo, revision, keys)
        if other.key is not None:
            found, scheme = other, "model-signing"
            # It vouches for the files' digests, not the manifest: its tables don't count.
            revision = chunks.without_tables(revision)
        else:
            found = cosign.Found(None, f"{found.reason}; {other.reason}")
    tables = (await chunks.signed_tables(client, repo, revision.digest, keys)
              if chunks.wants_tables(revision) else {})
    if found.key is None:
        return Verdict(reason=found.reason, tables=tables)
    return Verdict(signer=found.key.name, scheme=scheme, tables=tables)


async def verify_reference(client: RegistryClient, repo: str, reference: str,
                           keys: list[PublicKey]) -> tuple[str, Verdict]:
    """The digest `reference` names and the verdict on it (`galleryfs verify`)."""
    m = await client.get_manifest(repo, reference)
    try:
        revision = parse_manifest(m.digest, m.body, m.media_type)
    except UnsupportedContent:  # an index, say: cosign signs any manifest
        found = await cosign.verify(client, repo, m.digest, keys)
        if found.key is None:
            return m.digest, Verdict(reason=found.reason)
        return m.digest, Verdict(signer=found.key.name, scheme="cosign")
    verdict = await vouch(client, repo, revision, keys)
    return m.digest, Verdict(verdict.signer, verdict.scheme, verdict.reason)
