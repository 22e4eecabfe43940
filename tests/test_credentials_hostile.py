"""Credentials go only to the registry and the token service it names, only when asked:
redirect targets, a stranger's realm, an http:// realm, the Harbor probe, `auth.json` on
disk, tokens that expire and passwords that rotate (`--password-file`).

Every registry here is the real `docker-registry`; the hostile parts (tests/hostile_auth.py)
are small loopback servers in front of it or beside it.
"""

from __future__ import annotations

import errno
import io
import json
import os
import ssl
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from galleryfs import gallery, modelpack
from galleryfs.cli import main
from galleryfs.reference import parse
from galleryfs.registry import credentials
from galleryfs.registry.client import ClientOptions, RegistryClient
from galleryfs.registry.credentials import Credentials
from tests.hostile_auth import Front, ShortTokenServer, Stranger
from tests.mounting import isolated_env, mounted
from tests.registry_harness import Registry

REPO = "g/m"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


@pytest.fixture
def short_token_registry() -> Iterator[Registry]:
    """A token registry whose tokens the registry refuses 2 s after issue, while the token
    service claims 300 s (a clock behind): clients meet the expiry as a 401."""
    ts = ShortTokenServer(lifetime=2, claimed=300)
    ts.start()
    reg = Registry("token", token_server=ts)
    try:
        reg.start()
        yield reg
    finally:
        reg.close()
        ts.stop()


def _model(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "bert"}')
    (src / "weights.bin").write_bytes(b"\x80" + os.urandom(300_000))
    (src / "more.bin").write_bytes(b"\x81" + os.urandom(100_000))
    return src


def _options(reg: Registry) -> ClientOptions:
    creds = Credentials(reg.username, reg.password) if reg.username and reg.password else None
    return ClientOptions(plain_http=True, credentials=creds)


def _push(reg: Registry, src: Path, ref: str = f"{REPO}:v1") -> dict[str, str]:
    """Push straight to the registry; the blob digest of each file."""
    async def go() -> dict[str, str]:
        async with RegistryClient(reg.host, _options(reg)) as client:
            result = await gallery.push(client, src, parse(f"{reg.host}/{ref}"))
            m = await client.get_manifest(ref.split(":")[0], result.digest)
        revision = modelpack.parse_manifest(m.digest, m.body, m.media_type)
        return {f.path: f.digest for f in revision.files}

    return trio.run(go)


