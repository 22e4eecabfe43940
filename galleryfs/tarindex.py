"""The members of a packed (tar) layer: listed from its headers, placed in the revision.

Shared by `pull` (a tar on disk) and the mount (a tar read by ranges through its chunk
reader), so both show the same files at the same paths and skip the same ones.

Listing (`walk`) reads only headers: a 512-byte header, then a jump over the member's
data to the next header. It is written without I/O (a generator that asks for byte
ranges), so the same code runs over a local file (`index`) or over Range requests
(`aindex`). Headers are parsed by `tarfile.TarInfo.frombuf` (checksum, ustar prefix,
base-256 sizes); pax `path`/`linkpath`/`size` records and GNU long names are applied
here. Listing stops at the end-of-archive block, at a header that does not parse, at
a member whose data would run past the layer's end, or at the caps below; what was
listed before stays.

Tar metadata is as hostile as a manifest (`place`): a member is shown only at a path
`modelpack.safe_path` accepts (no `..`, no absolute path, no backslash, no NUL, at most
4096 bytes) whose every name fits in 255 bytes, inside the folder the layer's path
annotation names (anywhere in the revision for a layer without one, as KitOps'), and
not at a path another file of the revision (or an earlier member) holds, nor inside
one. Links never become links: a hard link to an earlier file of the same layer, and
a symlink whose target (relative to its folder) is a file of the same layer, are
served as copies of that file's bytes; any other link, device, fifo or sparse file is
skipped. Every skip is a warning naming the layer and the member.
"""

from __future__ import annotations

import gzip
import logging
import posixpath
import tarfile
import zlib
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field, replace
from typing import BinaryIO, Protocol

import zstandard

from .modelpack import GZIP, ZSTD, Revision, RevisionFile, TarMember, safe_path

log = logging.getLogger(__name__)

BLOCK = tarfile.BLOCKSIZE
# Per layer: more members than any model folder holds; header bytes read (headers, pax
# records, long names) well above what 100,000 members need.
MAX_MEMBERS = 100_000
MAX_HEADER_BYTES = 64 << 20
# A pax record set or GNU long name: a path is at most 4096 bytes.
MAX_EXTENDED = 64 << 10
NAME_MAX = 255
# Warnings logged per layer: a hostile tar of 100,000 bad members is one screenful.
MAX_WARNINGS = 20

FILE = "file"
DIR = "dir"
HARDLINK = "hardlink"
SYMLINK = "symlink"

# (offset, length) asked; the bytes read answer (shorter only at the end).
Walk = Generator[tuple[int, int], bytes, "Listing"]


@dataclass(frozen=True)
class RawMember:
    """A member as its header tells it: nothing checked but its bounds."""

    name: str
    kind: str
    offset: int  # of its data
    size: int
    link: str = ""


@dataclass
class Listing:
    members: list[RawMember] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    header_bytes: int = 0


