"""Throw-away OCI registries for tests, demos and benchmarks.

Runs Debian's ``docker-registry`` (CNCF distribution 2.8) as a subprocess with
a generated configuration in a private temporary directory, optionally behind
HTTP Basic auth (htpasswd), Bearer token auth (with an in-process token
service, see :class:`TokenServer`) or TLS (certificates made with trustme).

This module deliberately has no pytest dependency so that scripts can use it::

    from tests.registry_harness import Registry

    with Registry("basic") as reg:
        print(reg.url, reg.username, reg.password)

Everything started here is also stopped at interpreter exit (``atexit``) as a
safety net; callers should still call :meth:`Registry.close` /
:meth:`TokenServer.stop` (or use ``with``).
"""

from __future__ import annotations

import atexit
import base64
import binascii
import contextlib
import datetime as _dt
import http.client
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "MODES",
    "Registry",
    "RegistryStartupError",
    "TokenServer",
    "child_registry_pids",
    "find_registry_binary",
    "free_port",
    "live_objects",
]

MODES = ("plain", "basic", "token", "tls")

DEFAULT_USERNAME = "galleryfs"
DEFAULT_SERVICE = "galleryfs-test-registry"
DEFAULT_ISSUER = "galleryfs-test-token-issuer"

# Registry instances / token servers that are currently running.  Used by the
# atexit safety net and by the pytest leak checks in conftest.py.
_LIVE: set[Any] = set()
_LIVE_LOCK = threading.Lock()


def _track(obj: Any) -> None:
    with _LIVE_LOCK:
        _LIVE.add(obj)


def _untrack(obj: Any) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(obj)


def live_objects() -> list[Any]:
    """Registries and token servers started by this module and not yet stopped."""
    with _LIVE_LOCK:
        return list(_LIVE)


