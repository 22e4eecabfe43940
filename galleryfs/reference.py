"""Parsing `HOST[:PORT]/GALLERY/MODEL[:TAG|@DIGEST]` references."""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import digest as digests
from .errors import InvalidReference
from .names import valid_component, valid_tag

# From the distribution spec: path components are lowercase alphanumerics joined by
# separators; tags are at most 128 word characters, dots and dashes (`names`).
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?$")


def check_tag(tag: str) -> str:
    if not valid_tag(tag):
        raise InvalidReference(
            f"invalid tag {tag!r}: use letters, digits, '_', '.', '-' (max 128, not starting with '.' or '-')"
        )
    return tag


@dataclass(frozen=True)
class Reference:
    """A registry location: a host, optionally a repository, optionally a tag or digest."""

    host: str
    repository: str = ""
    tag: str | None = None
    digest: str | None = None

    @property
    def gallery(self) -> str:
        return self.repository.split("/", 1)[0] if self.repository else ""

    @property
    def model(self) -> str:
        return self.repository.split("/", 1)[1] if "/" in self.repository else ""

    @property
    def version(self) -> str | None:
        """What names the manifest: the digest if given, else the tag."""
        return self.digest or self.tag

    def with_version(self, tag: str | None = None, digest: str | None = None) -> Reference:
        return Reference(self.host, self.repository, tag, digest)

    def __str__(self) -> str:
        text = self.host
        if self.repository:
            text += "/" + self.repository
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text


def parse(text: str) -> Reference:
    """Parse a reference; the repository part is optional (for `ls HOST`)."""
    original = text
    if not text or any(c.isspace() for c in text):
        raise InvalidReference(f"invalid reference {original!r}")
    for scheme in ("http://", "https://", "oci://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    text = text.rstrip("/")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        try:
            digests.validate(digest)
        except InvalidReference as exc:
            raise InvalidReference(f"invalid reference {original!r}: {exc}") from None
    host, _, path = text.partition("/")
    if not _HOST.match(host) or not ("." in host or ":" in host or host == "localhost"):
        raise InvalidReference(
            f"invalid reference {original!r}: it must start with a registry host, "
            "e.g. registry.example.com/gallery/model:tag"
        )
    tag = None
    if path:
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, tag = path.rsplit(":", 1)
            if not valid_tag(tag):
                raise InvalidReference(f"invalid reference {original!r}: bad tag {tag!r}")
        for part in path.split("/"):
            if not valid_component(part):
                raise InvalidReference(
                    f"invalid reference {original!r}: {part!r} is not a valid name "
                    "(lowercase letters, digits and . _ - separators)"
                )
    elif tag or digest:
        raise InvalidReference(f"invalid reference {original!r}: no gallery/model given")
    return Reference(host=host, repository=path, tag=tag, digest=digest)


def parse_model(text: str, *, root: bool = False) -> Reference:
    """A reference that must name a model: a repository of at least gallery/model, or,
    with `root`, also one at the registry's root (`HOST/model`, as oras, skopeo and docker
    accept), for commands that read."""
    ref = parse(text)
    if not ref.repository or "/" not in ref.repository and not root:
        raise InvalidReference(
            f"invalid reference {text!r}: expected HOST/GALLERY/MODEL[:TAG|@DIGEST]"
        )
    return ref
