"""Zero wrong bytes reach a reader: tampering with every link between the registry's disk
and the kernel (README, Security and integrity).

The registry's storage, the manifests (a chunk table that lies, a size that lies) and
the disk cache are tampered with; reads go through real mounts of a real registry where
the kernel matters, through the ChunkReader where it does not. Revisions with chunk
tables are built here from the format (modelpack.build_manifest, ChunkTable) and pushed
with RegistryClient, so these tests do not depend on how `galleryfs push` writes them.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from galleryfs import modelpack
from galleryfs.errors import DigestMismatch
from galleryfs.modelpack import ChunkTable, Descriptor
from galleryfs.mount.blob import Expect
from galleryfs.mount.diskcache import ChunkRejected, DiskCache
from galleryfs.mount.reader import BlobRef, ChunkReader
from galleryfs.mount.verify import ChunkMismatch, Verifier
from galleryfs.registry.client import ClientOptions, RegistryClient
from galleryfs.registry.ranges import DirectRanges
from tests.mounting import fuse_available
from tests.registry_harness import Registry
from tests.test_chunks import CHUNK, Counting, _client, push_blob, tabled, write_behind
from tests.test_mount import start_foreground, stats, unmount, wait_for_mount

MiB = 1 << 20
SIZE = 12 * MiB + 4321  # four 4 MiB chunks at the mount's default chunk size
FLIPS = (1000, 9 * MiB + 5)  # in chunks 0 and 2


# ---- revisions built from the format ---------------------------------------------------------


def push_revision(registry: Registry, repo: str, tag: str, data: bytes, *,
                  table: ChunkTable | None = None, size: int | None = None,
                  digest: str | None = None) -> str:
    """Push a one-file revision (`weights.bin`) whose layer says what it is told: the
    blob's digest and size, and a chunk table (or none). The manifest digest."""
    blob_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    config = b"{}"
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    annotations = {modelpack.ANNOTATION_FILEPATH: "weights.bin"}
    if table is not None:
        annotations.update(table.to_annotations())
    layer = Descriptor(modelpack.layer_media_type("weight"), digest or blob_digest,
                       len(data) if size is None else size, annotations)
    body = modelpack.build_manifest(Descriptor(modelpack.CONFIG_TYPE, config_digest, 2), [layer])

    async def go() -> str:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            await client.upload_blob_bytes(repo, blob_digest, data)
            await client.upload_blob_bytes(repo, config_digest, config)
            return await client.put_manifest(repo, tag, body, modelpack.OCI_MANIFEST)

    return trio.run(go)


def blob_file(registry: Registry, data: bytes) -> Path:
    hexpart = hashlib.sha256(data).hexdigest()
    return registry.storage_dir / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


def flip(path: Path, offsets: tuple[int, ...]) -> None:
    """Flip a bit at each offset, in place: same size; the file's times are kept."""
    st = path.stat()
    with path.open("r+b") as f:
        for offset in offsets:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0x08]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@contextmanager
def mount(registry: Registry, tmp_path: Path, name: str, *extra: str) -> Iterator[Path]:
    """A fresh mount (its own page cache) of the registry; always unmounted."""
    if not fuse_available():
        pytest.skip("/dev/fuse unavailable")
    mnt, log = tmp_path / f"mnt-{name}", tmp_path / f"log-{name}"
    mnt.mkdir()
    proc = start_foreground(registry.host, mnt, tmp_path / "cache", log, *extra)
    try:
        wait_for_mount(proc, mnt, log)
        yield mnt
    finally:
        unmount(mnt, proc)
        mnt.rmdir()


