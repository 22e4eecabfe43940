"""Hashing a file: the one place galleryfs reads a file to name it by its digest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from galleryfs import digest
from galleryfs.errors import DigestMismatch


@pytest.mark.parametrize("size", [0, 1, (4 << 20) - 1, 4 << 20, (4 << 20) + 1, 9 << 20])
def test_of_file_matches_hashlib_across_piece_edges(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = "sha256:" + hashlib.sha256(data).hexdigest()
    assert digest.of_file(path) == expected
    assert digest.of_file(str(path), size) == expected
    assert digest.of_bytes(data) == expected


@pytest.mark.parametrize("listed", [99, 101, 0])
def test_of_file_refuses_a_file_whose_length_is_not_the_listed_one(tmp_path: Path,
                                                                  listed: int) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 100)
    with pytest.raises(DigestMismatch, match=f"w.bin: not the {listed} bytes it was listed with"):
        digest.of_file(path, listed)


def test_of_file_reports_a_missing_file_as_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        digest.of_file(tmp_path / "absent")


def test_a_manifest_named_by_a_sha512_digest_is_checked_against_it() -> None:
    import hashlib

    from galleryfs.registry.client import _verified_manifest

    body = b'{"schemaVersion":2}'
    name = "sha512:" + hashlib.sha512(body).hexdigest()
    assert _verified_manifest(body, "m", name, None, "w").digest == name
    with pytest.raises(DigestMismatch):
        _verified_manifest(body + b" ", "m", name, None, "w")
