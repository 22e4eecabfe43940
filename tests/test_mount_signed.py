"""A real kernel mount under a signature policy (`--require-signed-by`, `--audit`), and the
accessory tags a mount never shows."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from galleryfs.cli import main
from tests.mounting import fuse_available, galleryfs, isolated_env
from tests.registry_harness import Registry
from tests.test_mount import start_foreground, unmount, wait_for_mount
from tests.test_signing import _pushed_without_tables, push_files, sig_tag, write_key  # noqa: F401 - the autouse fixture: revisions as other tools push them

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(not fuse_available(), reason="/dev/fuse unavailable")]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def signed_gallery(registry: Registry, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> dict:
    keys = tmp_path / "keys"
    keys.mkdir()
    alice = write_key(keys, "alice", ec.generate_private_key(ec.SECP256R1()))
    data = os.urandom((5 << 20) + 99)
    good = push_files(registry, tmp_path, "g/m:good", {"w.bin": data})
    bad = push_files(registry, tmp_path, "g/m:bad", {"w.bin": b"unsigned"})
    for command in ("sign", "index"):
        assert main([command, f"{registry.host}/g/m:good", "--key", str(alice[0]),
                     "--plain-http", "--quiet"]) == 0
    capsys.readouterr()
    return {"alice": alice, "good": good, "bad": bad, "data": data}


def _mount(registry: Registry, tmp_path: Path, name: str, *options: str):  # noqa: ANN202
    mnt, log = tmp_path / f"mnt-{name}", tmp_path / f"log-{name}"
    mnt.mkdir()
    proc = start_foreground(registry.host, mnt, tmp_path / f"cache-{name}", log, *options)
    wait_for_mount(proc, mnt, log)
    return mnt, log, proc


def test_mount_shows_only_signed_revisions(registry: Registry, tmp_path: Path,
                                           signed_gallery: dict) -> None:
    good, bad = signed_gallery["good"], signed_gallery["bad"]
    mnt, log, proc = _mount(registry, tmp_path, "policy", "--require-signed-by",
                            str(signed_gallery["alice"][1]))
    try:
        model = mnt / "g" / "m"
        assert sorted(os.listdir(model)) == sorted(["good", good])
        assert (model / "good" / "w.bin").read_bytes() == signed_gallery["data"]
        assert not (model / "bad").exists()  # the tag is hidden
        for _ in range(3):
            with pytest.raises(PermissionError) as caught:
                os.stat(model / bad)
            assert caught.value.errno == errno.EACCES
        with pytest.raises(PermissionError):
            os.listdir(model / bad)
    finally:
        unmount(mnt, proc)
    refused = [line for line in log.read_text().splitlines() if "hidden and refused" in line]
    assert len(refused) == 1 and bad in refused[0]


def test_audit_mount_lists_unsigned_revisions_with_a_warning(registry: Registry,
                                                             tmp_path: Path,
                                                             signed_gallery: dict) -> None:
    good, bad = signed_gallery["good"], signed_gallery["bad"]
    mnt, log, proc = _mount(registry, tmp_path, "audit", "--require-signed-by",
                            str(signed_gallery["alice"][1]), "--audit")
    try:
        model = mnt / "g" / "m"
        assert sorted(os.listdir(model)) == sorted(["bad", "good", bad, good])
        assert (model / "bad" / "w.bin").read_bytes() == b"unsigned"
    finally:
        unmount(mnt, proc)
    audit = [line for line in log.read_text().splitlines() if "audit:" in line]
    assert len(audit) == 1 and bad in audit[0]


def test_mount_never_shows_accessory_tags(registry: Registry, tmp_path: Path,
                                          signed_gallery: dict) -> None:
    good, bad = signed_gallery["good"], signed_gallery["bad"]
    mnt, log, proc = _mount(registry, tmp_path, "plain")
    try:
        model = mnt / "g" / "m"
        names = os.listdir(model)
        assert sorted(names) == sorted(["bad", "good", bad, good])
        with pytest.raises(FileNotFoundError):
            os.stat(model / sig_tag(good))
        with pytest.raises(FileNotFoundError):
            os.stat(model / ("sha256-" + good.split(":")[1] + ".chunks"))
    finally:
        unmount(mnt, proc)


def test_mount_with_a_bad_key_file_is_a_usage_error(registry_session: Registry,
                                                    tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "rsa.pub").write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    for key in (tmp_path / "missing.pem", tmp_path / "rsa.pub"):
        r = galleryfs("mount", registry_session.host, str(tmp_path / "mnt"), "--plain-http",
                      "--require-signed-by", str(key), env=isolated_env(tmp_path))
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("galleryfs: error: key ")
    r = galleryfs("mount", registry_session.host, str(tmp_path / "mnt"), "--plain-http",
                  "--audit", env=isolated_env(tmp_path))
    assert r.returncode == 2 and "--audit needs --require-signed-by" in r.stderr


def test_a_signed_index_table_is_what_the_mount_verifies_with(
        registry: Registry, tmp_path: Path, signed_gallery: dict) -> None:
    """`index` gave the untabled revision signed tables: under --require-signed-by the
    mount checks chunk by chunk with them, so a byte flipped on the registry's disk costs
    that chunk only (EIO), and the file is not streamed whole first as an untabled one is."""
    from tests.test_integrity import blob_file, eio, flip, read_at
    from tests.test_mount import stats

    data, good = signed_gallery["data"], signed_gallery["good"]
    chunk = 4 << 20
    flip(blob_file(registry, data), (chunk + 10,))  # inside the second chunk
    mnt, log, proc = _mount(registry, tmp_path, "indexed", "--require-signed-by",
                            str(signed_gallery["alice"][1]))
    try:
        f = mnt / "g" / "m" / good / "w.bin"
        assert read_at(f, 0, 65536) == data[:65536]  # the intact first chunk is served
        assert eio(lambda: read_at(f, chunk, 4096))  # the flipped one is not
        got = stats(mnt)
        assert got["derived_blobs"] == 0 and got["verify_failures"] >= 1
    finally:
        unmount(mnt, proc)
    assert "does not match" in log.read_text()


def test_a_model_signing_signature_does_not_vouch_for_the_manifests_tables(
        registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """model.sig covers the files' digests, not the manifest: a registry that changes a
    blob's bytes and writes a chunk table for them beside the unchanged layer digest must
    get EIO from a mount that trusts the signer, never the changed bytes."""
    import json

    from galleryfs.modelpack import ChunkTable
    from tests.test_integrity import eio, read_at
    from tests.test_signing import (
        _sign_with_library,
        blob_data_path,
        get_manifest,
        push_dir,
        put_manifest,
    )

    keys = tmp_path / "keys"
    keys.mkdir()
    alice = write_key(keys, "alice", ec.generate_private_key(ec.SECP256R1()))
    model = tmp_path / "model"
    model.mkdir()
    data = os.urandom(12 << 20)
    (model / "weights.bin").write_bytes(data)
    (model / "config.json").write_text('{"a": 1}\n')
    _sign_with_library(model, alice[0])
    push_dir(registry, model, "g/ms:v1")
    m = json.loads(get_manifest(registry, "g/ms", "v1"))
    layer = next(la for la in m["layers"]
                 if la["annotations"]["org.cncf.model.filepath"] == "weights.bin")
    evil = bytearray(data)
    evil[0:16] = b"EVIL EVIL EVIL!!"
    blob_data_path(registry, layer["digest"]).write_bytes(bytes(evil))
    layer["annotations"].update(ChunkTable.of_bytes(bytes(evil), 4 << 20).to_annotations())
    put_manifest(registry, "g/ms", "v1", json.dumps(m).encode())
    capsys.readouterr()

    mnt, log, proc = _mount(registry, tmp_path, "modelsig", "--require-signed-by",
                            str(alice[1]))
    try:
        f = mnt / "g" / "ms" / "v1" / "weights.bin"
        assert eio(lambda: read_at(f, 0, 65536))
        assert (mnt / "g" / "ms" / "v1" / "config.json").read_text() == '{"a": 1}\n'
    finally:
        unmount(mnt, proc)
