"""`--mirror` and `--proxy`: reads through a real pull-through cache (a second
docker-registry in proxy mode) and through an HTTP forward proxy, with the origin's
access log and the proxy's record showing where each request went."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.forward_proxy import ForwardProxy
from tests.mounting import galleryfs, isolated_env, mounted
from tests.registry_harness import Registry
from tests.test_integrity import blob_file, flip

MiB = 1 << 20


@pytest.fixture
def origin() -> Iterator[Registry]:
    with Registry(access_log=True) as reg:
        yield reg


@pytest.fixture
def mirror(origin: Registry) -> Iterator[Registry]:
    with Registry(proxy_remote=origin.url) as reg:
        yield reg


def push(registry: Registry, tmp_path: Path, env: dict[str, str], ref: str,
         files: dict[str, bytes], *extra: str) -> None:
    src = tmp_path / ref.replace("/", "_").replace(":", "_")
    src.mkdir(exist_ok=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    r = galleryfs("push", str(src), f"{registry.host}/{ref}", "--plain-http", *extra, env=env)
    assert r.returncode == 0, r.stderr


def pull(registry: Registry, ref: str, target: Path, env: dict[str, str], *extra: str) -> str:
    r = galleryfs("pull", f"{registry.host}/{ref}", str(target), "--plain-http", *extra, env=env)
    assert r.returncode == 0, r.stderr
    return r.stderr


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def stats(mnt: Path) -> dict:
    return json.loads(os.getxattr(mnt, "user.galleryfs.stats"))


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "mirror" in line and "failed" in line]


def test_pull_and_mount_read_through_the_mirror(origin: Registry, mirror: Registry,
                                                 tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    weights = os.urandom(9 * MiB + 7)
    push(origin, tmp_path, env, "g/m:v1", {"w.bin": weights})
    blob = digest(weights)
    pull(origin, "g/m:v1", tmp_path / "one", env, "--mirror", mirror.url)
    assert (tmp_path / "one" / "w.bin").read_bytes() == weights
    assert mirror.access_lines("GET", f"/blobs/{blob}")  # the pull asked the mirror
    from_origin = len(origin.access_lines("GET", f"/blobs/{blob}"))
    assert from_origin >= 1  # the mirror filled its cache from the origin

    pull(origin, "g/m:v1", tmp_path / "two", env, "--mirror", mirror.url)
    assert (tmp_path / "two" / "w.bin").read_bytes() == weights
    assert len(origin.access_lines("GET", f"/blobs/{blob}")) == from_origin

    with mounted(origin.host, tmp_path / "mnt", env, "--plain-http", "--mirror", mirror.url,
                 "--cache-size", "0") as mnt:
        assert (mnt / "g" / "m" / "v1" / "w.bin").read_bytes() == weights
        counters = stats(mnt)
        assert counters["mirror_bytes"] >= len(weights)
        assert counters["registry_bytes"] < len(weights) // 4  # listings, manifests
    assert len(origin.access_lines("GET", f"/blobs/{blob}")) == from_origin
    # Range reads of the blob reached the mirror, straight into their chunks.
    assert len(mirror.access_lines("GET", f"/blobs/{blob}")) > 2


def test_a_cold_mirror_is_filled_by_the_first_reads_and_serves_the_next(
        origin: Registry, mirror: Registry, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    weights = os.urandom(9 * MiB + 7)
    push(origin, tmp_path, env, "g/m:v1", {"w.bin": weights})
    cache = tmp_path / "cache"
    options = ("--plain-http", "--mirror", mirror.url, "--cache-dir", str(cache),
               "--cache-size", "0")
    # The mirror has nothing: it answers ranges with the whole blob (and caches it
    # meanwhile). A miss, not a failure: no warning, the mirror is asked again.
    with mounted(origin.host, tmp_path / "mnt", env, *options) as mnt:
        assert (mnt / "g" / "m" / "v1" / "w.bin").read_bytes() == weights
    log = "".join(p.read_text() for p in (cache / "logs").glob("*.log"))
    assert warnings(log) == [], log
    cached = blob_file(mirror, weights)
    deadline = time.monotonic() + 30
    while not cached.exists():
        assert time.monotonic() < deadline, "the mirror did not cache the blob"
        time.sleep(0.05)
    with mounted(origin.host, tmp_path / "mnt", env, *options) as mnt:
        assert (mnt / "g" / "m" / "v1" / "w.bin").read_bytes() == weights
        assert stats(mnt)["mirror_bytes"] >= len(weights)


def test_tags_are_resolved_at_the_origin_only(origin: Registry, mirror: Registry,
                                              tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    first, second = os.urandom(MiB), os.urandom(MiB)
    push(origin, tmp_path, env, "g/m:v1", {"w.bin": first})
    # The mirror's cache knows v1 as the first revision.
    pull(mirror, "g/m:v1", tmp_path / "cached", env)
    push(origin, tmp_path, env, "g/m:v1", {"w.bin": second}, "--created",
         "2026-01-02T00:00:00Z")
    before = len(mirror.access_lines("GET", "/manifests/v1"))
    pull(origin, "g/m:v1", tmp_path / "now", env, "--mirror", mirror.url)
    assert (tmp_path / "now" / "w.bin").read_bytes() == second
    assert len(mirror.access_lines("GET", "/manifests/v1")) == before
    assert mirror.access_lines("GET", f"/blobs/{digest(second)}")


def test_a_lying_mirror_costs_a_fallback_not_wrong_bytes(origin: Registry, mirror: Registry,
                                                        tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    weights = os.urandom(9 * MiB + 7)
    push(origin, tmp_path, env, "g/m:v1", {"w.bin": weights})
    pull(origin, "g/m:v1", tmp_path / "fill", env, "--mirror", mirror.url)
    flip(blob_file(mirror, weights), (5 * MiB,))  # the mirror now serves a wrong blob
    stderr = pull(origin, "g/m:v1", tmp_path / "pulled", env, "--mirror", mirror.url)
    assert (tmp_path / "pulled" / "w.bin").read_bytes() == weights
    assert len(warnings(stderr)) == 1, stderr
    assert "does not match" in warnings(stderr)[0] or "digest" in warnings(stderr)[0]

    cache = tmp_path / "cache"
    with mounted(origin.host, tmp_path / "mnt", env, "--plain-http", "--mirror", mirror.url,
                 "--cache-dir", str(cache)) as mnt:
        assert (mnt / "g" / "m" / "v1" / "w.bin").read_bytes() == weights
        counters = stats(mnt)
        assert counters["registry_bytes"] >= 4 * MiB  # the wrong chunk, from the origin
        assert counters["verify_failures"] == 0
    log = "".join(p.read_text() for p in (cache / "logs").glob("*.log"))
    assert len(warnings(log)) == 1, log


def test_reads_keep_working_with_the_mirror_down(origin: Registry, mirror: Registry,
                                                 tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    files = {f"w{i}.bin": os.urandom(MiB + i) for i in range(4)}
    push(origin, tmp_path, env, "g/m:v1", files)
    mirror.stop()
    started = time.monotonic()
    stderr = pull(origin, "g/m:v1", tmp_path / "pulled", env, "--mirror", mirror.url)
    for name, data in files.items():
        assert (tmp_path / "pulled" / name).read_bytes() == data
    # One failure, then the mirror is skipped: not one warning (or timeout) per blob.
    assert len(warnings(stderr)) == 1, stderr
    with mounted(origin.host, tmp_path / "mnt", env, "--plain-http", "--mirror", mirror.url,
                 "--cache-size", "0") as mnt:
        for name, data in files.items():
            assert (mnt / "g" / "m" / "v1" / name).read_bytes() == data
        assert stats(mnt)["mirror_bytes"] == 0
    assert time.monotonic() - started < 30


class _Recorder(ThreadingHTTPServer):
    """A mirror that wants credentials: 401 to everything, every request's headers kept."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer.seen.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="mirror"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True


