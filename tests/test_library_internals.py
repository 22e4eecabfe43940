"""The library internals galleryfs still relies on, each checked so that a library upgrade
that takes one away fails here, by name, rather than slowing galleryfs down unnoticed.

- httpcore's `AsyncHTTP11Connection.READ_NUM_BYTES` (raised by `_tune_http_reads` in
  galleryfs/registry/client.py): the receive size of every httpx response body.
- httpx's `httpx._main` (stubbed in galleryfs/__init__.py): httpx's own command line,
  which `import httpx` loads with click, rich and pygments when they are installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import httpcore
import pytest
import trio

from galleryfs.registry import client as registry_client
from tests.registry_harness import Registry
from tests.test_chunks import push_blob


class _RecordingBackend(httpcore.AsyncNetworkBackend):
    """The trio backend, recording how many bytes each receive asks for."""

    def __init__(self) -> None:
        self.backend = httpcore.TrioBackend()
        self.asked: list[int] = []

    async def connect_tcp(self, *args, **kwargs) -> httpcore.AsyncNetworkStream:  # noqa: ANN002, ANN003
        stream = await self.backend.connect_tcp(*args, **kwargs)
        recorder = self

        class Recording(httpcore.AsyncNetworkStream):
            async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
                recorder.asked.append(max_bytes)
                return await stream.read(max_bytes, timeout)

            async def write(self, buffer: bytes, timeout: float | None = None) -> None:
                await stream.write(buffer, timeout)

            async def aclose(self) -> None:
                await stream.aclose()

        return Recording()

    async def sleep(self, seconds: float) -> None:
        await self.backend.sleep(seconds)


def test_httpcore_receives_a_response_body_in_large_reads(registry: Registry) -> None:
    from httpcore._async.http11 import AsyncHTTP11Connection

    assert hasattr(AsyncHTTP11Connection, "READ_NUM_BYTES"), (
        "httpcore's AsyncHTTP11Connection.READ_NUM_BYTES is gone: "
        "galleryfs.registry.client._tune_http_reads no longer raises httpx's receive size")
    data = os.urandom(4 << 20)
    digest = push_blob(registry.url, "internals/blob", data)
    backend = _RecordingBackend()

    async def run() -> None:
        async with registry_client.RegistryClient(
                registry.host, registry_client.ClientOptions(plain_http=True)):
            pass  # a client was made: the receive size is raised for the process
        async with httpcore.AsyncConnectionPool(network_backend=backend) as pool:
            response = await pool.request("GET", f"{registry.url}/v2/internals/blob/blobs/{digest}")
            assert response.content == data

    trio.run(run)
    assert max(backend.asked) == registry_client.HTTP_READ_BYTES, (
        f"httpcore {httpcore.__version__} asked the socket for at most {max(backend.asked)} "
        "bytes per receive: AsyncHTTP11Connection.READ_NUM_BYTES no longer sets it, "
        "galleryfs.registry.client._tune_http_reads does nothing")


_CLI_EXTRAS = ("click", "rich", "pygments")


def _imported(code: str) -> set[str]:
    """The modules among httpx's CLI and its extras that `code` leaves imported."""
    names = (*_CLI_EXTRAS, "httpx._main")
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in sys.modules if m in {names!r}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return set(out.stdout.split())


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in _CLI_EXTRAS),
                    reason="httpx loads its command line only with click, rich and pygments")
def test_httpx_command_line_is_not_loaded_with_galleryfs() -> None:
    assert "httpx._main" in _imported("import httpx"), (
        "`import httpx` no longer loads httpx._main (its command line) although click, rich "
        "and pygments are installed: the stub in galleryfs/__init__.py is not needed anymore")
    loaded = _imported("import galleryfs.cli")
    assert not loaded & set(_CLI_EXTRAS), (
        f"importing galleryfs loaded {sorted(loaded)}: httpx loads its command line by "
        "another name than httpx._main now, the stub in galleryfs/__init__.py misses it")


def test_basic_authorization_is_what_httpx_sends() -> None:
    import httpx

    from galleryfs.registry.auth import basic_authorization
    from galleryfs.registry.credentials import Credentials

    request = httpx.Request("GET", "https://r.example/v2/")
    sent = next(httpx.BasicAuth("ünï", "pä:ss wörd").sync_auth_flow(request))
    assert basic_authorization(Credentials("ünï", "pä:ss wörd")) == sent.headers["authorization"]
