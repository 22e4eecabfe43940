"""What a mount is asked to do: `MountConfig`, checked once, and its JSON for the daemon child.

`galleryfs mount` (cli.py) is the only command line; it builds a `MountConfig`, and the
background child gets the same values as JSON on stdin (credentials included, so never in
argv). Sizes are bytes and times seconds here; the command line's `10G` and `4M` are
turned into bytes by `cli.parse_size` before they arrive.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..reference import parse
from ..registry.client import ClientOptions
from ..registry.credentials import Credentials
from ..registry.retry import RetryPolicy
from ..trust.keys import parse_public
from ..trust.policy import Policy
from .reader import DEFAULT_CHUNK
from .tree import DEFAULT_MAX_INODES
from .verify import MODES as VERIFY_MODES
from .verify import STRICT

DEFAULT_CACHE_SIZE = 10 << 30
DEFAULT_REFRESH = 30.0
MIN_CHUNK = 4 << 10
MAX_CHUNK = 256 << 20
MIN_INODES = 1000


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "galleryfs")


@dataclass
class MountConfig:
    source: str  # HOST, HOST/GALLERY or HOST/GALLERY/MODEL
    mountpoint: str
    options: ClientOptions
    cache_dir: str
    cache_size: int = DEFAULT_CACHE_SIZE  # bytes; 0: no disk cache
    refresh: float = DEFAULT_REFRESH  # seconds listings and tags are trusted
    chunk_size: int = DEFAULT_CHUNK  # bytes per range request
    debug: bool = False
    # --require-signed-by: the trusted public keys, as PEM text (read by the command line,
    # so the daemon child needs no key file); --audit: log unsigned revisions, show them.
    trusted_keys: list[str] = dataclasses.field(default_factory=list)
    audit: bool = False
    verify: str = STRICT  # files without a chunk table: verified whole first, or at the end
    # Who may read: with allow_other, every local user the modes (owner uid/gid, and
    # umask's bits taken away) let through; the kernel checks them (default_permissions).
    allow_other: bool = False
    uid: int | None = None  # owner shown; None: the user who mounts
    gid: int | None = None
    umask: int = 0o022  # bits taken from r-xr-xr-x (folders) and r--r--r-- (files)
    max_inodes: int = DEFAULT_MAX_INODES  # bound of the inode table (tree.py)

    def __post_init__(self) -> None:
        self.mountpoint = os.path.abspath(self.mountpoint)
        self.cache_dir = os.path.abspath(self.cache_dir)
        _root(self.source)
        if self.cache_size < 0:
            raise UsageError("--cache-size must not be negative")
        if self.refresh < 0:
            raise UsageError("--refresh must not be negative")
        if not MIN_CHUNK <= self.chunk_size <= MAX_CHUNK:
            raise UsageError("--chunk-size must be between 4K and 256M")
        if self.max_inodes < MIN_INODES:
            raise UsageError(f"--max-inodes must be at least {MIN_INODES}")
        if self.verify not in VERIFY_MODES:
            raise UsageError(f"--verify takes {' or '.join(VERIFY_MODES)}")
        for name, value in (("--uid", self.uid), ("--gid", self.gid)):
            if value is not None and not 0 <= value < 2**32 - 1:
                raise UsageError(f"{name} must be a user or group number, 0 to 4294967294")
        if not 0 <= self.umask <= 0o777:
            raise UsageError("--umask must be an octal mode such as 022 or 077")
        if self.audit and not self.trusted_keys:
            raise UsageError("--audit needs --require-signed-by")
        self.policy  # noqa: B018 - every key parses, or a one-line error now

    @property
    def policy(self) -> Policy:
        return Policy(tuple(parse_public(pem.encode(), f"--require-signed-by key {i + 1}")
                            for i, pem in enumerate(self.trusted_keys)), self.audit)

    @property
    def root(self) -> tuple[str, str]:
        """The registry host and the repository prefix the mount shows."""
        return _root(self.source)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MountConfig:
        data = json.loads(text)
        o = data.pop("options")
        options = ClientOptions(
            **{**o, "credentials": Credentials(**o["credentials"]) if o["credentials"] else None,
               "retry": RetryPolicy(**o["retry"]) if o["retry"] else None,
               "mirrors": tuple(o.get("mirrors") or ())})
        return cls(options=options, **data)


def _root(source: str) -> tuple[str, str]:
    ref = parse(source)
    if ref.tag or ref.digest:
        raise UsageError("mount takes HOST, HOST/GALLERY or HOST/GALLERY/MODEL (no tag or digest)")
    return ref.host, ref.repository
