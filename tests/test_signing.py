"""Signed revisions against a real registry: `galleryfs sign`, `verify`, `index`, and what a
registry (or whoever can push to it) can do to fool them.

cosign itself cannot be installed here (Go 1.19): its byte shapes are checked instead
(the payload, the 233-byte config of one signature, the annotation), from cosign's
SIGNATURE_SPEC. OpenSSF model-signing is the real library, both ways.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from galleryfs import digest as digests
from galleryfs import gallery, modelpack
from galleryfs.cli import main
from galleryfs.errors import NotFound
from galleryfs.gallery import pushing
from galleryfs.gallery.locations import BlobLocations
from galleryfs.modelpack import ChunkTable, parse_manifest
from galleryfs.mount.sources import RegistrySource
from galleryfs.mount.tree import Tree
from galleryfs.reference import parse
from galleryfs.registry.client import ClientOptions, RegistryClient
from galleryfs.trust import chunks, cosign
from galleryfs.trust.keys import load_public
from galleryfs.trust.policy import Policy
from tests.faultproxy import FaultProxy
from tests.registry_harness import Registry

OCI = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


def write_key(directory: Path, name: str, key: object) -> tuple[Path, Path]:
    """(private, public) PEM files of `key`."""
    private = directory / f"{name}.pem"
    public = directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    d = tmp_path / "keys"
    d.mkdir()
    return {name: write_key(d, name, ec.generate_private_key(ec.SECP256R1()))
            for name in ("alice", "mallory")}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([*args])
    out, err = capsys.readouterr()
    return code, out, err


def push_dir(registry: Registry, directory: Path, ref: str) -> str:
    async def go() -> str:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            result = await gallery.push(client, directory, parse(f"{registry.host}/{ref}"),
                                        locations=BlobLocations(directory.parent / "loc.json"))
            return result.digest

    return trio.run(go)


@pytest.fixture(autouse=True)
def _pushed_without_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """These revisions stand for ones other tools pushed: no chunk tables in the manifest
    (every test file is smaller than the largest table chunk), so `index` has work."""
    monkeypatch.setattr(pushing, "table_chunk_size", lambda sizes: modelpack.MAX_TABLE_CHUNK)


def push_files(registry: Registry, tmp_path: Path, ref: str, files: dict[str, bytes]) -> str:
    src = tmp_path / ("src-" + ref.replace("/", "-").replace(":", "-"))
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    return push_dir(registry, src, ref)


def http(registry: Registry) -> httpx.Client:
    return httpx.Client(base_url=registry.url, timeout=30)


def get_manifest(registry: Registry, repo: str, ref: str) -> bytes:
    with http(registry) as h:
        r = h.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": OCI})
        r.raise_for_status()
        return r.content


def put_manifest(registry: Registry, repo: str, ref: str, body: bytes,
                 media_type: str = OCI) -> None:
    with http(registry) as h:
        r = h.put(f"/v2/{repo}/manifests/{ref}", content=body,
                  headers={"Content-Type": media_type})
        assert r.status_code == 201, r.text


def put_blob(registry: Registry, repo: str, data: bytes) -> str:
    d = digests.of_bytes(data)
    with http(registry) as h:
        r = h.post(f"/v2/{repo}/blobs/uploads/")
        location = r.headers["location"]
        sep = "&" if "?" in location else "?"
        r = h.put(f"{location}{sep}digest={d}", content=data)
        assert r.status_code == 201, r.text
    return d


def tags(registry: Registry, repo: str) -> list[str]:
    with http(registry) as h:
        return sorted(h.get(f"/v2/{repo}/tags/list").json()["tags"] or [])


def sig_tag(digest: str) -> str:
    return "sha256-" + digest.split(":")[1] + ".sig"


def blob_data_path(registry: Registry, digest: str) -> Path:
    hexpart = digest.split(":")[1]
    return registry.storage_dir / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


def conn() -> list[str]:
    return ["--plain-http"]


# ---- cosign: sign and verify -------------------------------------------------------------


def test_sign_then_verify_and_the_stored_format(registry: Registry, tmp_path: Path, keys,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    digest = push_files(registry, tmp_path, "g/m:v1", {"config.json": b"{}\n"})
    ref = f"{registry.host}/g/m:v1"
    alice, mallory = keys["alice"], keys["mallory"]

    code, out, err = cli(capsys, "sign", ref, "--key", str(alice[0]), *conn())
    assert code == 0, err
    assert digest in out and sig_tag(digest) in out

    code, out, err = cli(capsys, "verify", ref, "--key", str(alice[1]), *conn())
    assert code == 0, err
    assert f"@{digest} is signed by {alice[1]} (cosign)" in out
    code, out, err = cli(capsys, "verify", f"{registry.host}/g/m@{digest}", "--key",
                         str(alice[1]), *conn())
    assert code == 0, err

    # Another key: exit 1, one line, no traceback.
    code, out, err = cli(capsys, "verify", ref, "--key", str(mallory[1]), *conn())
    assert code == 1
    assert err.count("\n") == 1 and "not signed by this key" in err and "Traceback" not in err
    # Any one of several keys will do.
    code, _, err = cli(capsys, "verify", ref, "--key", str(mallory[1]), "--key",
                       str(alice[1]), *conn())
    assert code == 0, err

    # Exactly cosign's shapes: the payload, one layer, the 233-byte config.
    sig = json.loads(get_manifest(registry, "g/m", sig_tag(digest)))
    assert sig["mediaType"] == OCI and "artifactType" not in sig and "subject" not in sig
    assert sig["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert sig["config"]["size"] == 233
    (layer,) = sig["layers"]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    payload = (b'{"critical":{"identity":{"docker-reference":"' + registry.host.encode()
               + b'/g/m"},"image":{"docker-manifest-digest":"' + digest.encode()
               + b'"},"type":"cosign container image signature"},"optional":null}')
    assert layer["digest"] == digests.of_bytes(payload) and layer["size"] == len(payload)
    signature = base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"])
    load_public(alice[1]).key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))

    # The same key again: not added twice. Another key: appended beside it.
    code, out, _ = cli(capsys, "sign", ref, "--key", str(alice[0]), *conn())
    assert code == 0 and "already signed by this key" in out
    assert len(json.loads(get_manifest(registry, "g/m", sig_tag(digest)))["layers"]) == 1
    code, _, err = cli(capsys, "sign", ref, "--key", str(mallory[0]), *conn())
    assert code == 0, err
    sig = json.loads(get_manifest(registry, "g/m", sig_tag(digest)))
    assert len(sig["layers"]) == 2
    config = json.loads(get_manifest_blob(registry, "g/m", sig["config"]["digest"]))
    assert config["rootfs"]["diff_ids"] == [x["digest"] for x in sig["layers"]]
    assert len(config["history"]) == 2
    for key in (alice, mallory):
        code, _, err = cli(capsys, "verify", ref, "--key", str(key[1]), *conn())
        assert code == 0, err


def get_manifest_blob(registry: Registry, repo: str, digest: str) -> bytes:
    with http(registry) as h:
        r = h.get(f"/v2/{repo}/blobs/{digest}")
        r.raise_for_status()
        return r.content


def test_a_signature_for_another_digest_does_not_count(registry: Registry, tmp_path: Path,
                                                        keys, capsys) -> None:
    a = push_files(registry, tmp_path, "g/m:a", {"config.json": b"a"})
    b = push_files(registry, tmp_path, "g/m:b", {"config.json": b"b"})
    alice = keys["alice"]
    assert cli(capsys, "sign", f"{registry.host}/g/m:a", "--key", str(alice[0]), *conn())[0] == 0
    # Whoever can push copies a's signature manifest under b's signature tag.
    put_manifest(registry, "g/m", sig_tag(b), get_manifest(registry, "g/m", sig_tag(a)))
    code, _, err = cli(capsys, "verify", f"{registry.host}/g/m:b", "--key", str(alice[1]),
                       *conn())
    assert code == 1 and f"no signature of {b} by this key" in err


def test_a_tampered_payload_does_not_count(registry: Registry, tmp_path: Path, keys,
                                           capsys) -> None:
    digest = push_files(registry, tmp_path, "g/m:v1", {"config.json": b"{}"})
    ref = f"{registry.host}/g/m:v1"
    alice = keys["alice"]
    assert cli(capsys, "sign", ref, "--key", str(alice[0]), *conn())[0] == 0
    original = get_manifest(registry, "g/m", sig_tag(digest))
    sig = json.loads(original)
    layer = sig["layers"][0]
    payload = get_manifest_blob(registry, "g/m", layer["digest"])

    # 1. Other payload bytes (same digest named inside), with alice's signature kept: a
    # new blob with its own digest, correctly described.
    changed = payload.replace(b'"optional":null', b'"optional":{"by":"mallory"}')
    layer2 = {**layer, "digest": put_blob(registry, "g/m", changed), "size": len(changed)}
    put_manifest(registry, "g/m", sig_tag(digest), json.dumps({**sig, "layers": [layer2]}).encode())
    code, _, err = cli(capsys, "verify", ref, "--key", str(alice[1]), *conn())
    assert code == 1 and "not signed by this key" in err

    # 2. The payload blob changed on the registry's disk (same size): its digest fails.
    put_manifest(registry, "g/m", sig_tag(digest), original)
    assert cli(capsys, "verify", ref, "--key", str(alice[1]), *conn())[0] == 0
    path = blob_data_path(registry, layer["digest"])
    flipped = bytearray(path.read_bytes())
    flipped[-3] ^= 0x01
    path.write_bytes(bytes(flipped))
    code, _, err = cli(capsys, "verify", ref, "--key", str(alice[1]), *conn())
    assert code == 1 and "not signed by this key" in err and "Traceback" not in err


def test_hostile_signature_tags(registry: Registry, tmp_path: Path, keys, capsys) -> None:
    digest = push_files(registry, tmp_path, "g/m:v1", {"config.json": b"{}"})
    ref = f"{registry.host}/g/m:v1"
    alice = keys["alice"]
    config = put_blob(registry, "g/m", b"{}")
    junk = put_blob(registry, "g/m", b"junk" * 10)
    big = put_blob(registry, "g/m", os.urandom(200_000))
    simple = "application/vnd.dev.cosign.simplesigning.v1+json"
    sig_annotation = "dev.cosignproject.cosign/signature"

    def layer(d: str, size: int, signature: object = "MEUCIQ==", media: str = simple) -> dict:
        return {"mediaType": media, "digest": d, "size": size,
                "annotations": {sig_annotation: signature}}

    manifests = {
        "junk layers": {"schemaVersion": 2, "mediaType": OCI,
                        "config": {"mediaType": "x", "digest": config, "size": 2},
                        "layers": [layer(junk, 40), layer(junk, 40, "not base64!"),
                                   layer(junk, 40, "A" * 4000), layer(junk, 40, media="text/plain"),
                                   layer(big, 200_000), layer(junk, -1)]},
    }
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": OCI, "digest": digest,
                            "size": len(get_manifest(registry, "g/m", "v1"))}]}
    for name, body in manifests.items():
        put_manifest(registry, "g/m", sig_tag(digest), json.dumps(body).encode())
        code, _, err = cli(capsys, "verify", ref, "--key", str(alice[1]), *conn())
        assert code == 1 and "not signed by this key" in err, name
        assert "Traceback" not in err and err.count("\n") == 1
    put_manifest(registry, "g/m", sig_tag(digest), json.dumps(index).encode(),
                 "application/vnd.oci.image.index.v1+json")
    code, _, err = cli(capsys, "verify", ref, "--key", str(alice[1]), *conn())
    assert code == 1 and "an index" in err and err.count("\n") == 1
    # Signing refuses to overwrite what it cannot read as a signature manifest.
    code, _, err = cli(capsys, "sign", ref, "--key", str(alice[0]), *conn())
    assert code == 1 and "remove it before signing" in err


def test_junk_beside_a_real_signature_is_skipped(registry: Registry, tmp_path: Path, keys,
                                                  capsys) -> None:
    digest = push_files(registry, tmp_path, "g/m:v1", {"config.json": b"{}"})
    ref = f"{registry.host}/g/m:v1"
    alice = keys["alice"]
    assert cli(capsys, "sign", ref, "--key", str(alice[0]), *conn())[0] == 0
    sig = json.loads(get_manifest(registry, "g/m", sig_tag(digest)))
    junk = put_blob(registry, "g/m", b"not a payload")
    lost = put_blob(registry, "g/m", b"a blob the registry then loses")
    for d, size in ((junk, 13), (junk, 5), (lost, 30)):
        sig["layers"].insert(0, {"mediaType": sig["layers"][0]["mediaType"], "digest": d,
                                 "size": size, "annotations": {
                                     "dev.cosignproject.cosign/signature": "MEUCIQ=="}})
    put_manifest(registry, "g/m", sig_tag(digest), json.dumps(sig).encode())
    shutil.rmtree(blob_data_path(registry, lost).parent)
    assert cli(capsys, "verify", ref, "--key", str(alice[1]), *conn())[0] == 0


@pytest.mark.parametrize("kind", ["rsa", "ed25519", "p384", "private-for-verify",
                                  "public-for-sign", "missing", "garbage", "encrypted"])
def test_bad_keys_are_one_line_usage_errors(registry_session: Registry, tmp_path: Path,
                                            kind: str, capsys) -> None:
    ref = f"{registry_session.host}/keys/m:v1"
    if kind == "rsa":
        private, public = write_key(tmp_path, "k", rsa.generate_private_key(65537, 2048))
    elif kind == "ed25519":
        private, public = write_key(tmp_path, "k", ed25519.Ed25519PrivateKey.generate())
    elif kind == "p384":
        private, public = write_key(tmp_path, "k", ec.generate_private_key(ec.SECP384R1()))
    else:
        private, public = write_key(tmp_path, "k", ec.generate_private_key(ec.SECP256R1()))
    if kind == "private-for-verify":
        public = private
    elif kind == "public-for-sign":
        private = public
    elif kind == "missing":
        private = public = tmp_path / "nope.pem"
    elif kind == "garbage":
        private.write_bytes(b"hello")
        public = private
    elif kind == "encrypted":
        key = ec.generate_private_key(ec.SECP256R1())
        private.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw")))
    commands = [] if kind == "private-for-verify" else [("sign", private), ("index", private)]
    if kind not in ("p384", "public-for-sign", "encrypted"):  # a P-384 public key verifies
        commands.append(("verify", public))                  # model-signing signatures
    for command, key_file in commands:
        code, out, err = cli(capsys, command, ref, "--key", str(key_file), *conn())
        assert code == 2, (command, err)
        assert err.startswith("galleryfs: error: key ") and err.count("\n") == 1, err
        assert "Traceback" not in err


def test_harbor_412_for_unsigned_artifacts_is_said_in_plain_words(
        registry: Registry, tmp_path: Path, capsys) -> None:
    push_files(registry, tmp_path, "g/m:v1", {"config.json": b"{}"})
    with FaultProxy(registry.url) as proxy:
        proxy.fail(r"^GET /v2/g/m/manifests/", 1, status=412)
        code, _, err = cli(capsys, "pull", f"{proxy.host}/g/m:v1", str(tmp_path / "out"),
                           *conn())
        assert code == 1 and err.count("\n") == 1
        assert "refuses unsigned artifacts in this project (HTTP 412)" in err
        assert "galleryfs sign" in err
        proxy.fail(r"^GET /v2/g/m/blobs/", 1, status=412)
        code, _, err = cli(capsys, "pull", f"{proxy.host}/g/m:v1", str(tmp_path / "out2"),
                           *conn())
        assert code == 1 and "(HTTP 412)" in err


# ---- accessories: not revisions ------------------------------------------------------------


def test_ls_hides_accessories_and_rm_takes_them_along(registry: Registry, tmp_path: Path,
                                                      keys, capsys) -> None:
    big = os.urandom((5 << 20) + 123)
    digest = push_files(registry, tmp_path, "g/m:v1", {"w.bin": big})
    other = push_files(registry, tmp_path, "g/m:v2", {"w.bin": b"small"})
    ref = f"{registry.host}/g/m:v1"
    alice = keys["alice"]
    assert cli(capsys, "sign", ref, "--key", str(alice[0]), *conn())[0] == 0
    assert cli(capsys, "sign", f"{registry.host}/g/m:v2", "--key", str(alice[0]), *conn())[0] == 0
    code, out, err = cli(capsys, "index", ref, "--key", str(alice[0]), *conn())
    assert code == 0, err
    hexpart = digest.split(":")[1]
    referrer = json.loads(get_manifest(registry, "g/m", f"sha256-{hexpart}.chunks"))
    referrer_digest = digests.of_bytes(get_manifest(registry, "g/m", f"sha256-{hexpart}.chunks"))
    referrer_sig = sig_tag(referrer_digest)
    assert referrer["subject"]["digest"] == digest
    assert set(tags(registry, "g/m")) == {"v1", "v2", sig_tag(digest), sig_tag(other),
                                         f"sha256-{hexpart}.chunks", referrer_sig}

    code, out, _ = cli(capsys, "ls", f"{registry.host}/g/m", "--json", *conn())
    rows = json.loads(out)
    assert sorted(r["digest"] for r in rows) == sorted([digest, other])
    assert sorted(t for r in rows for t in r["tags"]) == ["v1", "v2"]

    code, out, err = cli(capsys, "rm", f"{registry.host}/g/m@{digest}", *conn())
    assert code == 0, err
    for accessory in (sig_tag(digest), f"sha256-{hexpart}.chunks", referrer_sig):
        assert accessory in out
    assert sig_tag(other) not in out
    assert tags(registry, "g/m") == sorted(["v2", sig_tag(other)])

    # A registry that cannot untag alone removes the revision with its last tag: its
    # signature goes too, and the message says so.
    code, out, err = cli(capsys, "rm", f"{registry.host}/g/m:v2", *conn())
    assert code == 0, err
    assert "gone with it" in out and sig_tag(other) in out
    assert tags(registry, "g/m") == []


def test_a_revision_cannot_be_tagged_like_an_accessory(registry_session: Registry,
                                                       tmp_path: Path, capsys) -> None:
    digest = push_files(registry_session, tmp_path, "acc/m:v1", {"a": b"1"})
    code, _, err = cli(capsys, "tag", f"{registry_session.host}/acc/m:v1", sig_tag(digest),
                       *conn())
    assert code == 2 and "kept for signatures and referrers" in err
    assert sig_tag(digest) not in tags(registry_session, "acc/m")


def test_rm_never_takes_a_revision_along(registry: Registry, tmp_path: Path, capsys) -> None:
    a = push_files(registry, tmp_path, "g/m:a", {"config.json": b"a"})
    b = push_files(registry, tmp_path, "g/m:b", {"config.json": b"b"})
    # A mistaken (or hostile) accessory tag of a naming revision b.
    put_manifest(registry, "g/m", sig_tag(a), get_manifest(registry, "g/m", "b"))
    code, out, err = cli(capsys, "rm", f"{registry.host}/g/m@{a}", *conn())
    assert code == 0, err
    assert "b" in tags(registry, "g/m") and digests.of_bytes(get_manifest(registry, "g/m", "b")) == b


# ---- chunk tables for an existing revision -------------------------------------------------


async def _tree_files(registry: Registry, repo: str, tag: str, public: list[Path]
                      ) -> dict[str, ChunkTable | None]:
    keys = tuple(load_public(p) for p in public)
    async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
        source = RegistrySource(client, keys)
        tree = Tree(source, repo, policy=Policy(keys), voucher=source)
        node = await tree.lookup(1, tag)
        rev = await tree.lookup(1, node.digest)
        out = {}
        for name, inode in await tree.listdir(rev.inode):
            f = tree.get(inode).file
            assert f is not None
            out[name] = f.table
        return out


def test_index_attaches_signed_tables_the_mount_uses(registry: Registry, tmp_path: Path,
                                                     keys, capsys) -> None:
    data = os.urandom((9 << 20) + 4321)  # three 4 MiB chunks
    digest = push_files(registry, tmp_path, "g/m:v1", {"w.bin": data, "small.json": b"{}"})
    ref = f"{registry.host}/g/m:v1"
    alice, mallory = keys["alice"], keys["mallory"]
    assert parse_manifest(digest, get_manifest(registry, "g/m", "v1")).files[1].table is None

    code, out, err = cli(capsys, "index", ref, "--key", str(alice[0]), *conn())
    assert code == 0, err
    assert "chunk tables for 1 files" in out and ".chunks" in out
    assert cli(capsys, "sign", ref, "--key", str(alice[0]), *conn())[0] == 0

    expected = ChunkTable.of_bytes(data, 4 << 20)
    got = trio.run(_tree_files, registry, "g/m", "v1", [alice[1]])
    assert got == {"small.json": None, "w.bin": expected}
    # Another key signed nothing here: the revision is refused (its tag hidden).
    with pytest.raises(NotFound):
        trio.run(_tree_files, registry, "g/m", "v1", [mallory[1]])

    # A referrer made for another revision, copied under this one's .chunks tag: its
    # subject is not this revision, so its tables are not used, signed or not.
    other = push_files(registry, tmp_path, "g/m:v2", {"w.bin": data[::-1], "small.json": b"{}"})
    assert cli(capsys, "index", f"{registry.host}/g/m:v2", "--key", str(alice[0]), *conn())[0] == 0
    assert cli(capsys, "sign", f"{registry.host}/g/m:v2", "--key", str(alice[0]), *conn())[0] == 0
    hexes = digest.split(":")[1], other.split(":")[1]
    put_manifest(registry, "g/m", f"sha256-{hexes[0]}.chunks",
                 get_manifest(registry, "g/m", f"sha256-{hexes[1]}.chunks"))
    assert trio.run(_tree_files, registry, "g/m", "v1", [alice[1]])["w.bin"] is None


def test_index_tables_signed_by_an_untrusted_key_are_not_used(registry: Registry,
                                                             tmp_path: Path, keys,
                                                             capsys) -> None:
    data = os.urandom((5 << 20) + 1)
    push_files(registry, tmp_path, "g/m:v1", {"w.bin": data})
    ref = f"{registry.host}/g/m:v1"
    alice, mallory = keys["alice"], keys["mallory"]
    assert cli(capsys, "sign", ref, "--key", str(alice[0]), *conn())[0] == 0
    assert cli(capsys, "index", ref, "--key", str(mallory[0]), *conn())[0] == 0
    assert trio.run(_tree_files, registry, "g/m", "v1", [alice[1]]) == {"w.bin": None}


def test_index_checks_each_blob_it_reads(registry: Registry, tmp_path: Path, keys,
                                         capsys) -> None:
    data = os.urandom((5 << 20) + 1)
    push_files(registry, tmp_path, "g/m:v1", {"w.bin": data})
    path = blob_data_path(registry, digests.of_bytes(data))
    flipped = bytearray(path.read_bytes())
    flipped[1 << 20] ^= 0xFF
    path.write_bytes(bytes(flipped))
    code, _, err = cli(capsys, "index", f"{registry.host}/g/m:v1", "--key",
                       str(keys["alice"][0]), *conn())
    assert code == 1 and "does not match its digest" in err
    assert not [t for t in tags(registry, "g/m") if t.endswith(".chunks")]


def test_index_of_a_revision_that_needs_no_table(registry_session: Registry, tmp_path: Path,
                                                 keys, capsys) -> None:
    push_files(registry_session, tmp_path, "idx/small:v1", {"config.json": b"{}"})
    code, out, err = cli(capsys, "index", f"{registry_session.host}/idx/small:v1", "--key",
                         str(keys["alice"][0]), *conn())
    assert code == 0 and "no file needs a chunk table" in out


def test_tables_decoded_from_a_signed_referrer_must_fit() -> None:
    table = ChunkTable.of_bytes(b"x" * ((4 << 20) + 1), 4 << 20)
    d = "sha256:" + "a" * 64
    body = chunks.encode_tables({d: ((4 << 20) + 1, table)})
    assert chunks.decode_tables(body) == {d: ((4 << 20) + 1, table)}
    # A size the digests do not fit, junk entries: left out.
    bad = json.dumps({d: {"size": 10 << 20, "chunkSize": 4 << 20,
                          "sha256": base64.b64encode(table.digests).decode()},
                      "nope": {"size": 1}, "sha256:" + "b" * 64: "x"}).encode()
    assert chunks.decode_tables(bad) == {}


# ---- OpenSSF model-signing --------------------------------------------------------------------


def _sign_with_library(model: Path, private: Path) -> None:
    import model_signing

    sig = model / "model.sig"
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=[sig],
                                                              ignore_git_paths=True)
    model_signing.signing.Config().use_elliptic_key_signer(private_key=private) \
        .set_hashing_config(hashing).sign(model, sig)


def _model(tmp_path: Path, name: str) -> Path:
    model = tmp_path / name
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"hidden_size": 8}\n')
    (model / "model.safetensors").write_bytes(os.urandom(300_000))
    (model / "sub" / "tokenizer.json").write_text('{"vocab": {}}\n')
    return model


def test_model_signing_signature_verified_from_layer_digests(registry: Registry,
                                                              tmp_path: Path, keys,
                                                              capsys) -> None:
    alice, mallory = keys["alice"], keys["mallory"]
    model = _model(tmp_path, "signed")
    _sign_with_library(model, alice[0])
    push_dir(registry, model, "g/ms:v1")
    ref = f"{registry.host}/g/ms:v1"

    code, out, err = cli(capsys, "verify", ref, "--key", str(alice[1]), *conn())
    assert code == 0, err
    assert "(model-signing)" in out
    code, _, err = cli(capsys, "verify", ref, "--key", str(mallory[1]), *conn())
    assert code == 1 and "model.sig is not signed by this key" in err

    # The other way: pulled by galleryfs, verified by the library.
    import model_signing

    out_dir = tmp_path / "pulled"
    assert cli(capsys, "pull", ref, str(out_dir), *conn())[0] == 0
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=alice[1]).verify(
        out_dir, out_dir / "model.sig")

    # A file changed after signing: its layer digest is not the signed one.
    changed = _model(tmp_path, "changed")
    _sign_with_library(changed, alice[0])
    (changed / "sub" / "tokenizer.json").write_text('{"vocab": {"evil": 1}}\n')
    push_dir(registry, changed, "g/ms:changed")
    code, _, err = cli(capsys, "verify", f"{registry.host}/g/ms:changed", "--key",
                       str(alice[1]), *conn())
    assert code == 1 and "sub/tokenizer.json: its layer digest" in err

    # A file added after signing: in the revision, not signed.
    extra = _model(tmp_path, "extra")
    _sign_with_library(extra, alice[0])
    (extra / "evil.py").write_text("import os\n")
    push_dir(registry, extra, "g/ms:extra")
    code, _, err = cli(capsys, "verify", f"{registry.host}/g/ms:extra", "--key",
                       str(alice[1]), *conn())
    assert code == 1 and "evil.py is in the revision but not signed" in err

    # A manifest whose layer names another digest than the signed one (a layer swapped
    # by whoever can push): refused without reading the file.
    m = json.loads(get_manifest(registry, "g/ms", "v1"))
    for layer in m["layers"]:
        if layer["annotations"]["org.cncf.model.filepath"] == "config.json":
            fake = b'{"hidden_size": 9}\n'
            layer["digest"], layer["size"] = put_blob(registry, "g/ms", fake), len(fake)
    put_manifest(registry, "g/ms", "swapped", json.dumps(m).encode())
    code, _, err = cli(capsys, "verify", f"{registry.host}/g/ms:swapped", "--key",
                       str(alice[1]), *conn())
    assert code == 1 and "config.json: its layer digest" in err


def test_model_signing_with_a_p384_key(registry_session: Registry, tmp_path: Path,
                                       capsys) -> None:
    private, public = write_key(tmp_path, "p384", ec.generate_private_key(ec.SECP384R1()))
    model = _model(tmp_path, "m384")
    _sign_with_library(model, private)
    push_dir(registry_session, model, "ms384/m:v1")
    code, out, err = cli(capsys, "verify", f"{registry_session.host}/ms384/m:v1", "--key",
                         str(public), *conn())
    assert code == 0 and "(model-signing)" in out, err


def test_cosign_sign_and_verify_at_the_api(registry_session: Registry, tmp_path: Path,
                                           keys) -> None:
    """`cosign.verify` answers Found(None) for an unsigned digest, never raises."""
    digest = push_files(registry_session, tmp_path, "api/m:v1", {"a": b"1"})
    from galleryfs.trust.keys import load_private

    async def go() -> None:
        async with RegistryClient(registry_session.host, ClientOptions(plain_http=True)) as c:
            key = load_private(keys["alice"][0])
            found = await cosign.verify(c, "api/m", digest, [key.public])
            assert found.key is None and "no signature" in found.reason
            signed = await cosign.sign(c, "api/m", digest, key)
            assert signed.added and signed.tag == sig_tag(digest)
            found = await cosign.verify(c, "api/m", digest, [key.public])
            assert found.key == key.public

    trio.run(go)


def test_rm_never_takes_a_revision_tagged_like_an_accessory(registry: Registry, tmp_path: Path,
                                                            capsys) -> None:
    """A tag's name is a claim: a real revision, reachable only by a tag shaped like an
    accessory of the one removed (oras can push such a tag), stays."""
    target = push_files(registry, tmp_path, "g/m:v1", {"a.bin": b"target"})
    victim = push_files(registry, tmp_path, "g/m:victim", {"a.bin": b"victim"})
    body = get_manifest(registry, "g/m", "victim")
    with http(registry) as h:  # untag it: only the manifest goes, its blobs stay linked
        assert h.delete(f"/v2/g/m/manifests/{victim}").status_code == 202
    lure = "sha256-" + target.split(":")[1] + ".x"
    put_manifest(registry, "g/m", lure, body)
    code, out, err = cli(capsys, "rm", f"{registry.host}/g/m@{target}", *conn())
    assert code == 0, err
    assert lure not in out
    assert digests.of_bytes(get_manifest(registry, "g/m", victim)) == victim
