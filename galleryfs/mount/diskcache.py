"""An on-disk, content-addressed cache of blob chunks, shared by every mount.

Keyed by blob digest only, so a file unchanged between revisions (or present in two
galleries) is fetched once. Layout under the cache root::

    blobs/sha256/<hex>               a complete blob, verified against its digest
    partial/sha256/<hex>.data        a sparse file holding the chunks fetched so far
    partial/sha256/<hex>.chunks      16-byte header + one byte per chunk (1 = present)
    verified/sha256/<hex>            stamp of a verified complete blob: size, mtime, inode

A chunk's data is written before its byte in the `.chunks` record, but neither is
synced: durability is not worth an fdatasync per chunk (it capped cold reads) in a cache
whose every byte is checked against the digest before the blob is trusted. A crash can
at worst leave a chunk recorded as present whose bytes did not reach the disk. Such a
chunk of a partial blob may be served unverified, exactly like any partial chunk (they
cannot be verified one by one yet; a per-chunk index bound to the revision digest would
plug in at `read_chunk`/`write_chunk`), and when the blob completes the whole-blob hash
fails, the entry is dropped (DigestMismatch) and its chunks are fetched again. The header
carries the chunk size: a record written with another chunk size is dropped rather than
misread.

Chunks are hashed in blob order as they become contiguous; when the last one arrives
the digest is compared and the blob is promoted to `blobs/` (fsync, then a rename) or
dropped. Promotion writes a stamp (size, mtime, inode of the verified file). A complete
blob whose stamp matches is served without hashing it again: re-hashing on first open
was a stall of seconds per GB before the first byte of every remount. Anything that
rewrites or replaces the file through the file system changes its stamp; such a blob
(or one without a stamp) is re-hashed before it is served, and a damaged one turns into
DigestMismatch (and is removed), never wrong bytes. Silent media corruption under an
unchanged stamp is left to the disk, as for any local file.

Chunk data is written with O_DIRECT where the file system takes it: on the VMs this
runs on, a buffered write of a fresh chunk costs several times the kernel CPU of a direct
one for the same wall time (page cache allocation and ext4 bookkeeping, on cores shared
with the reader and the network path). The cache file's bytes are not wanted in the page
cache anyway: the reader already has them in the FUSE file's page cache. Direct writes
need aligned memory and lengths, so a chunk is copied, 1 MiB at a time, into a reused
aligned buffer and the blob's last piece is padded to the block size; the file is cut to
the blob's size when it is promoted.

All methods are synchronous and thread-safe: callers run them in trio worker threads.
Eviction is least-recently-used by whole blob, down to `max_bytes`, never touching a
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
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .. import digest as digests
from ..errors import DigestMismatch

log = logging.getLogger(__name__)

_MAGIC = b"GFSC"
_VERSION = 1
_HEADER = struct.Struct("<4sIQ")  # magic, version, chunk size
# O_DIRECT alignment of offsets, lengths and memory: the page size covers every
# logical block size in use (512 or 4096).
_ALIGN = mmap.PAGESIZE
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_DIRECT_PIECE = 1 << 20  # bounds the aligned copy buffers
_HASH_AHEAD = 4  # out-of-order chunks kept in memory for the hasher (~ fetches in flight)

Chunk = bytes | bytearray | memoryview


@dataclass
class _Partial:
    data_fd: int
    map_fd: int
    bitmap: bytearray
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


class DiskCache:
    def __init__(self, root: str | os.PathLike[str], max_bytes: int, chunk_size: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.chunk_size = chunk_size
        self.complete_dir = self.root / "blobs" / "sha256"
        self.partial_dir = self.root / "partial" / "sha256"
        self.stamp_dir = self.root / "verified" / "sha256"
        self.complete_dir.mkdir(parents=True, exist_ok=True)
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self.stamp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._partials: dict[str, _Partial] = {}
        self._verified: set[str] = set()
        self._pins: dict[str, int] = {}
        # digest -> bytes on disk, oldest use first.
        self._lru: OrderedDict[str, int] = OrderedDict()
        self.evictions = 0
        # Off when the chunk size is not aligned, or once the file system refuses it.
        self.direct = bool(_O_DIRECT) and chunk_size % _ALIGN == 0
        self._buffers: list[mmap.mmap] = []  # aligned buffers for unaligned chunks
        self._scan()

    # ---- bookkeeping -------------------------------------------------------------

    def _scan(self) -> None:
        found: list[tuple[float, str, int]] = []
        for path in self.complete_dir.iterdir():
            if digests.is_digest("sha256:" + path.name):
                st = path.stat()
                found.append((st.st_mtime, path.name, st.st_size))
            elif path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
        for path in self.partial_dir.glob("*.data"):
            hexpart = path.name[: -len(".data")]
            if digests.is_digest("sha256:" + hexpart):
                st = path.stat()
                found.append((st.st_mtime, hexpart, st.st_blocks * 512))
        for _, hexpart, size in sorted(found):
            self._lru["sha256:" + hexpart] = self._lru.get("sha256:" + hexpart, 0) + size

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._lru.values())

    def _touch(self, digest: str, added: int = 0) -> None:
        with self._lock:
            self._lru[digest] = self._lru.pop(digest, 0) + added

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

    def _paths(self, digest: str) -> tuple[Path, Path, Path]:
        algo, _, hexpart = digests.validate(digest).partition(":")
        if algo != "sha256":
            raise ValueError(f"only sha256 blobs are cached, not {digest}")
        return (self.complete_dir / hexpart, self.partial_dir / f"{hexpart}.data",
                self.partial_dir / f"{hexpart}.chunks")

    @staticmethod
    def cacheable(digest: str) -> bool:
        return digest.startswith("sha256:") and digests.is_digest(digest)

    # ---- complete blobs ----------------------------------------------------------

    def _stamp_path(self, digest: str) -> Path:
        return self.stamp_dir / digest.partition(":")[2]

    @staticmethod
    def _stamp_of(st: os.stat_result) -> str:
        return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}\n"

    def _stamped(self, digest: str, st: os.stat_result) -> bool:
        """True when the file is the one verified at promotion (its stamp matches)."""
        try:
            return self._stamp_path(digest).read_text() == self._stamp_of(st)
        except (OSError, ValueError):
            return False

    def _write_stamp(self, digest: str, path: Path) -> None:
        stamp = self._stamp_path(digest)
        tmp = stamp.with_name(stamp.name + ".tmp")
        try:
            tmp.write_text(self._stamp_of(path.stat()))
            os.replace(tmp, stamp)
        except OSError as exc:  # the blob is then re-hashed by the next process
            log.debug("cannot stamp %s: %s", digest, exc)

    def _complete_path(self, digest: str, size: int) -> Path | None:
        """The verified complete file, or None; DigestMismatch if it is damaged."""
        complete, _, _ = self._paths(digest)
        try:
            st = complete.stat()
        except FileNotFoundError:
            return None
        if digest in self._verified:
            return complete
        if st.st_size == size and self._stamped(digest, st):
            self._verified.add(digest)
            return complete
        if st.st_size != size:
            self.drop(digest)
            raise DigestMismatch(
                f"cached {digest} has {st.st_size} bytes, expected {size}: dropped")
        try:
            intact = digests.of_file(complete, size) == digest
        except DigestMismatch:  # it changed size under us
            intact = False
        if not intact:
            self.drop(digest)
            raise DigestMismatch(f"cached {digest} does not match its digest: dropped")
        self._verified.add(digest)
        self._write_stamp(digest, complete)
        return complete

    def read_chunk(self, digest: str, size: int, index: int) -> bytes | None:
        """Chunk `index` of the blob if it is on disk, else None."""
        start = index * self.chunk_size
        length = min(self.chunk_size, size - start)
        complete = self._complete_path(digest, size)
        if complete is not None:
            self._touch(digest)
            fd = os.open(complete, os.O_RDONLY)
            try:
                return os.pread(fd, length, start)
            finally:
                os.close(fd)
        part = self._partial(digest, size, create=False)
        if part is None or not part.bitmap[index]:
            return None
        data = os.pread(part.data_fd, length, start)
        if len(data) != length:
            return None
        self._touch(digest)
        return data

    def read_range(self, digest: str, size: int, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of the blob if every chunk they touch is on disk, else None."""
        complete = self._complete_path(digest, size)
        if complete is not None:
            path_or_fd: Path | int = complete
        else:
            part = self._partial(digest, size, create=False)
            first, last = start // self.chunk_size, (end - 1) // self.chunk_size
            if part is None or not all(part.bitmap[first:last + 1]):
                return None
            path_or_fd = part.data_fd
        self._touch(digest)
        if isinstance(path_or_fd, int):
            data = os.pread(path_or_fd, end - start, start)
        else:
            fd = os.open(path_or_fd, os.O_RDONLY)
            try:
                data = os.pread(fd, end - start, start)
            finally:
                os.close(fd)
        return data if len(data) == end - start else None

    def has_chunk(self, digest: str, size: int, index: int) -> bool:
        # Called for every read of a stream: the blob being filled is answered from
        # its bitmap in memory, without touching the file system.
        with self._lock:
            part = self._partials.get(digest)
            if part is not None:
                return bool(part.bitmap[index])
            if digest in self._verified:
                return True
        complete, _, _ = self._paths(digest)
        # Trusted without hashing only by a matching stamp (a stat and a tiny read).
        try:
            st = complete.stat()
        except OSError:
            return False
        if st.st_size == size and self._stamped(digest, st):
            with self._lock:
                self._verified.add(digest)
            return True
        return False

    # ---- partial blobs -----------------------------------------------------------

    def _nchunks(self, size: int) -> int:
        return -(-size // self.chunk_size)

    def _partial(self, digest: str, size: int, *, create: bool) -> _Partial | None:
        with self._lock:
            part = self._partials.get(digest)
            if part is not None:
                return part
            _, data_path, map_path = self._paths(digest)
            if not create and not map_path.exists():
                return None
            n = self._nchunks(size)
            bitmap = bytearray(n)
            try:
                raw = map_path.read_bytes()
                magic, version, chunk_size = _HEADER.unpack_from(raw)
                if (magic, version, chunk_size) == (_MAGIC, _VERSION, self.chunk_size):
                    got = raw[_HEADER.size:_HEADER.size + n]
                    bitmap[: len(got)] = got
                else:
                    log.info("%s: cache record of another format or chunk size, dropped",
                             digest)
                    self._unlink_partial(digest)
            except (OSError, struct.error):
                pass
            if not create and not any(bitmap):
                return None
            data_fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o600)
            map_fd = os.open(map_path, os.O_RDWR | os.O_CREAT, 0o600)
            if not any(bitmap):
                os.pwrite(map_fd, _HEADER.pack(_MAGIC, _VERSION, self.chunk_size) + bytes(n), 0)
            part = _Partial(data_fd, map_fd, bitmap, self._open_direct(data_path))
            self._partials[digest] = part
            self._lru.setdefault(digest, 0)
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

    def write_chunk(self, digest: str, size: int, index: int, data: Chunk) -> bool:
        """Store a chunk fetched from the network. True when the blob became complete.

        Raises DigestMismatch (after dropping the entry) when the last chunk arrives and
        the whole does not hash to the digest.
        """
        complete, _, _ = self._paths(digest)
        if complete.exists():
            return False
        part = self._partial(digest, size, create=True)
        assert part is not None
        with part.lock:
            if part.closed or part.bitmap[index]:
                return False
            part.writing += 1
        try:
            # No fdatasync: see the module docstring for why a crash here is safe.
            self._write_data(part, data, index * self.chunk_size)
        finally:
            with part.lock:
                part.writing -= 1
                part.idle.notify_all()
        with part.lock:
            if part.closed or part.bitmap[index]:
                return False
            os.pwrite(part.map_fd, b"\x01", _HEADER.size + index)
            part.bitmap[index] = 1
            self._touch(digest, len(data))
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
                    start = i * self.chunk_size
                    piece = os.pread(part.data_fd, min(self.chunk_size, size - start), start)
                part.hasher.update(piece)
                part.hashed += 1
            done = part.hashed == n
            got = "sha256:" + part.hasher.hexdigest() if done else ""
        if not done:
            if self.used_bytes > self.max_bytes:
                self.evict(keep=digest)
            return False
        if got != digest:
            self.drop(digest)
            raise DigestMismatch(f"{digest}: fetched content hashes to {got}: dropped")
        self._promote(digest, size)
        self.evict()
        return True

    def _promote(self, digest: str, size: int) -> None:
        complete, data_path, map_path = self._paths(digest)
        with self._lock:
            part = self._partials.pop(digest, None)
        if part is not None:
            # Under the blob's lock and outside the cache lock (a writer holds the
            # first and then takes the second); a duplicate write may still be going.
            with part.lock:
                part.wait_idle()
                # A padded last chunk (direct writes) overshoots the blob's size.
                os.ftruncate(part.data_fd, size)
                # Once per blob: the stamp below makes later processes trust the file
                # without hashing it, so its bytes must be on disk before the stamp.
                os.fsync(part.data_fd)
                part.close()
        with self._lock:
            os.replace(data_path, complete)
            map_path.unlink(missing_ok=True)
            self._verified.add(digest)
            self._write_stamp(digest, complete)

    def _unlink_partial(self, digest: str) -> None:
        _, data_path, map_path = self._paths(digest)
        map_path.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)

    def drop(self, digest: str) -> None:
        complete, _, _ = self._paths(digest)
        with self._lock:
            part = self._partials.pop(digest, None)
            self._unlink_partial(digest)
            complete.unlink(missing_ok=True)
            self._stamp_path(digest).unlink(missing_ok=True)
            self._verified.discard(digest)
            self._lru.pop(digest, None)
        if part is not None:
            # Outside the cache lock (a writer holds part.lock and then takes it).
            with part.lock:
                part.close()

    def evict(self, keep: str | None = None) -> None:
        victims = []
        with self._lock:
            total = sum(self._lru.values())
            for digest in list(self._lru):
                if total <= self.max_bytes:
                    break
                if digest in self._pins or digest == keep:
                    continue
                total -= self._lru[digest]
                victims.append(digest)
        # Dropped outside the cache lock: drop() waits for a writer of the blob, and a
        # writer takes the cache lock.
        for digest in victims:
            log.debug("evicting %s from the disk cache", digest)
            self.drop(digest)
            self.evictions += 1

    def close(self) -> None:
        with self._lock:
            parts = list(self._partials.values())
            self._partials.clear()
        for part in parts:
            with part.lock:
                part.close()
