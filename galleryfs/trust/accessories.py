"""What a registry keeps beside a revision, named after its digest: not revisions.

cosign signatures (`sha256-<hex>.sig`), attestations (`.att`), SBOMs (`.sbom`), galleryfs's
signed chunk tables (`.chunks`) and the OCI 1.1 referrers-tag index (`sha256-<hex>`) are
tags of the revision's repository. `ls` and the mount do not show them, and `rm` of a
revision takes them along.
"""

from __future__ import annotations

import re

from .. import digest as digests

ACCESSORY_TAG = re.compile(r"^sha256-[0-9a-f]{64}(\..+)?$")


def is_accessory_tag(tag: str) -> bool:
    return bool(ACCESSORY_TAG.match(tag))


def accessory_tags(digest: str, tags: list[str]) -> list[str]:
    """The tags among `tags` that belong to the revision `digest`."""
    algo, _, hexpart = digests.validate(digest).partition(":")
    base = f"{algo}-{hexpart}"
    return sorted(t for t in tags if t == base or t.startswith(base + "."))