def _pax(data: bytes) -> dict[str, str]:
    """Records "LEN KEY=VALUE\\n"; ValueError on anything else."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:pos + 1] == b"\x00":  # padding
            break
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[pos:pos + length]
        if length <= space - pos or len(record) != length or not record.endswith(b"\n"):
            raise ValueError("bad pax record")
        key, sep, value = record[space - pos + 1:-1].partition(b"=")
        if not sep:
            raise ValueError("bad pax record")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _cstring(data: bytes) -> str:
    return data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def walk(size: int, *, max_members: int = MAX_MEMBERS,
         max_header_bytes: int = MAX_HEADER_BYTES) -> Walk:
    """List a `size`-byte tar's members, asking for (offset, length) ranges."""
    out = Listing()
    pos = 0
    long_name: str | None = None
    long_link: str | None = None
    pax: dict[str, str] = {}

    def stop(why: str) -> Listing:
        out.warnings.append(f"listing stopped at byte {pos}: {why}")
        return out

    while True:
        if pos + BLOCK > size:
            if pos < size or not out.members:
                return stop("no end-of-archive block")
            return out  # some writers leave out the end blocks
        if out.header_bytes + BLOCK > max_header_bytes:
            return stop(f"more than {max_header_bytes} bytes of headers")
        buf = yield pos, BLOCK
        out.header_bytes += BLOCK
        if len(buf) != BLOCK:
            return stop("short read")
        if buf == bytes(BLOCK):
            return out  # end of archive
        try:
            info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            return stop(f"unreadable header ({exc})")
        data = pos + BLOCK
        length = info.size
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                         tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            if length > MAX_EXTENDED or data + length > size:
                return stop(f"extended header of {length} bytes")
            if out.header_bytes + length > max_header_bytes:
                return stop(f"more than {max_header_bytes} bytes of headers")
            body = yield data, length
            out.header_bytes += length
            if len(body) != length:
                return stop("short read")
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = _cstring(body)
            elif info.type == tarfile.GNUTYPE_LONGLINK:
                long_link = _cstring(body)
            elif info.type != tarfile.XGLTYPE:  # global records: nothing we use
                try:
                    pax = _pax(body)
                except ValueError:
                    return stop("unreadable pax header")
            pos = data + -(-length // BLOCK) * BLOCK
            continue
        name = pax.get("path", long_name if long_name is not None else info.name)
        link = pax.get("linkpath", long_link if long_link is not None else info.linkname)
        if "size" in pax:
            raw = pax["size"]
            if not raw.isdigit() or len(raw) > 20:
                return stop(f"pax size {raw[:30]!r}")
            length = int(raw)
        if info.type == tarfile.GNUTYPE_SPARSE:
            # Its map may go on in extension blocks: where the next header is is unsure.
            return stop(f"{name[:200]!r} is a sparse file")
        # A pax (GNU 1.0) sparse file: its data is a map and pieces, not the file.
        sparse = any(key.startswith("GNU.sparse.") for key in pax)
        pax, long_name, long_link = {}, None, None
        if info.type in tarfile.REGULAR_TYPES and not sparse:
            kind = FILE
        elif info.type == tarfile.DIRTYPE:
            kind = DIR
        elif info.type == tarfile.LNKTYPE:
            kind = HARDLINK
        elif info.type == tarfile.SYMTYPE:
            kind = SYMLINK
        else:
            kind = ""
        if kind != FILE and info.type in tarfile.SUPPORTED_TYPES and not sparse:
            length = 0  # folders, links, devices, fifos carry no data (as tarfile reads them)
        if data + length > size:
            out.warnings.append(f"{name[:200]!r}: its {length} bytes at {data} run past the "
                                f"layer's end ({size} bytes): refused")
            return stop("member beyond the end of the layer")
        if kind:
            out.members.append(RawMember(name, kind, data, length if kind == FILE else 0, link))
        else:
            out.warnings.append(f"{name[:200]!r}: a device, fifo or sparse file "
                                f"(type {info.type!r}): skipped")
        if len(out.members) >= max_members:
            pos = data
            return stop(f"more than {max_members} members")
        pos = data + -(-length // BLOCK) * BLOCK


def index(read: Callable[[int, int], bytes], size: int, **caps: int) -> Listing:
    """`walk` over a synchronous reader (a local file)."""
    gen = walk(size, **caps)
    try:
        want = next(gen)
        while True:
            want = gen.send(read(*want))
    except StopIteration as done:
        return done.value


async def aindex(read: Callable[[int, int], Awaitable[bytes]], size: int,
                 **caps: int) -> Listing:
    """`walk` over an asynchronous reader (Range requests through the mount's reader)."""
    gen = walk(size, **caps)
    try:
        want = next(gen)
        while True:
            want = gen.send(await read(*want))
    except StopIteration as done:
        return done.value


# ---- placing members in the revision -------------------------------------------------


def _fits(path: str) -> bool:
    return all(len(part.encode("utf-8", "surrogateescape")) <= NAME_MAX
               for part in path.split("/"))


class Placement:
    """Which paths of a revision are taken, by files and by folders."""

    def __init__(self, files: list[RevisionFile]) -> None:
        self.files: set[str] = set()
        self.folders: set[str] = set()
        for f in files:
            self._file(f.path)

    def _parents(self, path: str) -> list[str]:
        parts = path.split("/")
        return ["/".join(parts[:i]) for i in range(1, len(parts))]

    def clash(self, path: str, folder: bool) -> str | None:
        if path in self.files:
            return "a file of the revision is there already"
        if not folder and path in self.folders:
            return "a folder of the revision is there already"
        if any(p in self.files for p in self._parents(path)):
            return "it lies inside a file of the revision"
        return None

    def _file(self, path: str) -> None:
        self.files.add(path)
        self.folders.update(self._parents(path))

    def add(self, path: str, folder: bool) -> None:
        if folder:
            self.folders.add(path)
            self.folders.update(self._parents(path))
        else:
            self._file(path)


def place(layer: RevisionFile, listing: Listing, taken: Placement
          ) -> tuple[list[RevisionFile], list[str]]:
    """The files (and folders) a packed layer adds to its revision, and why any member
    was left out."""
    out: list[RevisionFile] = []
    warnings = list(listing.warnings)
    by_name: dict[str, RevisionFile] = {}  # placed files of this layer, by path
    under = layer.under
    links: list[tuple[RawMember, str]] = []

    def member(path: str, offset: int, size: int, folder: bool = False) -> RevisionFile:
        return RevisionFile(path, layer.digest, size, layer.media_type, table=layer.table,
                            member=TarMember(offset, layer.size, layer.packing, folder))

    for m in listing.members:
        shown = m.name[:200]
        path = safe_path(m.name)
        if path is None:
            if m.kind == DIR and m.name.strip("./") == "":
                continue  # the archive's own root ("./"): nothing to show
            warnings.append(f"{shown!r}: unsafe path: skipped")
            continue
        if not _fits(path):
            warnings.append(f"{shown!r}: a name longer than {NAME_MAX} bytes: skipped")
            continue
        if under and path != under and not path.startswith(under + "/"):
            warnings.append(f"{shown!r}: outside the layer's folder {under!r}: skipped")
            continue
        if m.kind == SYMLINK:
            links.append((m, path))  # resolved once all files of the layer are known
            continue
        if m.kind == HARDLINK:
            target = by_name.get(safe_path(m.link) or "")
            if target is None:
                warnings.append(f"{shown!r}: hard link to {m.link[:200]!r}, not an earlier "
                                "file of the layer: skipped")
                continue
            m = RawMember(m.name, FILE, target.member.offset if target.member else 0,
                          target.size)
        folder = m.kind == DIR
        why = taken.clash(path, folder)
        if why is not None:
            if not (folder and path in taken.folders):
                warnings.append(f"{shown!r}: {why}: skipped")
            continue
        taken.add(path, folder)
        f = member(path, m.offset, m.size, folder)
        out.append(f)
        if not folder:
            by_name[path] = f
    for m, path in links:
        shown = m.name[:200]
        if m.link.startswith("/"):
            target_path = None
        else:
            joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), m.link))
            target_path = None if joined.startswith("../") or joined == ".." else joined
        if target_path is None:
            warnings.append(f"{shown!r}: symlink to {m.link[:200]!r} leaves the revision: "
                            "skipped")
            continue
        target = by_name.get(target_path)
        if target is None:
            warnings.append(f"{shown!r}: symlink to {m.link[:200]!r}, not a file of the "
                            "layer: skipped")
            continue
        why = taken.clash(path, False)
        if why is not None:
            warnings.append(f"{shown!r}: {why}: skipped")
            continue
        taken.add(path, False)
        out.append(replace(target, path=path))
    return out, warnings


