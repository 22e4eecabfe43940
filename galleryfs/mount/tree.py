"""The directory tree of a galleryfs mount, as a pure model: no FUSE, no HTTP.

Layout (relative to the mount root, which may be the registry, a gallery or a model)::

    <gallery>/<model>/                 one folder per path segment of nested model names
    <gallery>/<model>/<tag>            symlink -> sha256:<hex>   (tags move)
    <gallery>/<model>/sha256:<hex>/    one revision: its files at their recorded paths

A folder that stands for a repository-name prefix is a *namespace*. A namespace may
itself be a repository (it then also holds tags and revisions) and may hold nested
namespaces (`g/m` and `g/m/v2` are both repositories).

Name collisions. A repository `g/m` with a tag `base` and a repository `g/m/base` both
want the name `base` inside `g/m/`. Rule: **the nested model folder wins**; the tag is
hidden from that folder and a warning is logged once per (repository, tag). The tag's
revision stays reachable by its digest name, which cannot collide: tags and repository
name segments never contain ':'. Revision folders are listed for every revision a
current tag points to; any other revision of the repository is reachable (not listed)
by looking up its `sha256:<hex>` name.

Signatures (`--require-signed-by`, see `trust.policy`). Tags named after a digest
(`sha256-<hex>.sig`, `.chunks`, referrer indexes: `trust.accessories`) are never shown.
Under a policy, a revision is looked up in its repository once (`Voucher.vouch`) before
its folder exists: one no trusted key signed is left out of the listing with its tags,
and looking it up by digest raises `Unsigned` (EACCES), with one warning per revision;
`--audit` shows it, with the warning. A verdict is kept for good once signed, else for
`refresh` seconds like the listing (a signature added later shows on the next refresh).
Chunk tables the voucher found (a `.chunks` referrer a trusted key signed) are given to
the revision's files that have none before the folder is built.

When the mount is rooted at a model (`REGISTRY/GALLERY/MODEL`) no catalog is read, so
models nested below the root model do not appear there (and no collision can arise).

Freshness. Revision contents are immutable (named by digest): they are fetched once and
kept. Namespace listings (catalog, tags, tag -> digest) are re-read when older than
`refresh` seconds, on lookup/listing/readlink, and on `revalidate` (the kernel asking
for a folder's attributes). When a refresh fails but an older listing exists, the old
one is served (with a warning) rather than failing `ls`. A namespace folder's mtime is
the moment its listing last changed, and `fresh_for` says how long its listing stays
fresh: the kernel caches a listing while the folder's attributes are valid and re-reads
it when the mtime has moved (see `operations.Operations.opendir`).

Inodes and memory. An inode number is a hash of the node's key (repository, tag,
digest, path), so a name gets the same number whenever it is made: the tree may drop
what it knows of a folder and build it again later (from the registry, or from the
manifest it kept) without the kernel seeing a number move, not even in a listing it
cached. A number is never given to another key while a node holds it, and a node is
dropped only when the kernel holds no reference to it (its lookup count, raised by each
lookup and each readdirplus entry, lowered by `forget`, is 0) and no file handle uses it,
so a number the kernel may still use always means the same entry. A hash collision (two
keys, one 63-bit number: about 1 in 10^8 for 100,000 live nodes) is settled by hashing
again, once the first number is taken.

`max_inodes` bounds the table: when it holds more nodes, `trim` drops the contents of
folders nothing below which is held (stale listings first, then the least recently
used), drops nodes no listing reaches any more (tags deleted or moved), and names the
least recently used entries below the pinned top of the tree (the root, and a registry
root's galleries) for the kernel to let go of (`Operations` sends the kernel an entry
invalidation; the forgets that follow let the next `trim` drop them). Memory then follows
`max_inodes` and the size of the pinned listings, not how much was ever listed.
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import logging
import math
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .. import digest as digests
from ..errors import (
    GalleryError,
    NotFound,
    RegistryUnavailable,
    Unsigned,
    UnsupportedContent,
    first_error,
)
from ..modelpack import Revision, RevisionFile
from ..names import valid_tag
from ..trust.accessories import is_accessory_tag
from ..trust.chunks import with_tables, without_tables
from ..trust.policy import Decision, Policy, Verdict

log = logging.getLogger(__name__)

# Seconds for which a listing that went unanswered spares the registry (Tree.__init__).
UNANSWERED_HOLD = 10.0

ROOT_INODE = 1
# The time shown for a revision without a creation date, and its files: the same on every
# mount, so `rsync -a` and `make` see unchanged files as unchanged after a remount. It is
# the earliest time a zip archive can hold, as reproducible builds use.
UNDATED_NS = 315_532_800 * 10**9  # 1980-01-01T00:00:00Z
FILE_MODE = 0o444
DIR_MODE = 0o555
LINK_MODE = 0o777
# Parallel manifest GETs when resolving the tags of one repository.
RESOLVE_CONCURRENCY = 8
# Listing a namespace folder starts listing its child folders in the background (with
# `Tree.spawn`), a few at a time: `ls -R`, `find` or a loader walking a gallery then
# finds each model's tags resolved instead of waiting for them one model after another.
# Not beyond this many children: a registry root can hold thousands.
PREFETCH_LISTINGS = 4
PREFETCH_MAX_CHILDREN = 1000
# The default bound of the inode table (`--max-inodes`); a node and its share of the
# listings take about 1-2 KiB.
DEFAULT_MAX_INODES = 100_000
# A trim brings the table down to this share of the bound, so that it is not trimmed
# again at every new name.
TRIM_TARGET = 0.8
# An entry the kernel was asked to let go of is not asked about again for this long
# (one in use, a working directory or an open file, stays).
REASK_AFTER = 30.0


class Source(Protocol):
    """Where listings come from: a registry, or a fake in unit tests."""

    async def catalog(self) -> list[str]: ...

    async def tags(self, repo: str) -> list[str]: ...

    async def manifest(self, repo: str, reference: str) -> Revision: ...


class Voucher(Protocol):
    """Who vouches for a revision: its signatures, checked against the trusted keys."""

    async def vouch(self, repo: str, revision: Revision) -> Verdict: ...


# (repo, revision) -> the revision with its packed layers' members in their place
# (mount/packed.py). None: packed layers stay listed as unservable files.
Unpack = Callable[[str, Revision], Awaitable[Revision]]


class Refused(Unsigned):
    """A revision the mount's signature policy refuses (logged once by the tree)."""


