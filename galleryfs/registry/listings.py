"""The registry's listings read from their bytes: tags, the catalog, Harbor's projects.

Pure functions, so that they can be fuzzed (tests/test_fuzz.py): any bytes give either
names that follow the distribution spec's grammar (`galleryfs.names`) or a RegistryError,
never another exception. A name off the grammar is skipped with one warning, so one bad
tag does not hide the rest of a model.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from .. import names
from ..errors import RegistryError


def _json(body: bytes) -> object:
    """The JSON value of `body`; ValueError if it is not JSON."""
    try:
        return json.loads(body)
    except RecursionError:  # `[[[[...` nested deeper than the parser goes
        raise ValueError("nested too deep") from None


def page(body: bytes, what: str) -> dict:
    """One page of `/v2/_catalog` or `/v2/<name>/tags/list`."""
    try:
        value = _json(body)
    except ValueError:
        raise RegistryError(f"{what}: registry sent a listing that is not JSON") from None
    return value if isinstance(value, dict) else {}


def page_names(doc: dict, key: str, valid: Callable[[object], bool], what: str,
               warned: set[str] | None = None) -> list[str]:
    """The valid names under `key` ("tags", "repositories") of one listing page."""
    raw = doc.get(key)
    if raw is None:  # distribution sends `"tags": null` for a repository without tags
        return []
    if not isinstance(raw, list):
        raise RegistryError(f"{what}: registry sent a listing whose {key!r} is not a list")
    return names.keep_valid(raw, valid, f"{what}: {key}", warned)


def harbor_items(body: bytes) -> list | None:
    """A page of Harbor's API (a JSON array), or None: then the server is not Harbor."""
    try:
        value = _json(body)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def harbor_names(items: list, valid: Callable[[object], bool], what: str,
                 warned: set[str] | None = None) -> list[str]:
    """The valid `name`s of a page of Harbor projects or repositories. A project name
    goes into the URL of its repositories, so it must be a name, not a path."""
    found = [item.get("name") for item in items if isinstance(item, dict)]
    return names.keep_valid(found, valid, what, warned)