def read_at(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def eio(call) -> bool:  # noqa: ANN001
    try:
        call()
    except OSError as exc:
        assert exc.errno == errno.EIO, exc
        return True
    return False


def flush(mnt: Path) -> None:
    os.getxattr(mnt, "user.galleryfs.flush")


def log_of(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"log-{name}").read_text()


# ---- through real mounts ---------------------------------------------------------------------


@pytest.mark.mount
@pytest.mark.parametrize("tabled_revision", [True, False], ids=["tabled", "untabled-strict"])
def test_a_byte_flipped_on_the_registry_never_reaches_a_reader(
        registry: Registry, tmp_path: Path, tabled_revision: bool) -> None:
    data = os.urandom(SIZE)
    table = ChunkTable.of_bytes(data, 4 * MiB) if tabled_revision else None
    revision = push_revision(registry, "trust/m", "v1", data, table=table)
    stored = blob_file(registry, data)
    flip(stored, FLIPS)
    path_of = lambda mnt: mnt / "trust" / "m" / "v1" / "weights.bin"  # noqa: E731
    for round_ in ("cold", "remount"):  # the second: nothing wrong was cached meanwhile
        with mount(registry, tmp_path, round_) as mnt:
            path = path_of(mnt)
            assert eio(lambda: path.open("rb").read(64 << 10))  # noqa: B023
            assert eio(lambda: read_at(path, 9 * MiB + 4096, 4096))  # noqa: B023
            assert eio(path.read_bytes)
            intact = lambda: read_at(path, 5 * MiB, 4096)  # noqa: B023, E731
            if tabled_revision:
                # Chunks that match their table are served.
                assert intact() == data[5 * MiB:5 * MiB + 4096]
            else:
                # Without a table nothing is served before the whole blob is verified.
                assert eio(intact)
            got = stats(mnt)
            assert got["verify_failures"] >= 2
            flush(mnt)
        # One warning per failure (the kernel may retry a failed read page by page),
        # naming the revision, the file, its digest and (with a table) the chunk.
        warnings = [line for line in log_of(tmp_path, round_).splitlines() if "WARNING" in line]
        assert len(warnings) == got["verify_failures"], warnings
        assert all(f"/trust/m/{revision}/weights.bin: " in w and "not served" in w
                   for w in warnings)
        if tabled_revision:
            assert any("chunk 0 of sha256:" in w for w in warnings)
            assert any("chunk 2 of sha256:" in w for w in warnings)
    # Repaired on the registry: the next read in the same mount returns the right bytes.
    with mount(registry, tmp_path, "repair") as mnt:
        assert eio(path_of(mnt).read_bytes)
        flip(stored, FLIPS)
        assert path_of(mnt).read_bytes() == data
        assert stats(mnt)["verify_failures"] >= 1


@pytest.mark.mount
def test_a_chunk_table_that_lies_is_eio(registry: Registry, tmp_path: Path) -> None:
    """A table altered in the manifest (so another revision digest) or swapped for the
    table of another blob of the same size: its chunks fail, never serve other bytes."""
    data = os.urandom(SIZE)
    altered = bytearray(ChunkTable.of_bytes(data, 4 * MiB).digests)
    altered[32 + 5] ^= 0x01  # chunk 1's digest
    push_revision(registry, "trust/t", "altered", data,
                  table=ChunkTable(4 * MiB, bytes(altered)))
    push_revision(registry, "trust/t", "swapped", data,
                  table=ChunkTable.of_bytes(os.urandom(SIZE), 4 * MiB))
    with mount(registry, tmp_path, "tables") as mnt:
        model = mnt / "trust" / "t"
        assert read_at(model / "altered" / "weights.bin", 0, 4096) == data[:4096]
        assert eio(lambda: read_at(model / "altered" / "weights.bin", 4 * MiB + 10, 100))
        assert eio((model / "swapped" / "weights.bin").read_bytes)
        assert stats(mnt)["verify_failures"] >= 2


@pytest.mark.mount
@pytest.mark.parametrize("cache_size", ["1G", "0"])
def test_a_size_claimed_by_another_revision_cannot_change_a_file(
        registry: Registry, tmp_path: Path, cache_size: str) -> None:
    """Two models list one blob digest; the second manifests lie about its size (with a
    table that fits the lie, and without). Whatever they read first, the honest file
    reads right, in full (the issue's 8,388,708-byte read)."""
    data = os.urandom(SIZE)
    short = 8 * MiB + 100
    push_revision(registry, "poison/honest", "v1", data)  # no table: verified whole
    push_revision(registry, "poison/liar", "tabled", data, size=short,
                  table=ChunkTable.of_bytes(data[:short], 4 * MiB))
    push_revision(registry, "poison/liar", "plain", data, size=short)
    with mount(registry, tmp_path, "poison", "--cache-size", cache_size) as mnt:
        liar = mnt / "poison" / "liar"
        # The lie with a fitting table is the liar's own revision: its bytes are the
        # blob's, cut short. Without a table the blob is not what it claims: EIO.
        assert (liar / "tabled" / "weights.bin").read_bytes() == data[:short]
        assert eio((liar / "plain" / "weights.bin").read_bytes)
        honest = mnt / "poison" / "honest" / "v1" / "weights.bin"
        assert honest.stat().st_size == SIZE
        assert honest.read_bytes() == data
        fd = os.open(honest, os.O_RDONLY)
        try:
            for offset in (short - 50, 8 * MiB, SIZE - 4096):
                assert os.pread(fd, 4096, offset) == data[offset:offset + 4096]
        finally:
            os.close(fd)
        flush(mnt)
    if cache_size != "0":
        # Remounted over the disk cache the liars filled: the honest file still reads right.
        with mount(registry, tmp_path, "poison-again") as mnt:
            assert (mnt / "poison" / "liar" / "tabled" / "weights.bin").read_bytes() == \
                data[:short]
            assert (mnt / "poison" / "honest" / "v1" / "weights.bin").read_bytes() == data


@pytest.mark.mount
@pytest.mark.parametrize("whole", [True, False], ids=["complete", "partial"])
def test_a_byte_flipped_in_the_disk_cache_is_never_served(
        registry: Registry, tmp_path: Path, whole: bool) -> None:
    data = os.urandom(SIZE)
    push_revision(registry, "cached/m", "v1", data, table=ChunkTable.of_bytes(data, 4 * MiB))
    hexpart = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    target = (cache / "blobs" / "sha256" / hexpart if whole else
              cache / "partial" / "sha256" / f"{hexpart}-{SIZE}.data")
    with mount(registry, tmp_path, "fill") as mnt:
        path = mnt / "cached" / "m" / "v1" / "weights.bin"
        if whole:
            assert path.read_bytes() == data
        else:
            assert path.open("rb").read(6 * MiB) == data[:6 * MiB]
        # The write-behind writes what the page cache still holds (these VMs page out
        # idle page cache within seconds, and a dropped chunk is not fetched again for
        # the cache), so a whole file is made sure of with `galleryfs warm`.
        flush(mnt)
        if whole:
            os.getxattr(path, "user.galleryfs.warm")
    assert target.exists()
    flip(target, (1000, 4 * MiB + 3))
    with mount(registry, tmp_path, "again") as mnt:
        path = mnt / "cached" / "m" / "v1" / "weights.bin"
        assert path.open("rb").read(6 * MiB) == data[:6 * MiB]
        got = stats(mnt)
        assert got["disk_damaged"] >= 1 and got["registry_bytes"] >= 4 * MiB
        assert got["verify_failures"] == 0


@pytest.mark.mount
def test_verify_end_serves_an_untabled_blob_unverified(registry: Registry,
                                                       tmp_path: Path) -> None:
    """`--verify end` is weaker, and says so: a flipped byte in a blob without a table
    reaches the reader (as before galleryfs verified chunks)."""
    data = os.urandom(SIZE)
    push_revision(registry, "weak/m", "v1", data)
    flip(blob_file(registry, data), (1000,))
    with mount(registry, tmp_path, "end", "--verify", "end", "--cache-size", "0") as mnt:
        got = read_at(mnt / "weak" / "m" / "v1" / "weights.bin", 0, 4096)
        assert got != data[:4096] and got[:1000] == data[:1000]


def test_verify_option_is_checked(tmp_path: Path) -> None:
    from tests.mounting import galleryfs, isolated_env

    result = galleryfs("mount", "127.0.0.1:1", str(tmp_path), "--verify", "lax",
                       env=isolated_env(tmp_path))
    assert result.returncode == 2
    assert "invalid choice: 'lax'" in result.stderr and "Traceback" not in result.stderr


def test_verify_mode_travels_to_the_daemon(tmp_path: Path) -> None:
    from galleryfs.errors import UsageError
    from galleryfs.mount.config import MountConfig

    config = MountConfig("localhost:5000", str(tmp_path), ClientOptions(),
                         str(tmp_path / "c"), verify="end")
    assert MountConfig.from_json(config.to_json()).verify == "end"
    assert MountConfig("localhost:5000", str(tmp_path), ClientOptions(),
                       str(tmp_path / "c")).verify == "strict"
    with pytest.raises(UsageError, match="--verify"):
        MountConfig("localhost:5000", str(tmp_path), ClientOptions(), str(tmp_path / "c"),
                    verify="lax")


# ---- the verifier and the reader, without a mount -------------------------------------------


def test_expected_digests_per_chunk() -> None:
    data = os.urandom(4 * CHUNK + 10)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    table = ChunkTable.of_bytes(data, CHUNK)

    def verifier(chunk: int) -> Verifier:
        return Verifier(chunk, fetch=None)  # type: ignore[arg-type]

    # The mount's chunk a multiple of the table's: every table piece of it is checked.
    expect = verifier(2 * CHUNK).expect(BlobRef("r", digest, len(data), table), 1)
    assert expect == Expect(CHUNK, table.digests[64:128])
    assert expect.matches(data[2 * CHUNK:4 * CHUNK])
    assert not expect.matches(data[2 * CHUNK:4 * CHUNK - 1])
    last = verifier(2 * CHUNK).expect(BlobRef("r", digest, len(data), table), 2)
    assert last is not None and last.matches(data[4 * CHUNK:])
    # Equal: the table's own digest.
    assert verifier(CHUNK).expect(BlobRef("r", digest, len(data), table), 3).whole == \
        table.expected(3)
    # Not a multiple: as if there were no table; a strict mount verifies the blob whole.
    v = verifier(CHUNK // 2 * 3)
    assert v.expect(BlobRef("r", digest, len(data), table), 0) is None
    assert v.pending(BlobRef("r", digest, len(data), table))
    # A blob of one chunk: its digest is the chunk's.
    one = BlobRef("r", digest, len(data))
    assert verifier(8 * CHUNK).expect(one, 0).matches(data)
    assert not verifier(8 * CHUNK).pending(one)
    end = Verifier(CHUNK, "end", fetch=None)  # type: ignore[arg-type]
    assert not end.pending(one) and end.trusts_unverified(one)
    # A table too short for the blob: chunks past its end match nothing (never unchecked).
    past = verifier(CHUNK).expect(BlobRef("r", digest, 9 * CHUNK, table), 7)
    assert past is not None and not past.matches(data[:CHUNK])
    # The same expectation object for every ask (the memory cache compares keys often).
    v = verifier(CHUNK)
    assert v.expect(BlobRef("r", digest, len(data), table), 2) is \
        v.expect(BlobRef("r", digest, len(data), table), 2)



@pytest.mark.trio
async def test_strict_verifies_an_untabled_blob_once_and_then_reads_it(registry,
                                                                       tmp_path) -> None:
    """One stream for the whole blob (all readers wait on it), then chunk reads checked
    against the derived digests; a later process over the complete disk cache derives
    from the disk's index without a fetch."""
    data = os.urandom(10 * CHUNK + 1234)
    ref = BlobRef("strict/blob", push_blob(registry.url, "strict/blob", data), len(data))
    async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
        ranges = DirectRanges(client)
        reader = ChunkReader(ranges, span_fetch=ranges.span, chunk_size=CHUNK,
                             disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        results: dict[int, bytes] = {}

        async def one(offset: int) -> None:
            results[offset] = await reader.read(ref, offset, 100)

        async with write_behind(reader) as kernel:
            kernel.holds(ref, data)
            async with trio.open_nursery() as nursery:
                for offset in (0, 3 * CHUNK, 9 * CHUNK + 7):
                    nursery.start_soon(one, offset)
            assert results == {o: data[o:o + 100] for o in results}
            got = reader.snapshot()
            assert got["derived_blobs"] == 1 and got["derived_bytes"] == len(data)
            assert await reader.read(ref, 0, ref.size) == data
        assert reader.snapshot()["verified_chunks"] == 11
        requests = client.requests_sent
        fetch = Counting(client)
        again = ChunkReader(fetch, chunk_size=CHUNK, disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        assert await again.read(ref, 5 * CHUNK, 2 * CHUNK) == data[5 * CHUNK:7 * CHUNK]
        assert fetch.calls == [] and client.requests_sent == requests
        ranges.close()


@pytest.mark.trio
async def test_strict_refuses_an_untabled_blob_that_fails_whole(registry, caplog) -> None:
    data = os.urandom(10 * CHUNK + 1234)
    ref = BlobRef("strict/bad", push_blob(registry.url, "strict/bad", data), len(data))
    async with _client(registry) as client:
        fetch = Counting(client)
        fetch.corrupt = True  # the first byte of every range
        reader = ChunkReader(fetch, chunk_size=CHUNK)
        with pytest.raises(ChunkMismatch, match="as a whole"):
            await reader.read(ref, 5 * CHUNK, 10)
        assert reader.memory.bytes == 0
        assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == [
            logging.WARNING]
        fetch.corrupt = False
        assert await reader.read(ref, 5 * CHUNK, 10) == data[5 * CHUNK:5 * CHUNK + 10]
        assert reader.snapshot()["verify_failures"] == 1


@pytest.mark.trio
async def test_memory_keys_bind_size_and_table(registry) -> None:
    """Another revision's claims for the same digest (shorter, or another table) find
    nothing of the honest one's bytes in memory, and shadow none of them."""
    data = os.urandom(10 * CHUNK + 1234)
    digest = push_blob(registry.url, "keys/blob", data)
    honest = tabled("keys/blob", digest, data)
    short = BlobRef("keys/blob", digest, 5 * CHUNK + 3,
                    ChunkTable.of_bytes(data[:5 * CHUNK + 3], CHUNK))
    wrong = BlobRef("keys/blob", digest, len(data), ChunkTable.of_bytes(os.urandom(len(data)),
                                                                        CHUNK))
    async with _client(registry) as client:
        reader = ChunkReader(Counting(client), chunk_size=CHUNK)
        assert await reader.read(short, 0, short.size) == data[:short.size]
        with pytest.raises(DigestMismatch):
            await reader.read(wrong, 5 * CHUNK, 10)
        assert await reader.read(honest, 0, honest.size) == data
        assert not reader.in_memory(wrong, 0)
        with pytest.raises(DigestMismatch):
            await reader.read(wrong, 0, 10)


@pytest.mark.trio
async def test_the_write_behind_rechecks_what_the_page_cache_gives_back(registry, blob,
                                                                        tmp_path) -> None:
    """Bytes asked back from the kernel are hashed again before they are written: a page
    that changed meanwhile is not cached, and counted."""
    ref, data = blob
    async with _client(registry) as client:
        disk = DiskCache(tmp_path, 1 << 30, CHUNK)
        reader = ChunkReader(Counting(client), chunk_size=CHUNK, memory_bytes=CHUNK, disk=disk)
        async with write_behind(reader) as kernel:
            bad = bytearray(data)
            bad[2 * CHUNK + 5] ^= 0xFF
            kernel.holds(ref, bytes(bad))
            for offset in range(0, ref.size, CHUNK):
                assert await reader.read(ref, offset, CHUNK) == data[offset:offset + CHUNK]
        assert reader.snapshot()["verify_failures"] == 1
        assert not disk.has_chunk(ref.digest, ref.size, 2)
        assert disk.has_chunk(ref.digest, ref.size, 1)


async def _read_until_chunk_6_fails(reader: ChunkReader, ref: BlobRef, size: int
                                    ) -> bytearray:
    """Read the blob from the start in 16 KiB reads until chunk 6 fails its check (it
    must); what was read before."""
    out = bytearray()
    async with trio.open_nursery() as nursery:
        handle = reader.open(ref, nursery)
        with pytest.raises(ChunkMismatch, match="chunk 6 of"):
            while len(out) < size:
                out += await handle.read(len(out), 16384)
        handle.close()
    return out


@pytest.mark.trio
async def test_a_prefetched_chunk_that_fails_is_left_to_its_reader(registry, caplog) -> None:
    """A span's chunk that fails its check is not delivered: the reader fetches it and
    fails with one warning; the others are served."""
    data = os.urandom(12 * CHUNK)
    ref = tabled("span/bad", push_blob(registry.url, "span/bad", data), data)
    bad = bytearray(ChunkTable.of_bytes(data, CHUNK).digests)
    bad[6 * 32] ^= 1
    ref = BlobRef(ref.repo, ref.digest, ref.size, ChunkTable(CHUNK, bytes(bad)))
    async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
        ranges = DirectRanges(client)
        reader = ChunkReader(ranges, span_fetch=ranges.span, chunk_size=CHUNK,
                             window_cap=8 * CHUNK)
        out = await _read_until_chunk_6_fails(reader, ref, len(data))
        assert bytes(out) == data[:6 * CHUNK]
        assert reader.snapshot()["spans"] > 0
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
        ranges.close()


@pytest.fixture
def blob(registry) -> tuple[BlobRef, bytes]:  # noqa: ANN001 - harness fixture
    data = os.urandom(10 * CHUNK + 1234)
    return tabled("integrity/blob", push_blob(registry.url, "integrity/blob", data), data), data


@pytest.mark.trio
async def test_a_random_reads_chunk_is_kept_on_disk(registry, tmp_path) -> None:
    """A read outside any stream loads (and verifies) its whole chunk; the kernel keeps
    only the page asked for, so the chunk goes to the disk cache at once: a later read in
    it, once memory has let it go, costs no second fetch of 4 MiB."""
    data = os.urandom(6 * CHUNK)
    ref = tabled("random/blob", push_blob(registry.url, "random/blob", data), data)
    async with _client(registry) as client:
        fetch = Counting(client)
        reader = ChunkReader(fetch, chunk_size=CHUNK, memory_bytes=CHUNK,
                             disk=DiskCache(tmp_path, 1 << 30, CHUNK))
        for offset in (3 * CHUNK + 100, 1 * CHUNK + 7, 3 * CHUNK + 9000, 1 * CHUNK + 5000):
            handle = reader.open(ref, None)
            assert bytes(await handle.read(offset, 4096)) == data[offset:offset + 4096]
            handle.close()
        assert sorted(fetch.calls) == [(CHUNK, 2 * CHUNK), (3 * CHUNK, 4 * CHUNK)]
        assert reader.snapshot()["disk_hits"] == 2


@pytest.mark.trio
@pytest.mark.parametrize("direct", [True, False])
async def test_span_pieces_are_hashed_where_received_or_else_by_the_reader(
        registry, caplog, direct) -> None:
    """A span's pieces received directly come with their digests (hashed in the thread
    that received them): the reader compares them and sends no piece to a hashing
    thread. Pieces received through httpx come without digests and are hashed by the
    reader: either way a piece that does not match its table is never served."""
    data = os.urandom(12 * CHUNK)
    ref = tabled("span/prehash", push_blob(registry.url, "span/prehash", data), data)
    bad = bytearray(ref.table.digests)
    bad[6 * 32] ^= 1
    ref = BlobRef(ref.repo, ref.digest, ref.size, ChunkTable(CHUNK, bytes(bad)))
    async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
        ranges = DirectRanges(client)
        ranges.transport.enabled = direct
        reader = ChunkReader(ranges, span_fetch=ranges.span, chunk_size=CHUNK,
                             window_cap=8 * CHUNK)
        hashed: list[int] = []
        matches = reader.verify.matches

        async def counting(chunk, expect):  # noqa: ANN001, ANN202 - a spy
            hashed.append(len(chunk))
            return await matches(chunk, expect)

        reader.verify.matches = counting  # type: ignore[method-assign]
        out = await _read_until_chunk_6_fails(reader, ref, len(data))
        assert bytes(out) == data[:6 * CHUNK]
        snap = reader.snapshot()
        assert snap["spans"] > 0 and snap["verified_chunks"] >= 6
        # Foreground fetches (chunk 0, which starts the stream, and chunk 6, fetched again
        # by its reader) are direct reads too: nothing is sent to a hashing thread unless
        # it came without digests.
        if direct:
            assert hashed == [], hashed
        else:
            assert len(hashed) >= 6, hashed
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
        ranges.close()


def test_a_finer_tables_chunk_is_found_again_without_hashing(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk checked against 64 KiB table pieces is kept under their identity: read back
    by a compare and its CRC (G4, G3's page-cache holes); another table's reader hashes it
    against its own, and a complete blob of such chunks is lent as a table of each
    chunk's sha256, hashed from the file."""
    cs, piece = 256 << 10, 64 << 10
    data = os.urandom(2 * cs)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    def pieces(chunk: bytes) -> Expect:
        return Expect(piece, b"".join(hashlib.sha256(chunk[i:i + piece]).digest()
                                      for i in range(0, len(chunk), piece)))

    cache = DiskCache(tmp_path, 1 << 30, cs)
    first, second = pieces(data[:cs]), pieces(data[cs:])
    with pytest.raises(ChunkRejected):
        cache.write_chunk(digest, len(data), 1, data[:cs], second)
    cache.write_chunk(digest, len(data), 0, data[:cs], first)
    calls = []
    real = Expect.matches
    monkeypatch.setattr(Expect, "matches", lambda self, chunk: calls.append(1) or real(self, chunk))
    assert cache.read_chunk(digest, len(data), 0, first) == data[:cs]
    assert not calls, "read back by hashing it again"
    assert cache.write_chunk(digest, len(data), 1, data[cs:], second, checked=True)
    assert cache.read_chunk(digest, len(data), 1, second) == data[cs:]
    assert not calls
    # Another table's reader hashes the chunk against its own: served when it matches.
    other = Expect(piece, bytes(32) + first.digests[32:])
    assert cache.read_chunk(digest, len(data), 0, other) is None
    coarse = Expect(cs, hashlib.sha256(data[:cs]).digest())
    assert cache.read_chunk(digest, len(data), 0, coarse) == data[:cs]
    # Lent as a table: each chunk's own sha256, hashed from the whole-verified file.
    assert cache.table(digest, len(data)) == b"".join(
        hashlib.sha256(data[i:i + cs]).digest() for i in range(0, len(data), cs))