def _login_args(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{reg.password}\n"))
    return ["--plain-http", "-u", str(reg.username), "--password-stdin"]


# ---- redirect targets and strangers' realms get nothing ---------------------------------


def test_a_redirect_target_naming_a_realm_gets_no_token_fetch_from_pull(
        basic_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    reg = basic_registry
    digests = _push(reg, _model(tmp_path))
    with Front(reg.url) as front, Stranger() as third, Stranger() as storage:
        storage.challenge = f'Bearer realm="{third.url}/token",service="harvest"'
        front.redirect_to = storage.url
        front.redirect_digests = {digests["weights.bin"]}
        code = main(["pull", f"{front.host}/{REPO}:v1", str(tmp_path / "out"),
                     *_login_args(reg, monkeypatch)])
        err = capsys.readouterr().err
        assert code == 1 and "redirected to" in err and "refused access" in err, err
        assert err.count("\n") == 1, err  # one line, no traceback
        assert storage.seen and storage.authorizations() == [None] * len(storage.seen)
        assert third.seen == []  # no token fetch, with or without the password
        # The registry itself got the password it challenged for, and not before.
        assert front.seen[0].authorization is None
        assert any((a or "").startswith("Basic ") for a in front.authorizations("/manifests/"))
    assert not (tmp_path / "out").exists()


def test_a_redirect_targets_basic_challenge_sends_no_password_to_the_registry(
        token_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry asked for tokens; blob storage asking for Basic must not make the
    client send the password to the registry (nor to the storage)."""
    reg = token_registry
    digests = _push(reg, _model(tmp_path))
    with Front(reg.url) as front, Stranger('Basic realm="storage"') as storage:
        front.redirect_to = storage.url
        front.redirect_digests = {digests["weights.bin"]}
        code = main(["pull", f"{front.host}/{REPO}:v1", str(tmp_path / "out"),
                     *_login_args(reg, monkeypatch)])
        err = capsys.readouterr().err
        assert code == 1 and "redirected to" in err, err
        assert storage.seen and storage.authorizations() == [None] * len(storage.seen)
        sent = front.authorizations()
        assert any((a or "").startswith("Bearer ") for a in sent)
        assert not any((a or "").startswith("Basic ") for a in sent), sent


def _tls_context(tmp_path: Path) -> tuple[ssl.SSLContext, str]:
    import trustme

    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ctx, str(ca_file)


def test_an_https_registry_naming_an_http_realm_gets_no_password(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, ca_file = _tls_context(tmp_path)
    with Stranger() as realm, Stranger(tls=ctx) as registry:
        registry.challenge = f'Bearer realm="{realm.url}/token",service="reg"'
        monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret\n"))
        code = main(["ls", f"{registry.host}/g", "--ca-file", ca_file, "-u", "ann",
                     "--password-stdin"])
        err = capsys.readouterr().err
        assert code == 1 and "http:// token service" in err, err
        assert registry.seen and all(a is None for a in registry.authorizations())
        assert realm.seen == []


@pytest.mark.mount
def test_a_mount_read_redirected_to_a_stranger_fails_with_eio_and_leaks_nothing(
        basic_registry: Registry, tmp_path: Path) -> None:
    reg = basic_registry
    src = _model(tmp_path)
    digests = _push(reg, src)
    env = isolated_env(tmp_path)  # the same config folder as this test's
    with Front(reg.url) as front, Stranger() as third, Stranger() as storage:
        credentials.save(front.host, Credentials(str(reg.username), str(reg.password)))
        storage.challenge = f'Bearer realm="{third.url}/token",service="harvest"'
        front.redirect_to = storage.url
        front.redirect_digests = {digests["weights.bin"]}
        with mounted(f"{front.host}/{REPO}", tmp_path / "mnt", env, "--plain-http",
                     "--cache-dir", str(tmp_path / "c")) as mnt:
            revision = mnt / "v1"
            # Authenticated: the files the registry serves itself read fine.
            assert (revision / "more.bin").read_bytes() == (src / "more.bin").read_bytes()
            fallbacks = _stats(mnt)["direct_fallbacks"]
            with pytest.raises(OSError) as exc:
                (revision / "weights.bin").read_bytes()
            # The direct path asked the registry, got the 302 and handed the read to httpx.
            assert _stats(mnt)["direct_fallbacks"] > fallbacks
        assert storage.seen and storage.authorizations() == [None] * len(storage.seen)
        assert third.seen == []
        assert exc.value.errno == errno.EIO  # the storage failed, not the user's password
        # Both paths sent the registry the credentials it asked for; httpx followed the
        # 302 without them.
        blob_gets = front.authorizations(digests["weights.bin"])
        assert blob_gets and all((a or "").startswith("Basic ") for a in blob_gets)


def _stats(mnt: Path) -> dict:
    return json.loads(os.getxattr(mnt, "user.galleryfs.stats"))


# ---- no password before a challenge: the Harbor probe -----------------------------------


def test_the_harbor_probe_gets_no_password_before_it_is_known_to_be_harbor(
        registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    src = _model(tmp_path)
    for name in ("alpha/m1", "alpha/m2", "beta/m3"):
        _push(registry, src, f"{name}:v1")
    with Front(registry.url) as front:
        front.harbor = ("robot$ci", "hunter2")
        monkeypatch.setattr(sys, "stdin", io.StringIO("hunter2\n"))
        code = main(["ls", front.host, "--plain-http", "--json", "-u", "robot$ci",
                     "--password-stdin"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(out) == [{"gallery": "alpha", "models": 2},
                                   {"gallery": "beta", "models": 1}]
        probes = front.authorizations(r"^/api/v2\.0/projects\?")
        # Asked anonymously first; once it answered as Harbor's API does, with Basic.
        assert probes[0] is None and (probes[1] or "").startswith("Basic "), probes
        # The registry never challenged: nothing went to /v2/ with a password.
        assert not any(front.authorizations(r"^/v2/"))


def test_a_401_on_the_harbor_probe_means_not_harbor(
        registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _push(registry, _model(tmp_path))
    with Front(registry.url) as front:
        front.api_unauthorized = True
        monkeypatch.setattr(sys, "stdin", io.StringIO("hunter2\n"))
        code = main(["ls", front.host, "--plain-http", "--json", "-u", "ann", "--password-stdin"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(out) == [{"gallery": "g", "models": 1}]
        assert front.authorizations("^/api/") and not any(front.authorizations())


# ---- auth.json --------------------------------------------------------------------------


# Temp names galleryfs wrote through before (`auth.json` with its suffix swapped), and
# the obvious one: traps planted at both.
_OLD_TEMPS = ("auth.tmp", "auth.json.tmp")


def _private_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "config" / "galleryfs"
    folder.mkdir(parents=True, mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def test_auth_json_is_0600_whatever_temp_file_was_there(tmp_path: Path) -> None:
    folder = _private_folder(tmp_path)
    for name in _OLD_TEMPS:
        (folder / name).write_text("{}")
        os.chmod(folder / name, 0o644)
    path = credentials.save("reg.example", Credentials("ann", "s3cret"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert credentials.lookup("reg.example") == Credentials("ann", "s3cret")
    assert sorted(p.name for p in folder.iterdir()) == sorted(["auth.json", *_OLD_TEMPS])


def test_auth_json_never_writes_through_a_symlink(tmp_path: Path) -> None:
    folder = _private_folder(tmp_path)
    victims = []
    for name in _OLD_TEMPS:
        victim = tmp_path / f"victim-{name}"
        victim.write_text("untouched")
        (folder / name).symlink_to(victim)
        victims.append(victim)
    path = credentials.save("reg.example", Credentials("ann", "s3cret"))
    assert not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600
    credentials.remove("reg.example")
    assert credentials.lookup("reg.example") is None
    assert [v.read_text() for v in victims] == ["untouched"] * len(victims)


def test_a_new_store_folder_is_0700_and_an_open_one_is_refused(
        basic_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    reg = basic_registry
    old = os.umask(0o002)  # a permissive umask: the folder is 0700 anyway
    try:
        path = credentials.save("first.example", Credentials("ann", "x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    os.chmod(path.parent, 0o755)
    code = main(["login", reg.host, *_login_args(reg, monkeypatch)])
    err = capsys.readouterr().err
    assert code == 2 and "other users may access it" in err and "chmod 700" in err, err
    assert credentials.lookup(reg.host) is None  # nothing stored


# ---- expiring tokens, rotating passwords ------------------------------------------------


def test_pull_outlives_its_token_and_picks_up_a_rotated_password(
        short_token_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = short_token_registry
    ts = reg.token_server
    assert isinstance(ts, ShortTokenServer)
    src = _model(tmp_path)
    _push(reg, src)
    pw = tmp_path / "pw"
    pw.write_text(f"{reg.password}\n")
    new = "rotated-" + os.urandom(4).hex()

    def expire_and_rotate() -> None:  # in the middle of the pull, before a blob GET
        ts.wait_until_expired()
        ts.password = new
        pw.write_text(f"{new}\n")

    with Front(reg.url) as front:
        front.hold_blob = expire_and_rotate
        issued = ts.tokens_issued
        code = main(["pull", f"{front.host}/{REPO}:v1", str(tmp_path / "out"), "--plain-http",
                     "--quiet", "-u", str(reg.username), "--password-file", str(pw)])
        assert code == 0, capsys.readouterr().err
        assert front.hold_blob is None  # the pull did straddle the expiry
    assert ts.tokens_issued > issued + 1  # a second token, with the new password
    for name in ("config.json", "weights.bin", "more.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.mount
def test_a_mount_outlives_its_tokens_and_picks_up_rotated_passwords(
        short_token_registry: Registry, tmp_path: Path) -> None:
    reg = short_token_registry
    ts = reg.token_server
    assert isinstance(ts, ShortTokenServer)
    src = _model(tmp_path)
    _push(reg, src)
    env = isolated_env(tmp_path)
    pw = tmp_path / "pw"
    pw.write_text(f"{reg.password}\n")
    with mounted(f"{reg.host}/{REPO}", tmp_path / "mnt", env, "--plain-http",
                 "--cache-dir", str(tmp_path / "c"), "-u", str(reg.username),
                 "--password-file", str(pw), "--refresh", "1") as mnt:
        revision = mnt / "v1"
        assert (revision / "config.json").read_bytes() == (src / "config.json").read_bytes()
        for name in ("weights.bin", "more.bin"):
            # Tokens issued so far are refused from now on, and the old password too.
            new = "rotated-" + os.urandom(4).hex()
            ts.password = new
            pw.write_text(f"{new}\n")
            ts.wait_until_expired()
            issued = ts.tokens_issued
            assert (revision / name).read_bytes() == (src / name).read_bytes()
            assert ts.tokens_issued > issued
        assert "v1" in os.listdir(mnt)  # a listing after the expiry, too


@pytest.mark.mount
def test_a_mount_picks_up_a_rotated_basic_password(basic_registry: Registry,
                                                   tmp_path: Path) -> None:
    reg = basic_registry
    src = _model(tmp_path)
    _push(reg, src)
    env = isolated_env(tmp_path)
    pw = tmp_path / "pw"
    pw.write_text(f"{reg.password}\n")
    with mounted(f"{reg.host}/{REPO}", tmp_path / "mnt", env, "--plain-http",
                 "--cache-dir", str(tmp_path / "c"), "-u", str(reg.username),
                 "--password-file", str(pw)) as mnt:
        revision = mnt / "v1"
        assert (revision / "more.bin").read_bytes() == (src / "more.bin").read_bytes()
        reg.password = "rotated-" + os.urandom(4).hex()
        reg._write_htpasswd()  # the registry reads htpasswd again when it changes
        pw.write_text(f"{reg.password}\n")
        assert (revision / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()


def test_password_file_errors_are_one_line(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for args, message in (
            (["--password-file", str(tmp_path / "missing")], "--username"),
            (["-u", "ann", "--password-file", str(tmp_path / "missing")], "No such file"),
            (["-u", "ann", "--password-file", str(empty)], "no password in it"),
            (["-u", "ann", "--password-file", str(empty), "--password-stdin"], "choose one")):
        code = main(["ls", "127.0.0.1:9/g", "--plain-http", *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_password_file_caught_empty_keeps_the_password_and_a_lost_one_fails(
        tmp_path: Path) -> None:
    from galleryfs.errors import AuthError
    from galleryfs.registry.auth import RegistryAuth

    pw = tmp_path / "pw"
    pw.write_text("first\n")
    auth = RegistryAuth(Credentials("ann", "first", password_file=str(pw)), "http://127.0.0.1:9")
    pw.write_text("second\r\n")
    assert trio.run(auth._reread) and auth.credentials is not None
    assert auth.credentials.password == "second"
    pw.write_text("")  # between a truncate and a write
    assert not trio.run(auth._reread) and auth.credentials.password == "second"
    pw.unlink()
    with pytest.raises(AuthError, match="cannot read the password file"):
        trio.run(auth._reread)
    assert "second" not in repr(auth.credentials)
