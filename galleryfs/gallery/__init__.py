"""Gallery operations over one registry: push, pull, list, tag, inspect, remove, copy.

Each takes a connected RegistryClient and references; the CLI only parses and prints.

    pushing.py    a model directory pushed as a revision (blobs sent the cheapest way)
    pulling.py    a revision resolved, inspected, or downloaded into a directory
    catalog.py    the listings: galleries, models, revisions
    manage.py     tag, remove, copy
    blobs.py      a blob brought into a repository without an upload (there, or mounted)
    defaults.py   the default tag, the concurrency, the progress bar
    metadata.py   what a model directory is (format, architecture, parameters)
    hashcache.py, locations.py, hintfile.py   hints kept between runs (digests, blob homes)
"""

from __future__ import annotations

from .catalog import RevisionInfo, list_galleries, list_models, list_revisions, list_root_models
from .defaults import DEFAULT_TAG, ProgressFactory
from .manage import copy, remove, tag
from .pulling import inspect, pull, resolve
from .pushing import PushResult, push

__all__ = [
    "DEFAULT_TAG",
    "ProgressFactory",
    "PushResult",
    "RevisionInfo",
    "copy",
    "inspect",
    "list_galleries",
    "list_models",
    "list_root_models",
    "list_revisions",
    "pull",
    "push",
    "remove",
    "resolve",
    "tag",
]
