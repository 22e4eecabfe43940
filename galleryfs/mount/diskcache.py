"""An on-disk cache of blob chunks, shared by every mount, that never serves a damaged chunk.

Keyed by blob digest and size, so a file unchanged between revisions (or present in two
galleries) is fetched once, while a manifest that claims another size for the same
digest can neither read nor overwrite the entry. Layout under the cache root::

    FORMAT                                 the layout's version ("3"); any other: wiped
    blobs/sha256/<hex>                     a complete blob, verified against its digest
    blobs/sha256/<hex>.chunks              its chunk index (below)
    partial/sha256/<hex>-<size>.data       a sparse file holding the chunks fetched so far
    partial/sha256/<hex>-<size>.chunks     its chunk index

A chunk index is a header (magic, version, chunk size, blob size), the raw sha256 of
every chunk, in order (32 zero bytes: not there), then the CRC32C of every chunk. The
sha256 is the chunk's identity: it was checked against what the writer expected before
the chunk was written, and a reader is served the chunk only when that digest is the one
it expects (its revision's chunk table, or the table derived when the blob was verified
whole), a bytes compare. The CRC32C is the chunk's integrity on disk, as Mountpoint-S3
keeps one per cache block: every chunk read back is checked against it (over 20 GB/s
here; sha256 runs at 1.7 GB/s and cost G4 a fifth of its speed). It catches damage
(bit rot, torn and cut-short writes, a crash before the bytes reached the disk), not a
local attacker who can write the cache directory: such a one rewrites the CRC too
(README, Security and integrity). A chunk checked against a table of smaller chunks
than the mount's is kept under a digest of those piece digests (`Expect.identity`), so a
reader of that table finds it by a compare too; such an index is never lent as a table.
A
chunk that fails is dropped (a complete blob whole) and the reader fetches it again: a
flipped byte on disk costs a fetch, never a wrong byte. Nothing is synced: a crash can
leave an index entry whose bytes did not reach the disk, which the same check catches.

Only verified chunks are written (`write_chunk` takes the digests the chunk must have
and checks them itself, in the writing thread), and the last piece of a blob completes
it only if the whole hashes to its digest: then it is promoted to `blobs/` (a rename)
and its index, whole-blob verified, can stand in for a table (`table`). Chunks are
hashed in blob order as they become contiguous.

Chunk data is written with O_DIRECT where the file system takes it: on the VMs this
runs on, a buffered write of a fresh chunk costs several times the kernel CPU of a direct
one for the same wall time (page cache allocation and ext4 bookkeeping, on cores shared
with the reader and the network path). The cache file's bytes are not wanted in the page
cache anyway: the reader already has them in the FUSE file's page cache. Direct writes
need aligned memory and lengths, so a chunk is copied, 1 MiB at a time, into a reused
aligned buffer and the blob's last piece is padded to the block size; the file is cut to
the blob's size when it is promoted.

All methods are synchronous and thread-safe: callers run them in trio worker threads.
Eviction is least-recently-used by whole entry, down to `max_bytes`, never touching a
blob that is pinned (open in the mount).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import crc32c

from .. import digest as digests
from ..errors import DigestMismatch
from ..modelpack import CHUNK_DIGEST
from .blob import Expect, is_piece_identity

log = logging.getLogger(__name__)

_FORMAT = "3\n"
_MAGIC = b"GFSC"
_VERSION = 3
_HEADER = struct.Struct("<4sIQQ")  # magic, version, chunk size, blob size
_ABSENT = bytes(CHUNK_DIGEST)
_CRC = struct.Struct("<I")
# O_DIRECT alignment of offsets, lengths and memory: the page size covers every
# logical block size in use (512 or 4096).
_ALIGN = mmap.PAGESIZE
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_DIRECT_PIECE = 1 << 20  # bounds the aligned copy buffers
_HASH_AHEAD = 4  # out-of-order chunks kept in memory for the hasher (~ fetches in flight)
# A blob found not complete on disk is not looked up again for this long: a stream asks
# for every chunk it passes (a stat and a path built each time, on the trio thread),
# while another mount completing the same blob meanwhile only has to wait this long to
# be seen here. Its own completions are seen at once.
ABSENT_TTL = 1.0
ABSENT_MAX = 4096

Chunk = bytes | bytearray | memoryview
# An entry: (digest, size) of a partial blob, (digest, None) of a complete one.
Entry = tuple[str, int | None]


class ChunkRejected(DigestMismatch):
    """A chunk offered to the cache does not hash to what it must: not written."""


@dataclass
class _Partial:
    data_fd: int
    map_fd: int
    digests: bytearray  # the index's digests: CHUNK_DIGEST bytes per chunk
    crcs: bytearray  # ... and CRC32Cs, _CRC.size bytes per chunk
    bitmap: bytearray  # 1 where the index has a digest
    direct_fd: int | None = None  # the data file again, opened O_DIRECT
    direct_ok: bool = True
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    hashed: int = 0  # chunks fed to the hasher, in order
    ahead: dict[int, Chunk] = field(default_factory=dict)  # written, not yet hashed
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Chunk data is written outside `lock`, so disk I/O never holds it; closing waits
    # for those writes.
    writing: int = 0
    idle: threading.Condition = field(init=False)
    closed: bool = False

    def __post_init__(self) -> None:
        self.idle = threading.Condition(self.lock)

    def stored(self, index: int) -> bytes:
        return bytes(self.digests[index * CHUNK_DIGEST:(index + 1) * CHUNK_DIGEST])

    def crc(self, index: int) -> int:
        return _CRC.unpack_from(self.crcs, index * _CRC.size)[0]

    def wait_idle(self) -> None:
        """Under `lock`: until no chunk write is halfway."""
        while self.writing:
            self.idle.wait()

    def close(self) -> None:
        """Close the files; under `lock`, once no write is halfway through them."""
        self.closed = True
        self.wait_idle()
        for fd in (self.data_fd, self.map_fd, self.direct_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


@dataclass(frozen=True)
class _Complete:
    size: int
    digests: bytes  # its index's digests
    crcs: bytes  # ... and CRC32Cs


class DiskCache:
    def __init__(self, root: str | os.PathLike[str], max_bytes: int, chunk_size: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self.complete_dir = self.root / "blobs" / "sha256"
        self.partial_dir = self.root / "partial" / "sha256"
        self.complete_dir.mkdir(parents=True, exist_ok=True)
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._partials: dict[tuple[str, int], _Partial] = {}
        self._complete: dict[str, _Complete] = {}
        # digest -> when it was last found not complete on disk (see ABSENT_TTL).
        self._absent: dict[str, float] = {}
        self._pins: dict[str, int] = {}
        # entry -> bytes on disk, oldest use first.
        self._lru: OrderedDict[Entry, int] = OrderedDict()
        self.evictions = 0
        self.damaged = 0  # chunks read back that failed their check (dropped)
        # Off when the chunk size is not aligned, or once the file system refuses it.
        self.direct = bool(_O_DIRECT) and chunk_size % _ALIGN == 0
        self._buffers: list[mmap.mmap] = []  # aligned buffers for unaligned chunks
        self._check_format()
        self._scan()

    # ---- bookkeeping -------------------------------------------------------------

    def _check_format(self) -> None:
        """A cache of another layout (galleryfs before chunk indexes: a presence byte per
        chunk and stamps in `verified/`; indexes without CRCs, "2") is emptied rather
        than trusted."""
        marker = self.root / "FORMAT"
        try:
            if marker.read_text() == _FORMAT:
                return
        except OSError:
            pass
        old = self.root / "verified" / "sha256"
        for folder in (self.complete_dir, self.partial_dir, old):
            if folder.is_dir():
                for path in folder.iterdir():
                    if _ours(path.name):
                        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            old.rmdir()
            old.parent.rmdir()
        tmp = marker.with_name("FORMAT.tmp")
        tmp.write_text(_FORMAT)
        os.replace(tmp, marker)

    def _scan(self) -> None:
        found: list[tuple[float, Entry, int]] = []
        for path in self.complete_dir.iterdir():
            if digests.is_digest("sha256:" + path.name):
                st = path.stat()
                found.append((st.st_mtime, ("sha256:" + path.name, None), st.st_size))
            elif path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
        for path in self.partial_dir.glob("*.data"):
            hexpart, _, size = path.name[: -len(".data")].partition("-")
            if digests.is_digest("sha256:" + hexpart) and size.isdigit():
                st = path.stat()
                found.append((st.st_mtime, ("sha256:" + hexpart, int(size)),
                               st.st_blocks * 512))
        for _, entry, size in sorted(found):
            self._lru[entry] = size

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._lru.values())

    def _touch(self, entry: Entry, added: int = 0) -> None:
        with self._lock:
            self._lru[entry] = self._lru.pop(entry, 0) + added

    def pin(self, digest: str) -> None:
        with self._lock:
            self._pins[digest] = self._pins.get(digest, 0) + 1

    def unpin(self, digest: str) -> None:
        with self._lock:
            n = self._pins.get(digest, 0) - 1
            if n > 0:
                self._pins[digest] = n
            else:
                self._pins.pop(digest, None)

    @staticmethod
    def _hex(digest: str) -> str:
        algo, _, hexpart = digests.validate(digest).partition(":")
        if algo != "sha256":
            raise ValueError(f"only sha256 blobs are cached, not {digest}")
        return hexpart

    def _complete_paths(self, digest: str) -> tuple[Path, Path]:
        hexpart = self._hex(digest)
        return self.complete_dir / hexpart, self.complete_dir / f"{hexpart}.chunks"

    def _partial_paths(self, digest: str, size: int) -> tuple[Path, Path]:
        name = f"{self._hex(digest)}-{size}"
        return self.partial_dir / f"{name}.data", self.partial_dir / f"{name}.chunks"

    @staticmethod
    def cacheable(digest: str) -> bool:
        return digest.startswith("sha256:") and digests.is_digest(digest)

    def _nchunks(self, size: int) -> int:
        return -(-size // self.chunk_size)

    def _header(self, size: int) -> bytes:
        return _HEADER.pack(_MAGIC, _VERSION, self.chunk_size, size)

    def _index_body(self, raw: bytes, size: int) -> tuple[bytes, bytes] | None:
        """The digests and CRCs of an index file for a `size`-byte blob, or None if it
        is not one (another format or chunk size, or cut short)."""
        n = self._nchunks(size)
        if (len(raw) != _HEADER.size + n * (CHUNK_DIGEST + _CRC.size)
                or raw[:_HEADER.size] != self._header(size)):
            return None
        crcs_at = _HEADER.size + n * CHUNK_DIGEST
        return raw[_HEADER.size:crcs_at], raw[crcs_at:]

    def _crc_at(self, size: int, index: int) -> int:
        """Where chunk `index`'s CRC lies in the index file of a `size`-byte blob."""
        return _HEADER.size + self._nchunks(size) * CHUNK_DIGEST + index * _CRC.size

    # ---- complete blobs ----------------------------------------------------------

    def _complete_entry(self, digest: str, size: int) -> _Complete | None:
        """The complete blob of `size` bytes, or None. A complete file of another size is
        another claim's miss, left alone; one without a valid index is dropped."""
        with self._lock:
            known = self._complete.get(digest)
            absent = self._absent.get(digest)
        if known is not None:
            return known if known.size == size else None
        if absent is not None and time.monotonic() - absent < ABSENT_TTL:
            return None
        path, index = self._complete_paths(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            with self._lock:
                if len(self._absent) >= ABSENT_MAX:
                    self._absent.clear()
                self._absent[digest] = time.monotonic()
            return None
        if st.st_size != size:
            return None
        try:
            body = self._index_body(index.read_bytes(), size)
        except OSError:
            body = None
        if body is None or _ABSENT in _digests_of(body[0]):
            log.info("%s: cached without a chunk index for %d-byte chunks, dropped",
                     digest, self.chunk_size)
            self._drop((digest, None))
            return None
        entry = _Complete(size, *body)
        with self._lock:
            self._complete[digest] = entry
        return entry

    def table(self, digest: str, size: int) -> bytes | None:
        """The chunk digests of a complete blob (whole-blob verified when it was
        promoted), or None when the cache has no complete blob of that size."""
        entry = self._complete_entry(digest, size)
        if entry is None:
            return None
        if not any(is_piece_identity(d) for d in _digests_of(entry.digests)):
            return entry.digests
        # Chunks kept under their piece digests' identity: the blob was verified whole
        # when it was promoted, so each chunk's sha256 is hashed from the file here
        # (local reads) rather than the blob streamed again from the registry.
        path = self._complete_paths(digest)[0]
        out = bytearray()
        with open(path, "rb", buffering=0) as f:
            for index in range(self._nchunks(size)):
                chunk = f.read(min(self.chunk_size, size - index * self.chunk_size))
                crc = _CRC.unpack_from(entry.crcs, index * _CRC.size)[0]
                if crc32c.crc32c(chunk) != crc:
                    self.damaged += 1
                    log.warning("disk cache: chunk %d of %s is damaged: dropped", index,
                                digest)
                    self._drop((digest, None))
                    return None
                out += hashlib.sha256(chunk).digest()
        return bytes(out)

    def read_chunk(self, digest: str, size: int, index: int, expect: Expect | None = None
                   ) -> bytes | None:
        """Chunk `index` of the blob if it is on disk, intact (its CRC32C) and the bytes
        `expect` names (the digest its index keeps, compared; hashed only when `expect`
        has several digests per chunk), else None."""
        start = index * self.chunk_size
        length = min(self.chunk_size, size - start)
        if length <= 0:
            return None
        complete = self._complete_entry(digest, size)
        part: _Partial | None = None
        if complete is not None:
            entry: Entry = (digest, None)
            stored = complete.digests[index * CHUNK_DIGEST:(index + 1) * CHUNK_DIGEST]
            crc = _CRC.unpack_from(complete.crcs, index * _CRC.size)[0]
            try:
                fd = os.open(self._complete_paths(digest)[0], os.O_RDONLY)
            except FileNotFoundError:  # evicted by another process meanwhile
                with self._lock:
                    self._complete.pop(digest, None)
                return None
            try:
                data = os.pread(fd, length, start)
            finally:
                os.close(fd)
        else:
            part = self._partial(digest, size, create=False)
            if part is None or not part.bitmap[index]:
                return None
            entry = (digest, size)
            stored = part.stored(index)
            crc = part.crc(index)
            data = os.pread(part.data_fd, length, start)
        if len(data) == length and crc32c.crc32c(data) == crc:
            # The bytes written, whose sha256 was checked before they were: served if
            # they are the ones this reader's table names.
            # A reader of the table it was checked against finds it by a compare. A
            # reader of another table hashes it against its own where the stored value
            # cannot be compared with it (a finer table's identity, or a finer reader):
            # one file gets different tables in different revisions (the table's piece
            # size depends on the revision's size).
            if expect is None or expect.identity == stored or (
                    (expect.whole is None or is_piece_identity(stored))
                    and expect.matches(data)):
                self._touch(entry)
                return data
            # Not the bytes this reader's table names. In a partial blob: dropped (its
            # chunks are verified one by one, against whichever table asked); a complete
            # one was verified whole, so its claim is wrong, not the disk.
            if part is not None:
                self._forget_chunk(part, index)
            return None
        self.damaged += 1
        log.warning("disk cache: chunk %d of %s is damaged: dropped, fetching it again",
                    index, digest)
        if part is not None:
            self._forget_chunk(part, index)
        else:
            self._drop(entry)
        return None

    def _forget_chunk(self, part: _Partial, index: int) -> None:
        with part.lock:
            if part.closed:
                return
            os.pwrite(part.map_fd, _ABSENT, _HEADER.size + index * CHUNK_DIGEST)
            part.digests[index * CHUNK_DIGEST:(index + 1) * CHUNK_DIGEST] = _ABSENT
            part.bitmap[index] = 0

    def has_chunk(self, digest: str, size: int, index: int) -> bool:
        # Called for every read of a stream: the blob being filled is answered from
        # its index in memory, without touching the file system.
        with self._lock:
            part = self._partials.get((digest, size))
            if part is not None:
                return bool(part.bitmap[index])
        try:
            return self._complete_entry(digest, size) is not None
        except OSError:
            return False

    # ---- partial blobs -----------------------------------------------------------

    def _partial(self, digest: str, size: int, *, create: bool) -> _Partial | None:
        with self._lock:
            part = self._partials.get((digest, size))
            if part is not None:
                return part
            data_path, map_path = self._partial_paths(digest, size)
            if not create and not map_path.exists():
                return None
            n = self._nchunks(size)
            body = None
            try:
                body = self._index_body(map_path.read_bytes(), size)
                if body is None:
                    log.info("%s: cache record of another format or chunk size, dropped",
                             digest)
                    self._unlink_partial(digest, size)
            except OSError:
                pass
            found = bytearray(body[0]) if body is not None else bytearray(n * CHUNK_DIGEST)
            crcs = bytearray(body[1]) if body is not None else bytearray(n * _CRC.size)
            bitmap = bytearray(d != _ABSENT for d in _digests_of(found))
            if not create and not any(bitmap):
                return None
            data_fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o600)
            map_fd = os.open(map_path, os.O_RDWR | os.O_CREAT, 0o600)
            if not any(bitmap):
                os.pwrite(map_fd, self._header(size) + bytes(found) + bytes(crcs), 0)
            part = _Partial(data_fd, map_fd, found, crcs, bitmap,
                            self._open_direct(data_path))
            self._partials[(digest, size)] = part
            self._lru.setdefault((digest, size), 0)
            return part

    def _open_direct(self, path: Path) -> int | None:
        if not self.direct:
            return None
        try:
            return os.open(path, os.O_WRONLY | _O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.info("%s does not take O_DIRECT: buffered cache writes", self.root)
            self.direct = False
            return None

    def _take_buffer(self) -> mmap.mmap:
        with self._lock:
            if self._buffers:
                return self._buffers.pop()
        return mmap.mmap(-1, _DIRECT_PIECE)  # page-aligned memory

    def _write_data(self, part: _Partial, data: Chunk, offset: int) -> None:
        if part.direct_fd is None or not part.direct_ok:
            os.pwrite(part.data_fd, data, offset)
            return
        # Copied piece by piece into a reused aligned buffer (fresh pages cost a fault
        # each: fetching into page-aligned memory instead was slower); the last piece is
        # zero-padded to the block size.
        buf = self._take_buffer()
        src = memoryview(data)
        try:
            with memoryview(buf) as view:
                for pos in range(0, len(data), _DIRECT_PIECE):
                    n = min(_DIRECT_PIECE, len(data) - pos)
                    padded = -(-n // _ALIGN) * _ALIGN
                    view[:n] = src[pos:pos + n]
                    view[n:padded] = bytes(padded - n)
                    os.pwrite(part.direct_fd, view[:padded], offset + pos)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.info("%s refused an O_DIRECT write: buffered cache writes", self.root)
            self.direct = False
            part.direct_ok = False  # the fd stays open: another thread may use it
            os.pwrite(part.data_fd, data, offset)
        finally:
            src.release()
            with self._lock:
                # As many as there are concurrent writers (a few).
                self._buffers.append(buf)

    def write_chunk(self, digest: str, size: int, index: int, data: Chunk,
                    expect: Expect | None = None, *, checked: bool = False) -> bool:
        """Store a chunk fetched from the network. True when the blob became complete.

        `expect`: the digests the chunk must hash to; it is hashed here and refused
        (ChunkRejected, nothing written) when it does not, or when its length is not the
        chunk's. `checked`: the caller verified these very bytes against `expect`
        already (held in memory since), so a one-digest `expect` is the index entry as is.
        None (`--verify end` without a table): stored as it is, and the whole-blob hash
        at completion is the only check. Raises DigestMismatch (after dropping the
        entry) when the last chunk arrives and the whole does not hash to the digest.
        """
        start = index * self.chunk_size
        length = min(self.chunk_size, size - start)
        if not 0 <= index < self._nchunks(size) or len(data) != length:
            raise ChunkRejected(f"{digest}: chunk {index} of {len(data)} bytes offered for a "
                                f"{length}-byte chunk")
        if expect is None:
            own = hashlib.sha256(data).digest()
        else:
            # Bytes the caller checked against `expect` are not hashed again; a finer
            # table's chunk is kept under the identity of its piece digests (Expect).
            if not checked and not (hashlib.sha256(data).digest() == expect.whole
                                    if expect.whole is not None else expect.matches(data)):
                raise ChunkRejected(f"{digest}: chunk {index} does not match its table")
            own = expect.identity
        crc = _CRC.pack(crc32c.crc32c(data))
        if self._complete_entry(digest, size) is not None:
            return False
        part = self._partial(digest, size, create=True)
        assert part is not None
        with part.lock:
            if part.closed or part.bitmap[index]:
                return False
            part.writing += 1
        try:
            # No fdatasync: see the module docstring for why a crash here is safe.
            self._write_data(part, data, start)
        finally:
            with part.lock:
                part.writing -= 1
                part.idle.notify_all()
        with part.lock:
            if part.closed or part.bitmap[index]:
                return False
            # The data before its index entry, the CRC before the digest that marks the
            # chunk there: an entry always names bytes written.
            os.pwrite(part.map_fd, crc, self._crc_at(size, index))
            os.pwrite(part.map_fd, own, _HEADER.size + index * CHUNK_DIGEST)
            part.crcs[index * _CRC.size:(index + 1) * _CRC.size] = crc
            part.digests[index * CHUNK_DIGEST:(index + 1) * CHUNK_DIGEST] = own
            part.bitmap[index] = 1
            self._touch((digest, size), len(data))
            # Hash what is contiguous from the start. Chunks ahead of that are kept in
            # memory until their turn (a few: the fetches in flight finish out of
            # order); reading them back would hit the disk, as they bypass its cache.
            n = len(part.bitmap)
            if index > part.hashed and len(part.ahead) < _HASH_AHEAD:
                part.ahead[index] = data
            while part.hashed < n and part.bitmap[part.hashed]:
                i = part.hashed
                if i == index:
                    piece = data
                elif i in part.ahead:
                    piece = part.ahead.pop(i)
                else:  # written by an earlier process, or not kept
                    at = i * self.chunk_size
                    piece = os.pread(part.data_fd, min(self.chunk_size, size - at), at)
                part.hasher.update(piece)
                part.hashed += 1
            done = part.hashed == n
            got = "sha256:" + part.hasher.hexdigest() if done else ""
        if not done:
            if self.used_bytes > self.max_bytes:
                self.evict(keep=digest)
            return False
        if got != digest:
            self._drop((digest, size))
            raise DigestMismatch(f"{digest}: fetched content hashes to {got}: dropped")
        self._promote(digest, size)
        self.evict()
        return True

    def _promote(self, digest: str, size: int) -> None:
        data_path, map_path = self._partial_paths(digest, size)
        complete, index = self._complete_paths(digest)
        with self._lock:
            part = self._partials.pop((digest, size), None)
        if part is None:  # dropped meanwhile (evicted)
            return
        # Under the blob's lock and outside the cache lock (a writer holds the first and
        # then takes the second); a duplicate write may still be going. No fsync: a
        # chunk that did not reach the disk fails its check when it is read back.
        with part.lock:
            part.wait_idle()
            # A padded last chunk (direct writes) overshoots the blob's size.
            os.ftruncate(part.data_fd, size)
            part.close()
        with self._lock:
            # The index first: a complete blob without one is dropped as foreign.
            os.replace(map_path, index)
            os.replace(data_path, complete)
            self._complete[digest] = _Complete(size, bytes(part.digests), bytes(part.crcs))
            self._absent.pop(digest, None)
            self._lru[(digest, None)] = self._lru.pop((digest, size), 0)

    def _unlink_partial(self, digest: str, size: int) -> None:
        data_path, map_path = self._partial_paths(digest, size)
        map_path.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)

    def _drop(self, entry: Entry) -> None:
        digest, size = entry
        part = None
        with self._lock:
            self._lru.pop(entry, None)
            if size is None:
                self._complete.pop(digest, None)
                for path in self._complete_paths(digest):
                    path.unlink(missing_ok=True)
            else:
                part = self._partials.pop((digest, size), None)
                self._unlink_partial(digest, size)
        if part is not None:
            # Outside the cache lock (a writer holds part.lock and then takes it).
            with part.lock:
                part.close()

    def drop(self, digest: str) -> None:
        """Everything the cache holds of the blob, whatever its size."""
        with self._lock:
            entries = [e for e in self._lru if e[0] == digest] + [(digest, None)]
        for entry in dict.fromkeys(entries):
            self._drop(entry)

    def evict(self, keep: str | None = None) -> None:
        victims = []
        with self._lock:
            total = sum(self._lru.values())
            for entry in list(self._lru):
                if total <= self.max_bytes:
                    break
                if entry[0] in self._pins or entry[0] == keep:
                    continue
                total -= self._lru[entry]
                victims.append(entry)
        # Dropped outside the cache lock: dropping waits for a writer of the blob, and a
        # writer takes the cache lock.
        for entry in victims:
            log.debug("evicting %s from the disk cache", entry[0])
            self._drop(entry)
            self.evictions += 1

    def close(self) -> None:
        with self._lock:
            parts = list(self._partials.values())
            self._partials.clear()
        for part in parts:
            with part.lock:
                part.close()


def _digests_of(body: bytes | bytearray) -> list[bytes]:
    return [bytes(body[i:i + CHUNK_DIGEST]) for i in range(0, len(body), CHUNK_DIGEST)]


def _ours(name: str) -> bool:
    """A file name the cache writes (any layout so far)."""
    hexpart = name.split(".", 1)[0].split("-", 1)[0]
    return len(hexpart) == 64 and all(c in "0123456789abcdef" for c in hexpart)