class _CutOff(ThreadingHTTPServer):
    """In front of a mirror: the first answer longer than `cut` bytes stops there (the
    connection closed), and from then on every request gets a 503: a mirror that dies in
    the middle of a long range."""

    def __init__(self, target: Registry, cut: int) -> None:
        self.broken = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                if outer.broken:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    conn.request("GET", self.path, headers=headers)
                    answer = conn.getresponse()
                    body = answer.read()
                finally:
                    conn.close()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if len(body) > cut:
                    outer.broken = True
                    self.wfile.write(body[:cut])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


def test_a_mirror_dying_midway_leaves_the_rest_to_the_origin(
        origin: Registry, mirror: Registry, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    weights = os.urandom(33 * MiB + 7)
    push(origin, tmp_path, env, "g/m:v1", {"w.bin": weights})
    pull(origin, "g/m:v1", tmp_path / "fill", env, "--mirror", mirror.url)  # mirror warm
    cut = _CutOff(mirror, 6 * MiB)  # chunk-sized ranges pass, the first longer span dies
    thread = threading.Thread(target=cut.serve_forever, daemon=True)
    thread.start()
    cache = tmp_path / "cache"
    try:
        with mounted(origin.host, tmp_path / "mnt", env, "--plain-http", "--mirror", cut.url,
                     "--cache-dir", str(cache), "--cache-size", "0") as mnt:
            assert (mnt / "g" / "m" / "v1" / "w.bin").read_bytes() == weights
            counters = stats(mnt)
    finally:
        cut.shutdown()
        cut.server_close()
        thread.join(timeout=5)
    assert cut.broken
    assert counters["mirror_bytes"] >= 4 * MiB and counters["registry_bytes"] >= 4 * MiB
    # The origin continued from where the mirror stopped: no byte fetched twice.
    assert counters["mirror_bytes"] + counters["registry_bytes"] <= len(weights) + (256 << 10)
    log = "".join(p.read_text() for p in (cache / "logs").glob("*.log"))
    assert len(warnings(log)) == 1, log


def test_a_mirror_gets_no_credentials(basic_registry: Registry, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    src = tmp_path / "model"
    src.mkdir()
    weights = os.urandom(MiB)
    (src / "w.bin").write_bytes(weights)
    login = ("--plain-http", "--username", basic_registry.username, "--password-stdin")
    server = _Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        import subprocess
        import sys

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "galleryfs", *args, *login],
                                  input=basic_registry.password + "\n", capture_output=True,
                                  text=True, timeout=120, env=env)

        r = run("push", str(src), f"{basic_registry.host}/g/m:v1")
        assert r.returncode == 0, r.stderr
        url = f"http://127.0.0.1:{server.server_address[1]}"
        r = run("pull", f"{basic_registry.host}/g/m:v1", str(tmp_path / "out"), "--mirror", url)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "out" / "w.bin").read_bytes() == weights
        assert server.seen  # the mirror was asked
        assert all("authorization" not in h for h in server.seen)
        assert len(warnings(r.stderr)) == 1, r.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_proxy_carries_all_registry_traffic(registry: Registry, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    weights = os.urandom(9 * MiB + 7)
    push(registry, tmp_path, env, "g/m:v1", {"w.bin": weights})
    blob = digest(weights)
    with ForwardProxy() as proxy:
        pull(registry, "g/m:v1", tmp_path / "pulled", env, "--proxy", proxy.url)
        assert (tmp_path / "pulled" / "w.bin").read_bytes() == weights
        assert proxy.seen("GET", f"{registry.host}/v2/g/m/blobs/{blob}")
        before = len(proxy.seen("GET", f"/blobs/{blob}"))
        with mounted(registry.host, tmp_path / "mnt", env, "--plain-http", "--proxy", proxy.url,
                     "--cache-size", "0") as mnt:
            assert (mnt / "g" / "m" / "v1" / "w.bin").read_bytes() == weights
            counters = stats(mnt)
            # Nothing went around the proxy: no range read took the direct path.
            assert counters["direct_ranges"] == 0
            assert counters["registry_bytes"] >= len(weights)
        assert len(proxy.seen("GET", f"/blobs/{blob}")) > before


@pytest.mark.parametrize(("option", "url", "message"), [
    ("--mirror", "ftp://10.0.0.5", "expected http://HOST"),
    ("--mirror", "10.0.0.5:5000", "expected http://HOST"),
    ("--mirror", "http://user:pw@10.0.0.5", "no credentials"),
    ("--mirror", "http://10.0.0.5/v2/", "no path or query"),
    ("--mirror", "http://10.0.0.5:port", "Port could not be cast"),
    ("--proxy", "http://", "no host"),
    ("--proxy", "http://127.0.0.1:4001/?x=1", "no path or query"),
])
def test_bad_urls_are_refused_in_one_line(tmp_path: Path, option: str, url: str,
                                          message: str) -> None:
    env = isolated_env(tmp_path)
    r = galleryfs("ls", "127.0.0.1:9", "--plain-http", option, url, env=env)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and message in r.stderr and option in r.stderr, r.stderr
