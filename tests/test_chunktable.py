"""Chunk tables: the format in layer annotations, and one-pass hashing of a file."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest

from galleryfs import digest as digests
from galleryfs import modelpack
from galleryfs.errors import DigestMismatch
from galleryfs.modelpack import ChunkTable, Descriptor

CHUNK = 64 << 10


def test_a_table_round_trips_through_annotations() -> None:
    data = os.urandom(3 * CHUNK + 5)
    table = ChunkTable.of_bytes(data, CHUNK)
    assert len(table) == 4
    assert table.expected(3) == hashlib.sha256(data[3 * CHUNK:]).digest()
    again = ChunkTable.from_annotations(table.to_annotations(), len(data))
    assert again == table
    assert ChunkTable.from_annotations({"other": "x"}, len(data)) is None


@pytest.mark.parametrize(("annotations", "size", "why"), [
    ({modelpack.ANNOTATION_CHUNK_SIZE: "65536"}, 10, "missing"),
    ({modelpack.ANNOTATION_CHUNK_SIZE: "-1", modelpack.ANNOTATION_CHUNK_SHA256: "AA=="}, 10,
     "not a number"),
    ({modelpack.ANNOTATION_CHUNK_SIZE: "65537",
      modelpack.ANNOTATION_CHUNK_SHA256: base64.b64encode(bytes(32)).decode()}, 10, "power of two"),
    ({modelpack.ANNOTATION_CHUNK_SIZE: "65536", modelpack.ANNOTATION_CHUNK_SHA256: "!!"}, 10,
     "base64"),
    ({modelpack.ANNOTATION_CHUNK_SIZE: "65536",
      modelpack.ANNOTATION_CHUNK_SHA256: base64.b64encode(bytes(31)).decode()}, 10, "whole"),
    # One digest too few / too many for the blob's size: a table for another blob.
    ({modelpack.ANNOTATION_CHUNK_SIZE: "65536",
      modelpack.ANNOTATION_CHUNK_SHA256: base64.b64encode(bytes(32)).decode()}, CHUNK + 1,
     "do not fit"),
    ({modelpack.ANNOTATION_CHUNK_SIZE: "65536",
      modelpack.ANNOTATION_CHUNK_SHA256: base64.b64encode(bytes(64)).decode()}, CHUNK, "do not fit"),
])
def test_a_table_that_does_not_fit_its_blob_is_refused(annotations: dict, size: int, why: str
                                                       ) -> None:
    with pytest.raises(ValueError, match=why):
        ChunkTable.from_annotations(annotations, size)


def test_a_bad_table_in_a_manifest_leaves_the_file_without_one(caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    good = os.urandom(CHUNK * 2)
    table = ChunkTable.of_bytes(good, CHUNK)
    bad = dict(table.to_annotations(), **{modelpack.ANNOTATION_CHUNK_SIZE: "131072"})
    layers = [
        Descriptor(modelpack.layer_media_type("weight"), digests.of_bytes(good), len(good),
                   {modelpack.ANNOTATION_FILEPATH: "a.bin", **table.to_annotations()}),
        Descriptor(modelpack.layer_media_type("weight"), digests.of_bytes(good), len(good),
                   {modelpack.ANNOTATION_FILEPATH: "b.bin", **bad}),
    ]
    config = Descriptor(modelpack.CONFIG_TYPE, digests.of_bytes(b"{}"), 2)
    body = modelpack.build_manifest(config, layers)
    revision = modelpack.parse_manifest(digests.of_bytes(body), body)
    a, b = revision.files
    assert a.table == table
    assert b.table is None and b.servable
    assert any("chunk table ignored" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 4 * CHUNK + 3])
def test_one_pass_gives_the_file_digest_and_its_chunk_digests(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    whole, table = digests.of_file_chunks(path, size, CHUNK)
    assert whole == digests.of_bytes(data) == digests.of_file(path, size)
    assert table == digests.chunk_digests(data, CHUNK)
    with pytest.raises(DigestMismatch):
        digests.of_file_chunks(path, size + 1, CHUNK)
