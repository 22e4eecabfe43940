"""Which names from a registry galleryfs takes: tags, repositories, file names.

A registry's listings are hostile input like its manifests: a tag with a NUL breaks the
URL it goes into, a tag `a/b` names another URL path, a tag `sha256:<hex>` collides with
a revision folder, a file name of 300 bytes or one that is not UTF-8 cannot be a file
name at all. Names outside these rules are skipped (with a warning) where they are read,
so the rest of a listing or a revision still shows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

# The OCI distribution spec's grammars. fullmatch, not `^...$`: `$` also matches before
# a trailing newline, which would let `latest\n` through.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
MAX_REPOSITORY = 255
# NAME_MAX of Linux file systems (and what the mount's statfs reports), in bytes.
NAME_MAX = 255
# Names quoted in one warning, and how much of each: a listing may hold thousands.
_QUOTED = 5
_QUOTE_LEN = 80
_WARNED_MAX = 10_000


def valid_tag(tag: object) -> bool:
    return isinstance(tag, str) and _TAG.fullmatch(tag) is not None


def valid_component(part: object) -> bool:
    """One segment of a repository name (`gallery`, `model`)."""
    return isinstance(part, str) and len(part) <= MAX_REPOSITORY and (
        _COMPONENT.fullmatch(part) is not None)


def valid_repository(name: object) -> bool:
    return isinstance(name, str) and len(name) <= MAX_REPOSITORY and all(
        _COMPONENT.fullmatch(p) for p in name.split("/"))


def file_name_problem(part: str) -> str | None:
    """Why one component of a file path cannot be a file name, or None if it can."""
    try:
        size = len(part.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: JSON allows it, no file system does
        return "not valid UTF-8"
    if size > NAME_MAX:
        return f"a name of {size} bytes (more than {NAME_MAX})"
    return None


def quoted(names: Iterable[object]) -> str:
    """A few names, shortened and escaped, for one log line."""
    items = list(names)
    text = ", ".join(repr(str(n)[:_QUOTE_LEN]) for n in items[:_QUOTED])
    return text + (f" and {len(items) - _QUOTED} more" if len(items) > _QUOTED else "")


def keep_valid(names: Iterable[object], valid: Callable[[object], bool], what: str,
               warned: set[str] | None = None) -> list[str]:
    """The names that pass `valid`; one warning for the others (`what` says where they
    were and what they are). With `warned`, a name is warned about once only: a mount
    re-reads its listings every few seconds."""
    good: list[str] = []
    bad: list[object] = []
    for name in names:
        if valid(name):
            good.append(name)  # type: ignore[arg-type]  # valid() checked it is a str
        else:
            bad.append(name)
    if warned is not None:
        if len(warned) > _WARNED_MAX:  # a registry inventing names cannot grow it forever
            warned.clear()
        bad = [b for b in bad if repr(b) not in warned]
        warned.update(repr(b) for b in bad)
    if bad:
        log.warning("%s: %d skipped (not valid names): %s", what, len(bad), quoted(bad))
    return good
