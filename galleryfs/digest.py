"""Content digests: validation before use, hashing while streaming, hashing a file."""

from __future__ import annotations

import hashlib
import os
import re

from .errors import DigestMismatch, InvalidReference

# Only sha256 and sha512 are registered in the OCI image spec; anything else is refused
# before it reaches a URL or a cache path, so a hostile manifest cannot steer either.
_HEX_LEN = {"sha256": 64, "sha512": 128}
# fullmatch: `$` would also match before a trailing newline (63 hex digits and a "\n").
_HEX = re.compile(r"[a-f0-9]+")
# Few reads per file, each into the same buffer; hashlib releases the GIL while it hashes
# a piece, so files hashed in threads hash in parallel.
_FILE_PIECE = 4 << 20


def validate(digest: str) -> str:
    algo, sep, hexpart = digest.partition(":")
    if not sep or algo not in _HEX_LEN:
        raise InvalidReference(f"unsupported digest {digest!r}: expected sha256:<64 hex>")
    if len(hexpart) != _HEX_LEN[algo] or not _HEX.fullmatch(hexpart):
        raise InvalidReference(f"malformed digest {digest!r}")
    return digest


def is_digest(text: str) -> bool:
    try:
        validate(text)
    except InvalidReference:
        return False
    return True


def of_bytes(data: bytes, algo: str = "sha256") -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


class Verifier:
    """Hashes a stream as it passes and checks it against the expected digest."""

    def __init__(self, digest: str, size: int | None = None) -> None:
        self.digest = validate(digest)
        self.algo = digest.split(":", 1)[0]
        self.size = size
        self._hash = hashlib.new(self.algo)
        self.count = 0

    def update(self, chunk: bytes) -> None:
        self.count += len(chunk)
        if self.size is not None and self.count > self.size:
            raise DigestMismatch(
                f"{self.digest}: more than the expected {self.size} bytes received"
            )
        self._hash.update(chunk)

    def check(self) -> None:
        if self.size is not None and self.count != self.size:
            raise DigestMismatch(
                f"{self.digest}: got {self.count} bytes, expected {self.size}"
            )
        got = f"{self.algo}:{self._hash.hexdigest()}"
        if got != self.digest:
            raise DigestMismatch(f"content does not match its digest {self.digest} (got {got})")


def of_file(path: str | os.PathLike[str], size: int | None = None) -> str:
    """The sha256 digest of a file's bytes. With `size`, a file of any other length
    raises DigestMismatch: it changed since it was listed, and a digest of bytes the
    caller did not mean must never name a blob of `size` bytes."""
    h = hashlib.sha256()
    got = 0
    buf = bytearray(_FILE_PIECE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:  # readinto one buffer: no copy per piece
        while n := f.readinto(buf):
            h.update(view[:n])
            got += n
            if size is not None and got > size:
                break  # wrong already: a growing file is not read to its end
    if size is not None and got != size:
        raise DigestMismatch(
            f"{os.fspath(path)}: not the {size} bytes it was listed with (it changed while read)")
    return f"sha256:{h.hexdigest()}"


def chunk_digests(data: bytes | bytearray | memoryview, chunk_size: int) -> bytes:
    """The raw sha256 digests of `data` cut into `chunk_size` pieces, concatenated."""
    view = memoryview(data)
    return b"".join(hashlib.sha256(view[i:i + chunk_size]).digest()
                    for i in range(0, len(view), chunk_size))


def of_file_chunks(path: str | os.PathLike[str], size: int, chunk_size: int
                   ) -> tuple[str, bytes]:
    """One pass over a file: its sha256 digest and the raw sha256 digests of its
    `chunk_size` pieces, concatenated (a chunk table's body). A file of any length but
    `size` raises DigestMismatch, as in `of_file`."""
    if chunk_size <= 0 or chunk_size % _FILE_PIECE and _FILE_PIECE % chunk_size:
        raise ValueError(f"chunk size {chunk_size} does not tile {_FILE_PIECE}-byte reads")
    whole = hashlib.sha256()
    chunk = hashlib.sha256()
    in_chunk = 0
    tables: list[bytes] = []
    got = 0
    piece = min(_FILE_PIECE, chunk_size)
    buf = bytearray(piece)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        # Never past a chunk's end: a short read must not move the boundaries.
        while n := f.readinto(view[:min(piece, chunk_size - in_chunk)]):
            whole.update(view[:n])
            chunk.update(view[:n])
            in_chunk += n
            got += n
            if in_chunk == chunk_size:
                tables.append(chunk.digest())
                chunk = hashlib.sha256()
                in_chunk = 0
            if got > size:
                break
    if in_chunk:
        tables.append(chunk.digest())
    if got != size:
        raise DigestMismatch(
            f"{os.fspath(path)}: not the {size} bytes it was listed with (it changed while read)")
    return f"sha256:{whole.hexdigest()}", b"".join(tables)