class Kind(enum.Enum):
    NAMESPACE = "namespace"
    TAG = "tag"
    REVISION = "revision"
    FOLDER = "folder"
    FILE = "file"


@dataclass(eq=False)
class Node:
    inode: int
    kind: Kind
    name: str
    parent: int
    repo: str = ""
    # TAG: the revision it points at; REVISION: the manifest digest.
    digest: str = ""
    # FOLDER/FILE: path inside the revision; REVISION: "".
    path: str = ""
    file: RevisionFile | None = None
    revision: int = 0  # FOLDER/FILE: inode of the revision folder
    mtime_ns: int = 0
    children: dict[str, int] | None = None  # REVISION/FOLDER: fixed contents
    lookups: int = 0  # references the kernel holds (lookups and readdirplus entries)
    key: tuple = ()  # what the inode number is a hash of
    touched: int = 0  # when last looked up or listed (a tick of the tree's own)

    @property
    def is_dir(self) -> bool:
        return self.kind in (Kind.NAMESPACE, Kind.REVISION, Kind.FOLDER)

    @property
    def immutable(self) -> bool:
        """Revision folders and their contents never change (content-addressed)."""
        return self.kind in (Kind.REVISION, Kind.FOLDER, Kind.FILE)


@dataclass(frozen=True)
class Attrs:
    inode: int
    mode: int
    size: int
    blocks: int
    nlink: int
    mtime_ns: int
    immutable: bool


@dataclass
class _Listing:
    entries: dict[str, int]
    fetched_at: float


@dataclass
class _NamespaceState:
    listing: _Listing | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)
    prefetching: bool = False
    # What the last listing held, kept when a trim drops the listing: the folder's
    # mtime moves only if the next one differs (the kernel may have cached the old one).
    fingerprint: int | None = None


@dataclass
class _Survey:
    order: list[int] = field(default_factory=list)  # reached from the root, parents first
    size: dict[int, int] = field(default_factory=dict)  # nodes below
    held: dict[int, bool] = field(default_factory=dict)  # any below held or busy
    recent: dict[int, int] = field(default_factory=dict)  # latest touch at or below


