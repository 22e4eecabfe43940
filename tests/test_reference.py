from __future__ import annotations

import pytest

from galleryfs import digest, reference
from galleryfs.errors import DigestMismatch, InvalidReference

HEX = "a" * 64


@pytest.mark.parametrize(
    ("text", "host", "repo", "tag", "dig"),
    [
        ("reg.example.com/g/m", "reg.example.com", "g/m", None, None),
        ("127.0.0.1:5000/g/m:v1", "127.0.0.1:5000", "g/m", "v1", None),
        ("localhost/team/llm/base:v1.2-rc", "localhost", "team/llm/base", "v1.2-rc", None),
        (f"reg.io:443/g/m@sha256:{HEX}", "reg.io:443", "g/m", None, f"sha256:{HEX}"),
        (f"reg.io/g/m:t@sha256:{HEX}", "reg.io", "g/m", "t", f"sha256:{HEX}"),
        ("reg.io", "reg.io", "", None, None),
        ("https://reg.io/g/", "reg.io", "g", None, None),
    ],
)
def test_parse(text: str, host: str, repo: str, tag: str | None, dig: str | None) -> None:
    ref = reference.parse(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repo, tag, dig)


def test_nested_model_parts() -> None:
    ref = reference.parse("reg.io/team/llm/base:v1")
    assert ref.gallery == "team"
    assert ref.model == "llm/base"
    assert str(ref) == "reg.io/team/llm/base:v1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "gallery/model",  # no registry host
        "reg.io/Gallery/model",  # uppercase repository
        "reg.io/g/m:bad tag",
        "reg.io/g/m:-dash",
        "reg.io/g/m@sha256:abc",  # short digest
        "reg.io/g/m@md5:" + "a" * 32,
        "reg.io/g/../m",
        "reg.io/g//m",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidReference):
        reference.parse(text)


def test_parse_model_needs_gallery_and_model() -> None:
    with pytest.raises(InvalidReference, match="GALLERY/MODEL"):
        reference.parse_model("reg.io/onlygallery")


def test_digest_validation() -> None:
    assert digest.validate(f"sha256:{HEX}")
    for bad in ("sha256:" + "A" * 64, "sha256:../../etc", "sha1:" + "a" * 40, "sha256", f"sha256:{HEX}0"):
        assert not digest.is_digest(bad), bad


def test_verifier_catches_wrong_bytes_and_sizes() -> None:
    good = digest.of_bytes(b"hello")
    v = digest.Verifier(good, 5)
    v.update(b"hello")
    v.check()
    v = digest.Verifier(good, 5)
    v.update(b"hellO")
    with pytest.raises(DigestMismatch):
        v.check()
    v = digest.Verifier(good, 5)
    with pytest.raises(DigestMismatch):
        v.update(b"hello!")
