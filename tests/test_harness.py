"""Tests for the registry test harness itself (tests/registry_harness.py)."""

from __future__ import annotations

import hashlib
import socket
import ssl
import stat
from pathlib import Path
from urllib.parse import urljoin

import httpx
import jwt
import pytest

from tests.registry_harness import (
    Registry,
    RegistryStartupError,
    TokenServer,
    child_registry_pids,
    free_port,
    live_objects,
)

pytestmark = pytest.mark.timeout(120)


def client(**kwargs: object) -> httpx.Client:
    # trust_env=False: never route 127.0.0.1 through a proxy from the environment.
    return httpx.Client(trust_env=False, timeout=10.0, **kwargs)  # type: ignore[arg-type]


def upload_blob(
    c: httpx.Client, base: str, repo: str, data: bytes, headers: dict[str, str] | None = None
) -> str:
    """Monolithic blob upload (POST + PUT); returns the digest."""
    headers = headers or {}
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = c.post(f"{base}/v2/{repo}/blobs/uploads/", headers=headers)
    assert r.status_code == 202, r.text
    location = urljoin(base + "/", r.headers["Location"])
    sep = "&" if "?" in location else "?"
    r = c.put(
        f"{location}{sep}digest={digest}",
        content=data,
        headers={**headers, "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == digest
    return digest


def port_is_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------
# plain
# --------------------------------------------------------------------------


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_plain_registry_attributes_and_v2(registry: Registry) -> None:
    assert registry.mode == "plain"
    assert registry.plain_http is True
    assert registry.ca_file is None
    assert registry.username is None and registry.password is None
    assert registry.host == f"127.0.0.1:{registry.port}"
    assert registry.url == f"http://{registry.host}"
    assert Path(registry.storage_dir).is_dir()
    assert registry.running
    with client() as c:
        r = c.get(f"{registry.url}/v2/")
    assert r.status_code == 200
    assert r.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


def test_plain_blob_upload_and_range_get(registry: Registry) -> None:
    data = b"hello galleryfs"
    with client() as c:
        digest = upload_blob(c, registry.url, "t/m", data)
        r = c.head(f"{registry.url}/v2/t/m/blobs/{digest}")
        assert r.status_code == 200
        assert int(r.headers["Content-Length"]) == len(data)
        r = c.get(f"{registry.url}/v2/t/m/blobs/{digest}", headers={"Range": "bytes=1-2"})
        assert r.status_code == 206
        assert r.content == data[1:3] == b"el"
        r = c.get(f"{registry.url}/v2/t/m/blobs/{digest}")
        assert r.status_code == 200
        assert r.content == data
        missing = "sha256:" + "0" * 64
        assert c.get(f"{registry.url}/v2/t/m/blobs/{missing}").status_code == 404
    # data really lands in our storage dir
    blobs = list(Path(registry.storage_dir).rglob("data"))
    assert any(p.read_bytes() == data for p in blobs)


def test_session_registry_is_shared(registry_session: Registry) -> None:
    with client() as c:
        digest = upload_blob(c, registry_session.url, "harness/session", b"session-data")
        r = c.get(f"{registry_session.url}/v2/harness/session/blobs/{digest}")
    assert r.status_code == 200 and r.content == b"session-data"


def test_session_registry_still_has_data(registry_session: Registry) -> None:
    digest = "sha256:" + hashlib.sha256(b"session-data").hexdigest()
    with client() as c:
        r = c.get(f"{registry_session.url}/v2/harness/session/blobs/{digest}")
    assert r.status_code == 200 and r.content == b"session-data"


def test_restart_keeps_port_and_data(registry: Registry) -> None:
    data = b"survives restarts"
    host_before = registry.host
    with client() as c:
        digest = upload_blob(c, registry.url, "t/restart", data)
        registry.stop()
        assert not registry.running
        assert not port_is_open(registry.port)
        with pytest.raises(httpx.ConnectError):
            c.get(f"{registry.url}/v2/")
        registry.restart()
        assert registry.running
        assert registry.host == host_before
        r = c.get(f"{registry.url}/v2/t/restart/blobs/{digest}")
    assert r.status_code == 200
    assert r.content == data


def test_restart_while_running(registry: Registry) -> None:
    assert registry.process is not None
    pid = registry.process.pid
    registry.restart()
    assert registry.process is not None and registry.process.pid != pid
    with client() as c:
        assert c.get(f"{registry.url}/v2/").status_code == 200


# --------------------------------------------------------------------------
# basic auth
# --------------------------------------------------------------------------


def test_basic_registry_requires_credentials(basic_registry: Registry) -> None:
    reg = basic_registry
    assert reg.mode == "basic" and reg.plain_http
    assert reg.username and reg.password
    assert reg.auth == (reg.username, reg.password)
    with client() as c:
        r = c.get(f"{reg.url}/v2/")
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].lower().startswith("basic")
        assert c.get(f"{reg.url}/v2/", auth=(reg.username, "wrong")).status_code == 401
        assert c.get(f"{reg.url}/v2/", auth=(reg.username, reg.password)).status_code == 200
    with client(auth=(reg.username, reg.password)) as c:
        digest = upload_blob(c, reg.url, "b/repo", b"basic-data")
        assert c.get(f"{reg.url}/v2/b/repo/blobs/{digest}").content == b"basic-data"


# --------------------------------------------------------------------------
# token auth
# --------------------------------------------------------------------------


def parse_challenge(header: str) -> dict[str, str]:
    scheme, _, rest = header.partition(" ")
    assert scheme == "Bearer"
    out: dict[str, str] = {}
    for part in rest.split(","):
        k, _, v = part.strip().partition("=")
        out[k] = v.strip('"')
    return out


def test_token_registry_flow(token_registry: Registry) -> None:
    reg = token_registry
    ts = reg.token_server
    assert ts is not None and ts.running
    assert reg.mode == "token" and reg.plain_http
    assert (reg.username, reg.password) == (ts.username, ts.password)
    with client() as c:
        r = c.get(f"{reg.url}/v2/")
        assert r.status_code == 401
        challenge = parse_challenge(r.headers["WWW-Authenticate"])
        assert challenge["realm"] == ts.realm
        assert challenge["service"] == ts.service

        assert ts.requests == 0
        r = c.get(
            ts.realm, params={"service": challenge["service"]}, auth=(reg.username, reg.password)
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["token"] == body["access_token"]
        assert body["expires_in"] == 300
        assert "issued_at" in body
        assert ts.requests == 1 and ts.tokens_issued == 1
        r = c.get(f"{reg.url}/v2/", headers={"Authorization": f"Bearer {body['token']}"})
        assert r.status_code == 200

        # wrong credentials and anonymous requests are rejected by the token server
        bad = c.get(ts.realm, params={"service": ts.service}, auth=(reg.username, "nope"))
        assert bad.status_code == 401
        anon = c.get(ts.realm, params={"service": ts.service, "scope": "repository:x/y:pull"})
        assert anon.status_code == 401
        assert ts.requests == 3 and ts.tokens_issued == 1 and ts.rejected == 2


def test_token_scopes_are_enforced(token_registry: Registry) -> None:
    reg = token_registry
    ts = reg.token_server
    assert ts is not None and reg.auth is not None
    with client() as c:
        # the registry asks for a scope when the request needs one
        r = c.post(f"{reg.url}/v2/tok/repo/blobs/uploads/")
        assert r.status_code == 401
        challenge = parse_challenge(r.headers["WWW-Authenticate"])
        assert challenge["scope"].startswith("repository:tok/repo:")
        assert challenge["realm"] == ts.realm

        r = c.get(
            ts.realm,
            params=[
                ("service", ts.service),
                ("scope", "repository:tok/repo:pull,push"),
                ("scope", "registry:catalog:*"),
            ],
            auth=reg.auth,
        )
        assert r.status_code == 200
        token = r.json()["token"]
        claims = jwt.decode(token, options={"verify_signature": False}, audience=ts.service)
        assert {"type": "repository", "name": "tok/repo", "actions": ["pull", "push"]} in claims[
            "access"
        ]
        assert {"type": "registry", "name": "catalog", "actions": ["*"]} in claims["access"]
        assert ts.scopes_log[-1] == ["repository:tok/repo:pull,push", "registry:catalog:*"]
        auth = {"Authorization": f"Bearer {token}"}

        digest = upload_blob(c, reg.url, "tok/repo", b"token-data", headers=auth)
        r = c.get(f"{reg.url}/v2/tok/repo/blobs/{digest}", headers={**auth, "Range": "bytes=0-4"})
        assert r.status_code == 206 and r.content == b"token"
        assert c.get(f"{reg.url}/v2/_catalog", headers=auth).json() == {
            "repositories": ["tok/repo"]
        }
        # a token for one repository does not open another one
        r = c.get(f"{reg.url}/v2/other/repo/blobs/{digest}", headers=auth)
        assert r.status_code == 401

        # expired tokens (minted directly) are refused
        expired = ts.make_token(
            [{"type": "repository", "name": "tok/repo", "actions": ["pull"]}],
            lifetime=-60,
            not_before=0,
        )
        r = c.get(
            f"{reg.url}/v2/tok/repo/blobs/{digest}", headers={"Authorization": f"Bearer {expired}"}
        )
        assert r.status_code == 401


def test_token_server_oauth2_post_and_policy() -> None:
    def pull_only(user: str, rtype: str, name: str, actions: list[str]) -> list[str]:
        return [a for a in actions if a == "pull"]

    with TokenServer("alice", "secret", policy=pull_only) as ts, client() as c:
        r = c.post(
            ts.realm,
            data={
                "grant_type": "password",
                "username": "alice",
                "password": "secret",
                "service": ts.service,
                "scope": "repository:a/b:pull,push",
            },
        )
        assert r.status_code == 200, r.text
        claims = jwt.decode(
            r.json()["access_token"], options={"verify_signature": False}, audience=ts.service
        )
        assert claims["sub"] == "alice"
        assert claims["access"] == [{"type": "repository", "name": "a/b", "actions": ["pull"]}]
        r = c.post(ts.realm, data={"grant_type": "password", "username": "alice", "password": "x"})
        assert r.status_code == 401
        assert (
            c.get(ts.realm.replace("/token", "/nope"), auth=("alice", "secret")).status_code == 404
        )
    assert not ts.running


def test_token_registry_restart_keeps_token_server(token_registry: Registry) -> None:
    ts = token_registry.token_server
    assert ts is not None
    realm = ts.realm
    token_registry.restart()
    assert ts.running and ts.realm == realm
    with client() as c:
        tok = c.get(realm, params={"service": ts.service}, auth=token_registry.auth).json()["token"]
        r = c.get(f"{token_registry.url}/v2/", headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 200


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------


def test_tls_registry(tls_registry: Registry) -> None:
    reg = tls_registry
    assert reg.mode == "tls"
    assert reg.plain_http is False
    assert reg.url == f"https://{reg.host}"
    assert reg.ca_file is not None and Path(reg.ca_file).is_file()
    assert reg.username is None and reg.password is None
    with client(verify=ssl.create_default_context(cafile=reg.ca_file)) as c:
        r = c.get(f"{reg.url}/v2/")
        assert r.status_code == 200
        digest = upload_blob(c, reg.url, "tls/repo", b"tls-data")
        assert c.get(f"{reg.url}/v2/tls/repo/blobs/{digest}").content == b"tls-data"
    with client(verify=ssl.create_default_context(cafile=reg.ca_file)) as c:
        assert c.get(f"https://localhost:{reg.port}/v2/").status_code == 200
    with client() as c, pytest.raises(httpx.ConnectError) as excinfo:
        c.get(f"{reg.url}/v2/")
    assert "CERTIFICATE_VERIFY_FAILED" in str(excinfo.value) or isinstance(
        excinfo.value.__cause__, ssl.SSLError
    )
    with client() as c:
        # plain HTTP against the TLS port is refused by Go's TLS server
        assert c.get(f"http://{reg.host}/v2/").status_code == 400


# --------------------------------------------------------------------------
# lifecycle / failure handling
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "basic", "token", "tls"])
def test_context_manager_cleans_up(mode: str) -> None:
    with Registry(mode) as reg:
        assert reg.running
        proc = reg.process
        assert proc is not None
        workdir = reg.workdir
        ts = reg.token_server
        assert reg in live_objects()
        assert proc.pid in child_registry_pids()
        assert port_is_open(reg.port)
    assert proc.poll() is not None
    assert not reg.running
    assert not port_is_open(reg.port)
    assert not workdir.exists()
    assert reg not in live_objects()
    assert proc.pid not in child_registry_pids()
    if mode == "token":
        assert ts is not None and not ts.running and ts not in live_objects()
    with pytest.raises(RuntimeError):
        reg.start()


def test_unknown_mode_rejected() -> None:
    with pytest.raises(ValueError):
        Registry("s3")


def test_startup_failure_reports_log(tmp_path: Path) -> None:
    fake = tmp_path / "fake-registry"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start marker-1234' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    reg = Registry("plain", binary=str(fake), workdir=tmp_path / "w", startup_timeout=10)
    try:
        with pytest.raises(RegistryStartupError) as excinfo:
            reg.start()
    finally:
        reg.close()
    msg = str(excinfo.value)
    assert "marker-1234" in msg
    assert "exited with code 3" in msg
    assert not reg.running
    # a caller-provided workdir is kept (log available for post-mortem)
    assert "marker-1234" in (tmp_path / "w" / "registry.log").read_text()


def test_missing_binary_fails_cleanly() -> None:
    reg = Registry("plain", binary="/nonexistent/docker-registry")
    try:
        with pytest.raises(RegistryStartupError, match="cannot execute"):
            reg.start()
        assert not reg.running and reg not in live_objects()
    finally:
        reg.close()


def test_startup_timeout_when_never_ready(tmp_path: Path) -> None:
    fake = tmp_path / "sleepy-registry"
    fake.write_text("#!/bin/sh\necho 'sleepy marker' >&2\nexec sleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    reg = Registry("plain", binary=str(fake), startup_timeout=0.5)
    try:
        with pytest.raises(RegistryStartupError, match="did not answer"):
            reg.start()
        assert not reg.running  # the hung process was killed
    finally:
        reg.close()


def test_fixed_port_in_use_fails_fast() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        reg = Registry("plain", port=port, startup_timeout=10)
        try:
            with pytest.raises(RegistryStartupError, match="(?i)address already in use"):
                reg.start()
        finally:
            reg.close()


def test_model_dir(model_dir: Path) -> None:
    assert (model_dir / "model.safetensors").stat().st_size > 1_000_000
    assert (model_dir / "config.json").is_file()
    assert (model_dir / "1_Pooling" / "config.json").is_file()