def expand(revision: Revision, listings: dict[str, Listing | None]) -> Revision:
    """The revision with each packed layer whose listing is given replaced by its
    members (after the plain files, layers in manifest order); a packed layer without
    one (None, or absent) stays as it is: listed, not servable."""
    plain = [f for f in revision.files if not f.packing]
    taken = Placement(plain)
    files = list(plain)
    for f in revision.files:
        if not f.packing:
            continue
        listing = listings.get(f.digest)
        if listing is None:
            files.append(f)
            continue
        members, warnings = place(f, listing, taken)
        files.extend(members)
        for line in warnings[:MAX_WARNINGS]:
            log.warning("%s: packed layer %s: %s", revision.digest, f.digest, line)
        if len(warnings) > MAX_WARNINGS:
            log.warning("%s: packed layer %s: %d more members skipped", revision.digest,
                        f.digest, len(warnings) - MAX_WARNINGS)
    return replace(revision, files=tuple(files))


# ---- compressed layers -----------------------------------------------------------------

INFLATE_PIECE = 1 << 20


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def inflate(raw: Readable, packing: str, out: Callable[[bytes], object], limit: int) -> int:
    """Decompress a gzip (members one after another, as `gzip` allows) or zstd (frames one
    after another) stream, handing `out` at most INFLATE_PIECE bytes at a time; returns
    the size. ValueError when the stream is damaged or cut short, or grows beyond
    `limit` bytes (a small layer that would unpack to more than the cache holds)."""
    stream: BinaryIO
    if packing == GZIP:
        stream = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]
    elif packing == ZSTD:
        stream = zstandard.ZstdDecompressor().stream_reader(  # type: ignore[assignment]
            raw, read_across_frames=True)
    else:
        raise ValueError(f"no decompressor for {packing!r}")
    total = 0
    while True:
        try:
            piece = stream.read(INFLATE_PIECE)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            # (only the stream's errors: a full disk under `out` is not a damaged layer)
            raise ValueError(f"damaged {packing} stream: {exc or type(exc).__name__}"
                             ) from None
        if not piece:
            return total
        total += len(piece)
        if total > limit:
            raise ValueError(f"unpacks to more than {limit} bytes")
        out(piece)
