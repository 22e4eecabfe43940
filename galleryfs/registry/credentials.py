"""Where registry credentials come from, and where `galleryfs login` keeps them.

Order of precedence: explicit (`--username` + `--password-stdin`), the galleryfs store
(written by `galleryfs login`, mode 0600), then Docker's `config.json`: its credential
helper for the host (`credHelpers`, else `credsStore`; credhelpers.py) if it names one,
else its `auths` (what `docker login` wrote). Secrets are never logged or put in exception messages.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from . import credhelpers


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # keep the password out of logs and tracebacks
        return f"Credentials(username={self.username!r}, password=***)"


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "galleryfs"


def store_path() -> Path:
    return config_dir() / "auth.json"


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    return Path(base) / "config.json"


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _decode_auth(entry: object) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if "auth" in entry:
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return Credentials(user, password) if user else None
    if "username" in entry and "password" in entry:
        return Credentials(str(entry["username"]), str(entry["password"]))
    return None


def _host_keys(host: str) -> list[str]:
    # Docker writes keys with and without scheme; Docker Hub uses a legacy URL.
    return [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]


def lookup(host: str) -> Credentials | None:
    for path in (store_path(), docker_config_path()):
        data = _read_json(path)
        if path != store_path():
            # Docker asks a credential helper first when one is configured for the host.
            helper = credhelpers.helper_for(data, host)
            if helper is not None:
                got = credhelpers.get(helper, host)
                return Credentials(*got) if got else None
        auths = data.get("auths", {})
        if not isinstance(auths, dict):
            continue
        for key in _host_keys(host):
            creds = _decode_auth(auths.get(key))
            if creds:
                return creds
    return None


def save(host: str, creds: Credentials) -> Path:
    path = store_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = _read_json(path)
    auths = data.setdefault("auths", {})
    token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
    auths[host] = {"auth": token}
    _write_private(path, data)
    return path


def remove(host: str) -> bool:
    path = store_path()
    data = _read_json(path)
    auths = data.get("auths", {})
    if host not in auths:
        return False
    del auths[host]
    _write_private(path, data)
    return True


def _write_private(path: Path, data: dict) -> None:
    # Created 0600 from the start (not chmod after) so the secret is never world-readable.
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
