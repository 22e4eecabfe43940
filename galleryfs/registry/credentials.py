"""Where registry credentials come from, and where `galleryfs login` keeps them.

Order of precedence: explicit (`--username` with `--password-stdin` or `--password-file`),
the galleryfs store (written by `galleryfs login`, mode 0600, in a 0700 folder), then
Docker's `config.json`: its credential helper for the host (`credHelpers`, else
`credsStore`; credhelpers.py) if it names one, else its `auths` (what `docker login`
wrote). Secrets are never logged or put in exception messages.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UsageError
from . import credhelpers


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    # --password-file: read again whenever a new credential is needed, so a rotated
    # password is used without a remount. An absolute path (the mount daemon's cwd is /).
    password_file: str | None = None
    # From a Docker credential helper (credhelpers.py): asked again whenever a new
    # credential is needed, as docker does, so its short-lived tokens (ECR, GCR) renew.
    helper: str | None = None
    host: str | None = None

    def __repr__(self) -> str:  # keep the password out of logs and tracebacks
        return f"Credentials(username={self.username!r}, password=***)"

    def fresh(self) -> Credentials:
        """These credentials with the password the file holds now (OSError if unreadable),
        or as their credential helper gives them now (blocking: run it in a thread)."""
        if self.helper and self.host:
            got = credhelpers.get(self.helper, self.host)
            return replace(self, username=got[0], password=got[1]) if got else self
        if not self.password_file:
            return self
        return replace(self, password=read_password_file(self.password_file))

    @property
    def renewable(self) -> bool:
        return bool(self.password_file or self.helper and self.host)


def read_password_file(path: str) -> str:
    """The password in a file: its first line, without the line ending."""
    with open(path, encoding="utf-8", errors="strict") as f:
        return f.readline().rstrip("\r\n")


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
                return Credentials(*got, helper=helper, host=host) if got else None
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
    private_dir(path.parent)
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
    private_dir(path.parent)
    _write_private(path, data)
    return True


def private_dir(folder: Path) -> None:
    """The folder of the store, created 0700. One that exists and that other users may
    enter, or that is not ours, is refused, not fixed: whatever it held may have been
    read or planted already, and its owner should look before trusting it again."""
    try:
        folder.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(folder, 0o700)  # whatever the umask
        return
    st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"cannot store credentials: {folder} is not a folder")
    if st.st_uid != os.geteuid():
        raise UsageError(f"refusing to store credentials in {folder}: it belongs to "
                         f"another user (uid {st.st_uid})")
    if st.st_mode & 0o077:
        raise UsageError(
            f"refusing to store credentials in {folder}: other users may access it "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); check its contents, then "
            f"`chmod 700 {folder}`")


def _write_private(path: Path, data: dict) -> None:
    # A new temp file of our own, created 0600 (never one that was there: writing through
    # it would keep its mode, or follow a symlink to wherever it points), then renamed
    # over the store, so a reader sees the old file or the new one, never half of one.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for _ in range(16):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:
            continue  # a name someone else holds: draw another
    else:
        raise UsageError(f"cannot create a temporary file beside {path}")
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken bits away, never added any
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
