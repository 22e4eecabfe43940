"""Docker credential helpers (credHelpers, credsStore) against a real registry with
htpasswd auth: the helper is a real program on PATH speaking docker's protocol."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from pathlib import Path

import pytest

from galleryfs.cli import main
from tests.registry_harness import Registry


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")


def helper(tmp_path: Path, name: str, secrets: dict[str, tuple[str, str]]) -> Path:
    """`docker-credential-NAME get`: the host on stdin; logs what it was asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    path.write_text(f"""#!{sys.executable}
import json, sys
secrets = {json.dumps({h: list(v) for h, v in secrets.items()})}
host = sys.stdin.read().strip()
with open({str(tmp_path / (name + '.asked'))!r}, "a") as f:
    f.write(sys.argv[1] + " " + host + "\\n")
if host not in secrets:
    print("credentials not found in native keychain")
    sys.exit(1)
user, secret = secrets[host]
print(json.dumps({{"ServerURL": host, "Username": user, "Secret": secret}}))
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def docker_config(tmp_path: Path, config: dict) -> None:
    (tmp_path / "docker").mkdir(exist_ok=True)
    (tmp_path / "docker" / "config.json").write_text(json.dumps(config))


def ls(reg: Registry, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["ls", reg.host, "--plain-http"])
    return code, capsys.readouterr().err


def test_cred_helpers_and_creds_store(basic_registry: Registry, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    reg = basic_registry
    helper(tmp_path, "pass", {reg.host: (reg.username, reg.password)})
    helper(tmp_path, "wrong", {reg.host: (reg.username, "not-the-password")})

    # credHelpers names a helper for this host; the auths entry beside it is not used.
    docker_config(tmp_path, {"credHelpers": {reg.host: "pass"}, "auths": {reg.host: {}}})
    code, err = ls(reg, capsys)
    assert code == 0, err
    assert (tmp_path / "pass.asked").read_text() == f"get {reg.host}\n"

    # credsStore for every host.
    docker_config(tmp_path, {"credsStore": "pass"})
    assert ls(reg, capsys)[0] == 0

    # A per-host helper wins over the store.
    docker_config(tmp_path, {"credsStore": "pass", "credHelpers": {reg.host: "wrong"}})
    code, err = ls(reg, capsys)
    assert code == 1 and "wrong username or password" in err


def test_helper_without_credentials_missing_or_odd(basic_registry: Registry, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    reg = basic_registry
    helper(tmp_path, "empty", {})
    docker_config(tmp_path, {"credHelpers": {reg.host: "empty"}})
    code, err = ls(reg, capsys)
    assert code == 1 and "authentication required" in err and "Traceback" not in err

    docker_config(tmp_path, {"credHelpers": {reg.host: "not-installed"}})
    with caplog.at_level(logging.WARNING):
        code, err = ls(reg, capsys)
    assert code == 1 and "authentication required" in err
    assert "docker-credential-not-installed (docker config) is not installed" in caplog.text

    # A helper name that is no program name is refused, never run.
    docker_config(tmp_path, {"credHelpers": {reg.host: "../../bin/sh"}})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ls(reg, capsys)[0] == 1
    assert "not a helper name" in caplog.text

    # An identity token is not a password: said, not sent.
    helper(tmp_path, "oauth", {reg.host: ("<token>", "refresh-token")})
    docker_config(tmp_path, {"credHelpers": {reg.host: "oauth"}})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ls(reg, capsys)[0] == 1
    assert "identity token" in caplog.text and "refresh-token" not in caplog.text


def test_a_helper_is_asked_again_when_a_credential_is_needed(basic_registry: Registry,
                                                             tmp_path: Path) -> None:
    # Short-lived helper tokens (ECR, GCR) renew as docker renews them: a long-lived mount
    # asks the helper again rather than keep what it said at start.
    import trio

    from galleryfs.registry import credentials
    from galleryfs.registry.auth import RegistryAuth

    reg = basic_registry
    helper(tmp_path, "rotating", {reg.host: (reg.username, "first")})
    docker_config(tmp_path, {"credHelpers": {reg.host: "rotating"}})
    creds = credentials.lookup(reg.host)
    assert creds is not None and creds.password == "first" and creds.helper == "rotating"
    auth = RegistryAuth(creds, reg.url)
    helper(tmp_path, "rotating", {reg.host: (reg.username, "second")})
    assert trio.run(auth._reread) and auth.credentials is not None
    assert auth.credentials.password == "second"
    assert (tmp_path / "rotating.asked").read_text().count("get") == 2
    assert "second" not in repr(auth.credentials)