@atexit.register
def _stop_everything() -> None:  # pragma: no cover - safety net
    for obj in live_objects():
        with contextlib.suppress(Exception):
            obj.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is currently free on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_registry_binary() -> str:
    """Locate the distribution registry binary (``$GALLERYFS_REGISTRY_BIN`` wins)."""
    env = os.environ.get("GALLERYFS_REGISTRY_BIN")
    if env:
        return env
    for name in ("docker-registry", "registry"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/docker-registry"


def child_registry_pids(
    binary_names: tuple[str, ...] = ("docker-registry", "registry"),
) -> list[int]:
    """PIDs of live (non-zombie) registry processes whose parent is this process (Linux only)."""
    me = os.getpid()
    pids: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return pids
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        name = fields.get("Name", "").strip()
        ppid = fields.get("PPid", "").strip()
        state = fields.get("State", "").strip()
        if ppid == str(me) and name in binary_names and not state.startswith("Z"):
            pids.append(int(entry.name))
    return pids


# --------------------------------------------------------------------------
# Token service
# --------------------------------------------------------------------------

Policy = Callable[[str, str, str, list[str]], list[str]]
"""``policy(username, type, name, requested_actions) -> granted_actions``."""


def _parse_scope(scope: str) -> dict[str, Any] | None:
    """Parse ``type:name:actions`` (name may itself contain ':' e.g. host:port)."""
    first = scope.find(":")
    last = scope.rfind(":")
    if first <= 0 or last == first:
        return None
    rtype = scope[:first]
    name = scope[first + 1 : last]
    actions = [a for a in scope[last + 1 :].split(",") if a]
    if not name:
        return None
    return {"type": rtype, "name": name, "actions": actions}


class _TokenHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: TokenServer


class _TokenHandler(BaseHTTPRequestHandler):
    server: _TokenHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- helpers --------------------------------------------------------
    def _send_json(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _unauthorized(self, detail: str) -> None:
        owner = self.server.owner
        with owner._lock:
            owner.rejected += 1
        self._send_json(
            401,
            {"errors": [{"code": "UNAUTHORIZED", "message": detail}], "details": detail},
            {"WWW-Authenticate": f'Basic realm="{owner.realm}"'},
        )

    def _basic_credentials(self) -> tuple[str, str] | None:
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            return None
        return user, password

    def _issue(
        self, user: str, password: str, service: str | None, scopes: list[str], oauth: bool
    ) -> None:
        owner = self.server.owner
        if not owner.check_credentials(user, password):
            self._unauthorized("invalid username or password")
            return
        body = owner._token_response(user, service, scopes)
        if oauth:
            body.pop("token", None)
        self._send_json(200, body, {"Cache-Control": "no-store"})

    # -- verbs ----------------------------------------------------------
    def do_GET(self) -> None:
        owner = self.server.owner
        parts = urlsplit(self.path)
        if parts.path.rstrip("/") != owner.path:
            self._send_json(404, {"details": "not found"})
            return
        with owner._lock:
            owner.requests += 1
        query = parse_qs(parts.query)
        scopes: list[str] = []
        for raw in query.get("scope", []):
            scopes.extend(raw.split(" "))
        service = (query.get("service") or [None])[0]
        creds = self._basic_credentials()
        if creds is None:
            self._unauthorized("authentication required")
            return
        self._issue(creds[0], creds[1], service, scopes, oauth=False)

    def do_POST(self) -> None:
        """OAuth2 password grant (``grant_type=password``), as used by some clients."""
        owner = self.server.owner
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if parts.path.rstrip("/") != owner.path:
            self._send_json(404, {"details": "not found"})
            return
        with owner._lock:
            owner.requests += 1
        form = parse_qs(raw.decode("utf-8", "replace"))
        grant = (form.get("grant_type") or [""])[0]
        scopes: list[str] = []
        for s in form.get("scope", []):
            scopes.extend(s.split(" "))
        service = (form.get("service") or [None])[0]
        if grant != "password":
            self._send_json(400, {"error": "unsupported_grant_type"})
            return
        user = (form.get("username") or [""])[0]
        password = (form.get("password") or [""])[0]
        if not user:
            self._unauthorized("authentication required")
            return
        self._issue(user, password, service, scopes, oauth=True)


class TokenServer:
    """Minimal Docker/Harbor-style Bearer token service.

    ``GET {realm}?service=S&scope=repository:NAME:pull,push&scope=...`` with
    HTTP Basic credentials returns ``{"token", "access_token", "expires_in",
    "issued_at"}``; wrong or missing credentials give 401.  Tokens are ES256
    JWTs whose ``x5c`` header carries the self-signed certificate that the
    registry trusts via ``auth.token.rootcertbundle`` (:attr:`cert_pem`).

    Counters for assertions: :attr:`requests` (every request to the token
    endpoint), :attr:`tokens_issued`, :attr:`rejected`; :attr:`scopes_log`
    holds the scopes of each successful request.
    """

    path = "/token"

    def __init__(
        self,
        username: str = DEFAULT_USERNAME,
        password: str | None = None,
        *,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        expires_in: int = 300,
        policy: Policy | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.username = username
        self.password = password if password is not None else "tok-" + secrets.token_hex(8)
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.policy = policy
        self.host = host
        self.requests = 0
        self.tokens_issued = 0
        self.rejected = 0
        self.scopes_log: list[list[str]] = []
        self._lock = threading.Lock()
        self._server: _TokenHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._key, self.cert_pem, self._cert_der_b64 = self._make_signing_cert()

    # -- key material ------------------------------------------------------
    def _make_signing_cert(self) -> tuple[Any, bytes, str]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = _dt.datetime.now(_dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(hours=1))
            .not_valid_after(now + _dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        der = cert.public_bytes(serialization.Encoding.DER)
        pem = cert.public_bytes(serialization.Encoding.PEM)
        return key, pem, base64.b64encode(der).decode("ascii")

    # -- lifecycle ---------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("token server not started")
        return int(self._server.server_address[1])

    @property
    def realm(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Self:
        if self.running:
            return self
        server = _TokenHTTPServer((self.host, 0), _TokenHandler)
        server.owner = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="galleryfs-token-server",
            daemon=True,
        )
        self._thread.start()
        _track(self)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is not None and thread is not None and thread.is_alive():
            server.shutdown()
        if server is not None:
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._thread = None
        _untrack(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.realm if self._server is not None else "not started"
        return f"<TokenServer {where} user={self.username!r}>"

    # -- tokens ------------------------------------------------------------
    def check_credentials(self, username: str, password: str) -> bool:
        return secrets.compare_digest(
            username.encode(), self.username.encode()
        ) and secrets.compare_digest(password.encode(), self.password.encode())

    def grant(self, username: str, scopes: list[str]) -> list[dict[str, Any]]:
        """Turn requested scope strings into the JWT ``access`` claim."""
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = _parse_scope(scope)
            if parsed is None:
                continue
            actions = parsed["actions"]
            if self.policy is not None:
                actions = list(self.policy(username, parsed["type"], parsed["name"], list(actions)))
            access.append({"type": parsed["type"], "name": parsed["name"], "actions": actions})
        return access

    def make_token(
        self,
        access: list[dict[str, Any]],
        *,
        subject: str | None = None,
        service: str | None = None,
        lifetime: int | None = None,
        not_before: int | None = None,
    ) -> str:
        """Mint a signed JWT directly (handy for expiry / wrong-scope tests)."""
        import jwt

        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject if subject is not None else self.username,
            "aud": service or self.service,
            "exp": now + (self.expires_in if lifetime is None else lifetime),
            "nbf": now - 5 if not_before is None else not_before,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return jwt.encode(
            claims, self._key, algorithm="ES256", headers={"x5c": [self._cert_der_b64]}
        )

    def _token_response(
        self, username: str, service: str | None, scopes: list[str]
    ) -> dict[str, Any]:
        # The registry only accepts its own service as audience; always use it.
        del service
        token = self.make_token(self.grant(username, scopes), subject=username)
        with self._lock:
            self.tokens_issued += 1
            self.scopes_log.append(list(scopes))
        issued_at = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued_at,
        }


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


class RegistryStartupError(RuntimeError):
    """The registry process died or never answered ``GET /v2/``."""


class Registry:
    """A ``docker-registry`` subprocess with generated config.

    ``mode`` is one of ``plain``, ``basic`` (htpasswd), ``token`` (Bearer,
    with :attr:`token_server`) or ``tls`` (HTTPS, trust :attr:`ca_file`).

    Attributes after :meth:`start`: ``host`` ("127.0.0.1:PORT"), ``port``,
    ``url`` (scheme://host), ``plain_http``, ``ca_file``, ``username`` /
    ``password`` (None unless basic/token), ``storage_dir``, ``workdir``,
    ``log_path``, ``config_path``, ``mode``.
    """

    def __init__(
        self,
        mode: str = "plain",
        *,
        port: int | None = None,
        username: str | None = None,
        password: str | None = None,
        token_server: TokenServer | None = None,
        workdir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        startup_timeout: float = 20.0,
        bind_host: str = "127.0.0.1",
        proxy_remote: str | None = None,
        access_log: bool | None = None,
    ) -> None:
        """``proxy_remote`` (e.g. ``http://127.0.0.1:5000``): a pull-through cache of that
        registry (distribution's proxy mode). ``access_log``: every request logged in
        ``log_path`` (:meth:`access_lines`); on by default for a pull-through cache."""
        if mode not in MODES:
            raise ValueError(f"unknown registry mode {mode!r}; expected one of {MODES}")
        self.mode = mode
        self.proxy_remote = proxy_remote
        self.access_log = proxy_remote is not None if access_log is None else access_log
        self.binary = binary or find_registry_binary()
        self.startup_timeout = startup_timeout
        self.bind_host = bind_host
        self._port_fixed = port is not None
        self.port = port if port is not None else free_port(bind_host)
        self._own_workdir = workdir is None
        self.workdir = (
            Path(workdir)
            if workdir is not None
            else Path(tempfile.mkdtemp(prefix=f"galleryfs-reg-{mode}-"))
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.workdir / "storage"
        self.storage_dir.mkdir(exist_ok=True)
        self.log_path = self.workdir / "registry.log"
        self.config_path = self.workdir / "config.yml"
        self.http_secret = secrets.token_hex(16)
        self.process: subprocess.Popen[bytes] | None = None
        self._closed = False

        self.ca_file: str | None = None
        self.username: str | None = None
        self.password: str | None = None
        self.token_server: TokenServer | None = None
        self._own_token_server = False
        self._tls_cert: Path | None = None
        self._tls_key: Path | None = None
        self._htpasswd: Path | None = None
        self._rootcerts: Path | None = None

        if mode == "basic":
            self.username = username or DEFAULT_USERNAME
            self.password = password if password is not None else "pw-" + secrets.token_hex(8)
            self._write_htpasswd()
        elif mode == "token":
            if token_server is None:
                token_server = TokenServer(username or DEFAULT_USERNAME, password)
                self._own_token_server = True
            self.token_server = token_server
            self.username = token_server.username
            self.password = token_server.password
            self._rootcerts = self.workdir / "token-rootcerts.pem"
            self._rootcerts.write_bytes(token_server.cert_pem)
        elif mode == "tls":
            self._write_tls_material()

    # -- derived attributes ---------------------------------------------------
    @property
    def plain_http(self) -> bool:
        return self.mode != "tls"

    @property
    def scheme(self) -> str:
        return "http" if self.plain_http else "https"

    @property
    def host(self) -> str:
        return f"{self.bind_host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def auth(self) -> tuple[str, str] | None:
        """``(username, password)`` or None (token mode: the token-server credentials)."""
        if self.username is None or self.password is None:
            return None
        return self.username, self.password

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- config material --------------------------------------------------------
    def _write_htpasswd(self) -> None:
        import bcrypt

        assert self.username is not None and self.password is not None
        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
        self._htpasswd = self.workdir / "htpasswd"
        self._htpasswd.write_text(f"{self.username}:{hashed}\n")

    def _write_tls_material(self) -> None:
        import trustme

        ca = trustme.CA()
        names = ["127.0.0.1", "localhost"]
        if self.bind_host not in names:
            names.append(self.bind_host)
        cert = ca.issue_cert(*names)
        tls_dir = self.workdir / "tls"
        tls_dir.mkdir(exist_ok=True)
        self._tls_cert = tls_dir / "server.crt"
        self._tls_key = tls_dir / "server.key"
        ca_path = tls_dir / "ca.pem"
        self._tls_cert.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        self._tls_key.write_bytes(cert.private_key_pem.bytes())
        ca.cert_pem.write_to_path(str(ca_path))
        self.ca_file = str(ca_path)

    def config(self) -> dict[str, Any]:
        """The registry configuration as a dict (written as JSON, which is valid YAML)."""
        http_cfg: dict[str, Any] = {"addr": self.host, "secret": self.http_secret}
        if self.mode == "tls":
            http_cfg["tls"] = {"certificate": str(self._tls_cert), "key": str(self._tls_key)}
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http_cfg,
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.proxy_remote is not None:
            cfg["proxy"] = {"remoteurl": self.proxy_remote}
        if self.access_log:
            cfg["log"] = {"level": "error", "accesslog": {"disabled": False}}
        if self.mode == "basic":
            cfg["auth"] = {
                "htpasswd": {"realm": "galleryfs-basic-realm", "path": str(self._htpasswd)}
            }
        elif self.mode == "token":
            assert self.token_server is not None
            ts = self.token_server
            if not ts.running:
                ts.start()
                self._own_token_server = True  # we started it, so we stop it
            cfg["auth"] = {
                "token": {
                    "realm": ts.realm,
                    "service": ts.service,
                    "issuer": ts.issuer,
                    "rootcertbundle": str(self._rootcerts),
                }
            }
        return cfg

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> Self:
        """Start the registry and wait until ``GET /v2/`` answers 200 or 401."""
        if self._closed:
            raise RuntimeError("registry was closed")
        if self.running:
            return self
        attempts = 1 if self._port_fixed else 3
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
                return self
            except RegistryStartupError as exc:
                self._stop_process()
                in_use = "address already in use" in str(exc).lower()
                if not in_use or attempt == attempts - 1:
                    raise
                self.port = free_port(self.bind_host)
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn_and_wait(self) -> None:
        cfg = self.config()  # also starts an owned token server
        self.config_path.write_text(json.dumps(cfg, indent=2) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        # The child inherits the log file descriptor; our handle can be closed right away.
        with open(self.log_path, "ab") as log:
            log.write(f"--- starting {self.binary} on {self.host} at {time.ctime()} ---\n".encode())
            log.flush()
            try:
                self.process = subprocess.Popen(
                    [self.binary, "serve", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    cwd=str(self.workdir),
                    start_new_session=True,
                )
            except OSError as exc:
                raise RegistryStartupError(
                    f"cannot execute registry binary {self.binary!r}: {exc}"
                ) from exc
        _track(self)
        self._wait_ready()

    def _probe(self) -> int | None:
        """Status of ``GET /v2/`` or None if the server is not answering yet."""
        conn: http.client.HTTPConnection
        if self.plain_http:
            conn = http.client.HTTPConnection(self.bind_host, self.port, timeout=1.0)
        else:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            conn = http.client.HTTPSConnection(self.bind_host, self.port, timeout=1.0, context=ctx)
        try:
            conn.request("GET", "/v2/")
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.02
        last_status: int | None = None
        while True:
            rc = self.process.poll()
            if rc is not None:
                raise RegistryStartupError(
                    f"registry ({self.mode}) exited with code {rc} during startup on {self.host}.\n"
                    f"log {self.log_path} tail:\n{self.log_tail()}"
                )
            last_status = self._probe()
            if last_status in (200, 401):
                return
            if time.monotonic() >= deadline:
                raise RegistryStartupError(
                    f"registry ({self.mode}) did not answer GET /v2/ with 200/401 on {self.url} "
                    f"within {self.startup_timeout:.1f}s (last status {last_status}).\n"
                    f"log {self.log_path} tail:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def access_lines(self, method: str, fragment: str) -> list[str]:
        """Access-log lines of requests ``METHOD <path containing fragment>``."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines()
                if f'"{method} ' in line and fragment in line.split(f'"{method} ', 1)[1]]

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def _stop_process(self) -> None:
        proc = self.process
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            self.process = None
        _untrack(self)

    def stop(self) -> None:
        """Stop the registry process (and a token server this registry created). Storage is kept."""
        self._stop_process()
        if self._own_token_server and self.token_server is not None:
            self.token_server.stop()

    def restart(self) -> Self:
        """Stop and start again on the same port with the same storage (and token server)."""
        self._stop_process()
        was_fixed = self._port_fixed
        self._port_fixed = True  # never move to another port on restart
        try:
            return self.start()
        finally:
            self._port_fixed = was_fixed

    def close(self) -> None:
        """Stop everything and delete the work directory if this object created it."""
        self.stop()
        self._closed = True
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Registry {self.mode} {self.url} {state}>"