class Tree:
    """The mount's names and inodes, fed by a `Source`."""

    def __init__(
        self,
        source: Source,
        root_repo: str = "",
        *,
        refresh: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        mount_time_ns: int | None = None,
        policy: Policy | None = None,
        voucher: Voucher | None = None,
        unpack: Unpack | None = None,
        max_inodes: int = DEFAULT_MAX_INODES,
    ) -> None:
        self.source = source
        self.unpack = unpack
        self.max_inodes = max_inodes  # 0: unbounded
        self.policy = policy or Policy()
        if self.policy.enforced and voucher is None:
            raise ValueError("a signature policy needs a voucher")
        self.voucher = voucher
        self._verdicts: dict[tuple[str, str], tuple[Verdict, float]] = {}
        self._vouching: dict[tuple[str, str], trio.Lock] = {}
        self._policy_warned: set[tuple[str, str]] = set()
        self.root_repo = root_repo.strip("/")
        self.refresh = refresh
        self.clock = clock
        self.mount_time_ns = mount_time_ns if mount_time_ns is not None else time.time_ns()
        # At a model root the catalog is not needed (and may be forbidden to the user).
        self.use_catalog = self.root_repo.count("/") == 0
        self._nodes: dict[int, Node] = {}
        self._keys: dict[tuple, int] = {}
        self._namespaces: dict[int, _NamespaceState] = {}
        self._revisions: dict[str, Revision] = {}  # by manifest digest, immutable
        self._catalog: _Listing | None = None
        self._catalog_repos: list[str] = []
        self._catalog_lock = trio.Lock()
        # When a catalog or tag list last went unanswered (the registry down or stalled):
        # for the next UNANSWERED_HOLD seconds folders keep their old listings without
        # asking, and the tags of a model never listed fail at once, so a path walk across
        # several folders (the kernel's lookup, opendir, readdir of each) waits once.
        self._unanswered: RegistryUnavailable | None = None
        self._unanswered_at = -math.inf
        self._warned: set[tuple[str, str]] = set()
        self._open: dict[int, int] = {}  # inode -> open file handles
        self._tick = 0
        self._asked: dict[int, float] = {}  # inode -> when the kernel was asked to let go
        self.inodes_peak = 0
        self.inodes_dropped = 0
        # Where background listings run (the mount's nursery); None: never.
        self.spawn: trio.Nursery | None = None
        self._prefetch_limiter = trio.CapacityLimiter(PREFETCH_LISTINGS)
        self.prefetched_listings = 0
        root = self._node(("ns", self.root_repo), Kind.NAMESPACE, "", ROOT_INODE,
                          repo=self.root_repo)
        assert root.inode == ROOT_INODE

    # ---- inode table -------------------------------------------------------------

    def _node(self, key: tuple, kind: Kind, name: str, parent: int, **fields: object) -> Node:
        inode = self._keys.get(key)
        if inode is not None:
            return self._nodes[inode]
        inode = ROOT_INODE if not self._nodes else self._number(key)
        node = Node(inode, kind, name, parent, key=key, **fields)  # type: ignore[arg-type]
        if not node.mtime_ns:
            node.mtime_ns = self.mount_time_ns
        self._nodes[inode] = node
        self._keys[key] = inode
        if kind is Kind.NAMESPACE:
            self._namespaces[inode] = _NamespaceState()
        self.inodes_peak = max(self.inodes_peak, len(self._nodes))
        return node

    def _number(self, key: tuple) -> int:
        """The key's inode number: the same each time the key is made (see the module
        docstring), never one a live node holds."""
        text = repr(key).encode("utf-8", "surrogatepass")
        salt = b""
        while True:
            h = hashlib.blake2b(text, digest_size=8, salt=salt).digest()
            inode = int.from_bytes(h, "big") >> 1  # 63 bits: st_ino stays positive
            if inode > ROOT_INODE and inode not in self._nodes:
                return inode
            salt = (int.from_bytes(salt or b"\0", "big") + 1).to_bytes(8, "big")

    def get(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise NotFound(f"inode {inode} is unknown") from None

    def _touch(self, node: Node) -> None:
        self._tick += 1
        node.touched = self._tick

    def count_lookup(self, inode: int, n: int = 1) -> None:
        self._nodes[inode].lookups += n

    def forget(self, inode: int, n: int) -> None:
        """The kernel dropped `n` references; a node at 0 may go at the next `trim`."""
        node = self._nodes.get(inode)
        if node is not None:
            node.lookups = max(0, node.lookups - n)
            if not node.lookups:
                self._asked.pop(inode, None)  # let go: ask again if it is taken again

    def opened(self, inode: int) -> None:
        self._open[inode] = self._open.get(inode, 0) + 1
        node = self._nodes.get(inode)
        if node is not None:
            self._touch(node)

    def closed(self, inode: int) -> None:
        left = self._open.get(inode, 0) - 1
        if left > 0:
            self._open[inode] = left
        else:
            self._open.pop(inode, None)

    @property
    def inode_count(self) -> int:
        return len(self._nodes)

    @property
    def over_limit(self) -> bool:
        return bool(self.max_inodes) and len(self._nodes) > self.max_inodes

    # ---- bounding the table ------------------------------------------------------

    def trim(self) -> list[tuple[int, str]]:
        """Bring the table back under `max_inodes` as far as the kernel lets it; the
        (parent inode, name) entries the kernel should be asked to let go of for more.

        First the contents of folders nothing below which is held are dropped (they
        are built again when asked for): stale namespace listings first, which would
        be read again anyway, then the least recently used. Then nodes no folder lists
        any more, and that the kernel does not hold. Nothing the kernel holds, nothing
        an open file uses and no listing being read is dropped.
        """
        if not self.over_limit:
            return []
        target = int(self.max_inodes * TRIM_TARGET)
        survey = self._survey()
        units = [i for i in survey.order if self._clearable(i, survey)
                 and not self._clearable(self._nodes[i].parent, survey)]
        now = self.clock()

        def stale_then_lru(inode: int) -> tuple[bool, int]:
            state = self._namespaces.get(inode)
            fresh = state is None or (state.listing is not None
                                      and now - state.listing.fetched_at < self.refresh)
            return fresh, survey.recent[inode]

        for inode in sorted(units, key=stale_then_lru):
            if len(self._nodes) <= target:
                break
            self._clear(self._nodes[inode])
        self._sweep()
        self._asked = {i: t for i, t in self._asked.items()
                       if i in self._nodes and now - t < REASK_AFTER}
        excess = len(self._nodes) - target
        if excess <= 0:
            return []
        # The kernel holds the rest: ask it to let go of the least recently used
        # entries below the pinned top, each with everything below it.
        pinned = self._pinned()
        candidates = [i for top in pinned for i in self._contents(self._nodes[top])
                      if i in self._nodes and i not in pinned and i not in self._asked
                      and survey.held.get(i)]  # else nothing below it to let go of
        asks: list[tuple[int, str]] = []
        for inode in sorted(candidates, key=lambda i: survey.recent[i]):
            if excess <= 0:
                break
            node = self._nodes[inode]
            asks.append((node.parent, node.name))
            self._asked[inode] = now
            excess -= 1 + survey.size.get(inode, 0)
        return asks

    def _pinned(self) -> set[int]:
        pinned = {ROOT_INODE}
        if not self.root_repo:  # a registry root: its galleries stay too
            pinned.update(self._contents(self._nodes[ROOT_INODE]))
        return pinned

    def _contents(self, node: Node) -> Iterable[int]:
        if node.kind is Kind.NAMESPACE:
            state = self._namespaces.get(node.inode)
            if state is None or state.listing is None:
                return ()
            return state.listing.entries.values()
        return node.children.values() if node.children else ()

    def _busy(self, node: Node) -> bool:
        state = self._namespaces.get(node.inode)
        return state is not None and state.lock.locked()

    def _free(self, node: Node) -> bool:
        return node.lookups == 0 and node.inode not in self._open and not self._busy(node)

    def _survey(self) -> _Survey:
        """For each folder reached from the root: how many nodes are below it, whether
        any of them is held, and when any of them was last used."""
        survey = _Survey()
        seen: set[int] = set()
        stack = [ROOT_INODE]
        while stack:
            inode = stack.pop()
            if inode in seen or inode not in self._nodes:
                continue
            seen.add(inode)
            survey.order.append(inode)
            stack.extend(self._contents(self._nodes[inode]))
        for inode in reversed(survey.order):  # children before their folder
            node = self._nodes[inode]
            size, held, recent = 0, False, node.touched
            for child in self._contents(node):
                if child not in survey.size:
                    continue
                size += 1 + survey.size[child]
                held = held or survey.held[child] or not self._free(self._nodes[child])
                recent = max(recent, survey.recent[child])
            survey.size[inode], survey.held[inode], survey.recent[inode] = size, held, recent
        return survey

    def _clearable(self, inode: int, survey: _Survey) -> bool:
        """A namespace's listing or a revision's files can be dropped: none is held."""
        node = self._nodes.get(inode)
        return (node is not None and inode != ROOT_INODE and inode in survey.size
                and node.kind in (Kind.NAMESPACE, Kind.REVISION)
                and (survey.size[inode] > 0 or self._has_contents(node))
                and not survey.held[inode] and not self._busy(node))

    def _has_contents(self, node: Node) -> bool:
        if node.kind is Kind.NAMESPACE:
            state = self._namespaces.get(node.inode)
            return state is not None and state.listing is not None
        return node.children is not None

    def _clear(self, folder: Node) -> None:
        """Drop a folder's contents and everything below them; they are built again
        (with the same inode numbers) when next asked for."""
        stack = list(self._contents(folder))
        if folder.kind is Kind.NAMESPACE:
            self._namespaces[folder.inode].listing = None
        else:
            folder.children = None
        while stack:
            node = self._nodes.get(stack.pop())
            if node is not None:
                stack.extend(self._contents(node))
                self._drop(node)

    def _sweep(self) -> None:
        """Drop nodes that no listing reaches from the root or from a held node."""
        keep: set[int] = set()
        held = [i for i, n in self._nodes.items() if not self._free(n)]
        above: set[int] = set()
        for inode in held:  # and the folders above them
            node = self._nodes.get(self._nodes[inode].parent)
            while node is not None and node.inode not in above:
                above.add(node.inode)
                node = self._nodes.get(node.parent)
        stack = [ROOT_INODE, *held, *above]
        # A listing being built has made nodes it has not published yet.
        building = {i for i, s in self._namespaces.items() if s.lock.locked()}
        stack += [i for i, n in self._nodes.items() if n.parent in building]
        while stack:
            inode = stack.pop()
            if inode in keep or inode not in self._nodes:
                continue
            keep.add(inode)
            stack.extend(self._contents(self._nodes[inode]))
        for inode in [i for i in self._nodes if i not in keep]:
            self._drop(self._nodes[inode])
        # Manifests and verdicts go with the last node that names their revision.
        live = {n.digest for n in self._nodes.values() if n.kind in (Kind.REVISION, Kind.TAG)}
        live_revs = {(n.repo, n.digest) for n in self._nodes.values()
                     if n.kind in (Kind.REVISION, Kind.TAG)}
        for digest in [d for d in self._revisions if d not in live]:
            del self._revisions[digest]
        for key in [k for k in self._verdicts if k not in live_revs]:
            del self._verdicts[key]
        for key in [k for k, lock in self._vouching.items()
                    if k not in live_revs and not lock.locked()]:
            del self._vouching[key]

    def _drop(self, node: Node) -> None:
        if self._nodes.get(node.inode) is not node:
            return
        del self._nodes[node.inode]
        if self._keys.get(node.key) == node.inode:
            del self._keys[node.key]
        self._namespaces.pop(node.inode, None)
        self.inodes_dropped += 1

    # ---- attributes --------------------------------------------------------------

    def attrs(self, inode: int) -> Attrs:
        node = self.get(inode)
        if node.kind is Kind.FILE:
            assert node.file is not None
            size = node.file.size
            # 512-byte units, as stat(2) defines st_blocks, so `du` adds up to the size.
            return Attrs(inode, stat.S_IFREG | FILE_MODE, size, math.ceil(size / 512), 1,
                         node.mtime_ns, True)
        if node.kind is Kind.TAG:
            size = len(node.digest)
            return Attrs(inode, stat.S_IFLNK | LINK_MODE, size, 0, 1, node.mtime_ns, False)
        if node.children is not None:
            subdirs = sum(1 for c in node.children.values() if self._nodes[c].is_dir)
            nlink = 2 + subdirs
        else:
            # A namespace's subfolders change with the catalog; 1 tells `find` not to
            # use the link count to skip subdirectory checks.
            nlink = 1
        return Attrs(inode, stat.S_IFDIR | DIR_MODE, 0, 0, nlink, node.mtime_ns,
                     node.immutable)

    # ---- lookups -----------------------------------------------------------------

    async def lookup(self, parent: int, name: str) -> Node:
        """The child `name` of folder `parent`; counts one lookup."""
        node = await self._child(parent, name)
        node.lookups += 1
        self._touch(node)
        return node

    async def _child(self, parent: int, name: str) -> Node:
        folder = self.get(parent)
        if not folder.is_dir:
            raise NotFound(f"{name}: parent is not a folder")
        if name in (".", ".."):
            raise NotFound(name)  # the kernel resolves these itself
        if folder.kind is Kind.NAMESPACE:
            entries = await self._namespace_entries(folder)
            inode = entries.get(name)
            if inode is not None:
                return self._nodes[inode]
            if digests.is_digest(name) and await self._is_repo(folder):
                # An untagged (or older) revision: reachable by name, not listed.
                return await self._revision_node(folder, name)
            raise NotFound(f"{self.display_path(parent)}/{name}: no such model, tag or revision")
        folder = await self._expand(folder)
        assert folder.children is not None
        inode = folder.children.get(name)
        if inode is None:
            raise NotFound(f"{self.display_path(parent)}/{name}: no such file in the revision")
        return self._nodes[inode]

    async def listdir(self, inode: int, *, refresh: bool = True) -> list[tuple[str, int]]:
        """Sorted (name, inode) pairs of a folder: stable order for readdir offsets.

        With `refresh` False, a namespace's current listing is used even when stale, so
        that the offsets of a listing read in several requests stay valid.
        """
        folder = self.get(inode)
        if not folder.is_dir:
            raise NotADirectoryError(inode)
        self._touch(folder)
        if folder.kind is Kind.NAMESPACE:
            entries = await self._namespace_entries(folder, refresh=refresh)
            self._prefetch_children(entries)
        else:
            folder = await self._expand(folder)
            assert folder.children is not None
            entries = folder.children
        return sorted(entries.items())

    def _prefetch_children(self, entries: dict[str, int]) -> None:
        if self.spawn is None:
            return
        children = [self._nodes[i] for i in entries.values()]
        stale = [n for n in children if n.kind is Kind.NAMESPACE and not self._listed(n)]
        if len(stale) > PREFETCH_MAX_CHILDREN:
            return
        for node in stale:
            state = self._namespaces[node.inode]
            if state.prefetching:
                continue
            state.prefetching = True
            self.spawn.start_soon(self._prefetch_listing, node)

    def _holding(self) -> bool:
        return self.clock() - self._unanswered_at < UNANSWERED_HOLD

    def _note_unanswered(self, exc: GalleryError) -> None:
        if isinstance(exc, RegistryUnavailable):
            self._unanswered = exc
            self._unanswered_at = self.clock()

    def _listed(self, folder: Node) -> bool:
        state = self._namespaces.get(folder.inode)
        listing = state.listing if state is not None else None
        return listing is not None and self.clock() - listing.fetched_at < self.refresh

    def fresh_for(self, inode: int) -> float:
        """Seconds for which what is known of a changeable node stays fresh."""
        state = self._namespaces.get(inode)
        if state is None or state.listing is None:
            return self.refresh
        return max(0.0, self.refresh - (self.clock() - state.listing.fetched_at))

    async def revalidate(self, inode: int) -> None:
        """Re-read a namespace folder's listing if it is stale, so that its attributes
        (mtime) tell whether a listing cached from it is still current. A folder never
        listed has nothing to revalidate."""
        folder = self.get(inode)
        state = self._namespaces.get(inode)
        if state is not None and state.listing is not None and not self._listed(folder):
            await self._namespace_entries(folder)

    async def _prefetch_listing(self, folder: Node) -> None:
        state = self._namespaces[folder.inode]
        try:
            async with self._prefetch_limiter:
                # A trim may have dropped the folder while this waited its turn.
                if self._nodes.get(folder.inode) is folder and not self._listed(folder):
                    await self._namespace_entries(folder)
                    self.prefetched_listings += 1
        except GalleryError as exc:  # the foreground listing will report it
            log.debug("background listing of %s failed: %s", self.display_path(folder.inode), exc)
        finally:
            state.prefetching = False

    async def readlink(self, inode: int) -> str:
        node = self.get(inode)
        if node.kind is not Kind.TAG:
            raise UnsupportedContent(f"inode {inode} is not a symlink")
        # Tags move: refresh the owning listing when it is stale, so the link follows.
        folder = self._nodes.get(node.parent)
        if folder is not None:  # else a tag gone from the registry, still held
            await self._namespace_entries(folder)
        return node.digest

    def display_path(self, inode: int) -> str:
        parts: list[str] = []
        node = self._nodes.get(inode)
        while node is not None and node.inode != ROOT_INODE:
            parts.append(node.name)
            node = self._nodes.get(node.parent)
        return "/" + "/".join(reversed(parts))

    def revision_of(self, inode: int) -> Revision | None:
        node = self.get(inode)
        digest = node.digest if node.kind is Kind.REVISION else (
            self._nodes[node.revision].digest if node.revision else "")
        return self._revisions.get(digest)

    # ---- namespaces --------------------------------------------------------------

    async def check(self) -> None:
        """Read the root listing once: fails early if the root does not exist."""
        root = self._nodes[ROOT_INODE]
        entries = await self._namespace_entries(root)
        if self.root_repo and not entries and not await self._is_repo(root):
            raise NotFound(f"{self.root_repo}: no such gallery or model")

    async def _is_repo(self, folder: Node) -> bool:
        if not folder.repo:
            return False
        if not self.use_catalog:
            return True
        repos = await self._catalog_list()
        return folder.repo in repos

    async def _catalog_list(self) -> list[str]:
        async with self._catalog_lock:
            if self._catalog is None or (self.clock() - self._catalog.fetched_at >= self.refresh
                                         and not self._holding()):
                try:
                    repos = await self.source.catalog()
                except GalleryError as exc:
                    self._note_unanswered(exc)
                    if self._catalog is None:
                        raise
                    log.warning("catalog refresh failed, keeping the old listing: %s", exc)
                    self._catalog.fetched_at = self.clock()
                else:
                    self._unanswered_at = -math.inf  # answered: ask again from now on
                    prefix = self.root_repo + "/" if self.root_repo else ""
                    self._catalog_repos = sorted(
                        r for r in repos if not prefix or r == self.root_repo
                        or r.startswith(prefix))
                    self._catalog = _Listing({}, self.clock())
            return self._catalog_repos

    async def _namespace_entries(self, folder: Node, *, refresh: bool = True
                                 ) -> dict[str, int]:
        state = self._namespaces[folder.inode]
        async with state.lock:
            listing = state.listing
            if listing is not None and (
                    not refresh or self.clock() - listing.fetched_at < self.refresh
                    or self._holding()):
                return listing.entries
            try:
                entries = await self._build_namespace(folder)
            except GalleryError as exc:
                if listing is None:
                    raise
                log.warning("%s: refresh failed, keeping the old listing: %s",
                            self.display_path(folder.inode), exc)
                listing.fetched_at = self.clock()
                return listing.entries
            fingerprint = hash(tuple(sorted(entries.items())))
            if state.fingerprint is not None and fingerprint != state.fingerprint:
                # Strictly later: the kernel compares it with the mtime it cached.
                folder.mtime_ns = max(folder.mtime_ns + 1, time.time_ns())
            state.listing = _Listing(entries, self.clock())
            state.fingerprint = fingerprint
            return entries

    async def _build_namespace(self, folder: Node) -> dict[str, int]:
        entries: dict[str, int] = {}
        is_repo = not self.use_catalog and bool(folder.repo)
        if self.use_catalog:
            prefix = folder.repo + "/" if folder.repo else ""
            for repo in await self._catalog_list():
                if repo == folder.repo:
                    is_repo = True
                elif repo.startswith(prefix):
                    segment = repo[len(prefix):].split("/", 1)[0]
                    child_repo = prefix + segment
                    entries[segment] = self._node(
                        ("ns", child_repo), Kind.NAMESPACE, segment, folder.inode,
                        repo=child_repo).inode
        if not is_repo:
            return entries
        if self._holding() and self._unanswered is not None:
            # A listing went unanswered a moment ago: the tags would wait as long again.
            raise RegistryUnavailable(f"{self._unanswered} (a moment ago)")
        # Signatures, chunk tables, referrer indexes: kept beside revisions, not revisions.
        try:
            found = await self.source.tags(folder.repo)
        except GalleryError as exc:
            self._note_unanswered(exc)
            raise
        self._unanswered_at = -math.inf  # answered: ask again from now on
        # A tag off the OCI grammar (`a/b`, `sha256:<hex>`, a NUL) cannot be a name here.
        tags = sorted(t for t in set(found) if valid_tag(t) and not is_accessory_tag(t))
        resolved: dict[str, str] = {}

        async def resolve(tag: str, limiter: trio.CapacityLimiter) -> None:
            async with limiter:
                try:
                    revision = await self.source.manifest(folder.repo, tag)
                except (NotFound, UnsupportedContent, Unsigned) as exc:
                    # A tag deleted since the listing, an image index, a revision the
                    # registry serves only signed (Harbor's 412): leave it out rather
                    # than break the whole folder. Warned once, not at each refresh.
                    if (folder.repo, f"{tag}\0{exc}") not in self._warned:
                        self._warned.add((folder.repo, f"{tag}\0{exc}"))
                        log.warning("%s:%s is left out: %s", folder.repo, tag, exc)
                    return
                self._revisions.setdefault(revision.digest, revision)
                try:
                    # Here, so that revisions are vouched for in parallel.
                    await self._admit(folder.repo, revision)
                except Refused:
                    return  # hidden, with its tags
            resolved[tag] = revision.digest

        limiter = trio.CapacityLimiter(RESOLVE_CONCURRENCY)
        try:
            async with trio.open_nursery() as nursery:
                for tag in tags:
                    nursery.start_soon(resolve, tag, limiter)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        for digest in sorted(set(resolved.values())):
            entries[digest] = (await self._revision_node(folder, digest)).inode
        for tag, digest in sorted(resolved.items()):
            if tag in entries:
                if (folder.repo, tag) not in self._warned:
                    self._warned.add((folder.repo, tag))
                    log.warning("%s: tag %r is hidden by the nested model %s/%s "
                                "(its revision is still at %s)",
                                folder.repo, tag, folder.repo, tag, digest)
                continue
            node = self._node(("tag", folder.repo, tag), Kind.TAG, tag, folder.inode,
                              repo=folder.repo)
            node.digest = digest
            entries[tag] = node.inode
        return entries

    async def _revision_node(self, folder: Node, digest: str) -> Node:
        key = ("rev", folder.repo, digest)
        inode = self._keys.get(key)
        if inode is not None:
            return self._nodes[inode]  # admitted when it was made
        revision = self._revisions.get(digest)
        if revision is None:
            revision = await self.source.manifest(folder.repo, digest)
            self._revisions[digest] = revision
        revision = await self._admit(folder.repo, revision)
        inode = self._keys.get(key)
        if inode is not None:  # made by a concurrent lookup meanwhile
            return self._nodes[inode]
        return self._node(key, Kind.REVISION, digest, folder.inode, repo=folder.repo,
                          digest=digest, mtime_ns=_created_ns(revision) or UNDATED_NS)

    async def _admit(self, repo: str, revision: Revision) -> Revision:
        """The revision (with the chunk tables its voucher found) if the policy lets it be
        shown; Unsigned if not. The verdict is asked once per refresh, kept once signed."""
        if not self.policy.enforced:
            return revision
        assert self.voucher is not None
        key = (repo, revision.digest)
        async with self._vouching.setdefault(key, trio.Lock()):
            cached = self._verdicts.get(key)
            if cached is None or (not cached[0].signed
                                  and self.clock() - cached[1] >= self.refresh):
                verdict = await self.voucher.vouch(repo, revision)
                self._verdicts[key] = (verdict, self.clock())
                base = self._revisions.get(revision.digest, revision)
                if verdict.signed and verdict.scheme == "model-signing":
                    # model-signing covers the files' digests, not the manifest: the
                    # tables a manifest carries are the registry's word, not the signer's.
                    base = without_tables(base)
                revision = with_tables(base, dict(verdict.tables))
                self._revisions[revision.digest] = revision
            verdict = self._verdicts[key][0]
        decision = self.policy.decide(verdict)
        if decision is not Decision.SHOW and key not in self._policy_warned:
            self._policy_warned.add(key)
            if decision is Decision.REFUSE:
                log.warning("%s@%s is hidden and refused: not signed by a trusted key (%s)",
                            repo, revision.digest, verdict.reason)
            else:
                log.warning("audit: %s@%s is not signed by a trusted key (%s); shown "
                            "because of --audit", repo, revision.digest, verdict.reason)
        if decision is Decision.REFUSE:
            raise Refused(f"{repo}@{revision.digest}: not signed by a trusted key "
                           f"({verdict.reason})")
        return self._revisions.get(revision.digest, revision)

    async def _expand(self, folder: Node) -> Node:
        """Give a revision folder (and its subfolders) their fixed children."""
        if folder.children is not None:
            return folder
        if folder.kind is Kind.FOLDER:
            # Subfolders are built together with their revision.
            await self._expand(self.get(folder.revision))
            return folder
        revision = self._revisions.get(folder.digest)
        if revision is None:
            revision = await self.source.manifest(folder.repo, folder.digest)
            self._revisions[folder.digest] = revision
        if self.unpack is not None:
            revision = await self.unpack(folder.repo, revision)
            if folder.children is not None:  # built by a concurrent lookup meanwhile
                return folder
        self._build_revision(folder, revision)
        return folder

    def _build_revision(self, rev: Node, revision: Revision) -> None:
        rev.children = {}
        for f in revision.files:
            parent = rev
            parts = f.path.split("/")
            # A folder of a packed layer: its path is all folders (shown even if empty).
            folder = f.member is not None and f.member.folder
            for i, part in enumerate(parts if folder else parts[:-1]):
                path = "/".join(parts[: i + 1])
                sub = self._node(("path", rev.inode, path), Kind.FOLDER, part, parent.inode,
                                 repo=rev.repo, path=path, revision=rev.inode,
                                 mtime_ns=rev.mtime_ns)
                if sub.children is None:
                    sub.children = {}
                assert parent.children is not None
                parent.children[part] = sub.inode
                parent = sub
            if folder:
                continue
            leaf = self._node(("path", rev.inode, f.path), Kind.FILE, parts[-1], parent.inode,
                              repo=rev.repo, digest=f.digest, path=f.path, file=f,
                              revision=rev.inode, mtime_ns=rev.mtime_ns)
            assert parent.children is not None
            parent.children[parts[-1]] = leaf.inode


def _created_ns(revision: Revision) -> int | None:
    text = revision.created
    if not text:
        return None
    try:
        when = _dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        log.debug("%s: unreadable created annotation %r", revision.digest, text)
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    return int(when.timestamp() * 1_000_000_000)
