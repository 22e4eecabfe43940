"""scripts/bench's Mount: a daemon that outlives its unmount is stopped and noted, and one
that exits is left alone (the next mount reuses the cache directory)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from scripts.bench import Mount

IGNORES_TERM = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(60)")


def _mount(tmp_path: Path, pid: int) -> tuple[Mount, SimpleNamespace]:
    bench = SimpleNamespace(run_dir=tmp_path, mounts=[], notes=[])
    mount = Mount(bench, "m", tmp_path / "cache")  # type: ignore[arg-type]
    mount.watch(pid)
    return mount, bench


@pytest.fixture(autouse=True)
def _short_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Mount, "EXIT_WAIT", 0.3)
    monkeypatch.setattr(Mount, "STOP_WAIT", 2.0)


def test_a_daemon_still_running_is_stopped_and_noted(tmp_path: Path) -> None:
    daemon = subprocess.Popen(["sleep", "60"])
    try:
        mount, bench = _mount(tmp_path, daemon.pid)
        mount.unmount()
        assert daemon.wait(timeout=10) == -15
        assert len(bench.notes) == 1
        assert f"pid {daemon.pid}" in bench.notes[0] and "stopped with SIGTERM" in bench.notes[0]
    finally:
        daemon.kill()
        daemon.wait()


def test_one_that_ignores_sigterm_gets_sigkill(tmp_path: Path) -> None:
    daemon = subprocess.Popen([sys.executable, "-c", IGNORES_TERM], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline() == "ready\n"
        mount, bench = _mount(tmp_path, daemon.pid)
        mount.unmount()
        assert daemon.wait(timeout=30) == -9
        assert len(bench.notes) == 1 and "stopped with SIGKILL" in bench.notes[0]
    finally:
        daemon.kill()
        daemon.wait()


def test_a_daemon_exiting_during_the_wait_is_left_alone(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Mount, "EXIT_WAIT", 20.0)
    daemon = subprocess.Popen(["sleep", "0.2"])
    try:
        mount, bench = _mount(tmp_path, daemon.pid)
        t0 = time.monotonic()
        mount.unmount()
        assert time.monotonic() - t0 < 10  # returned when it exited, not at EXIT_WAIT
        assert daemon.wait(timeout=10) == 0 and bench.notes == []
    finally:
        daemon.kill()
        daemon.wait()


def test_a_daemon_gone_before_the_unmount_is_not_waited_for(tmp_path: Path) -> None:
    daemon = subprocess.Popen(["true"])
    daemon.wait()
    mount, bench = _mount(tmp_path, daemon.pid)  # reaped: its pid names nothing now
    assert mount.pid is None and mount.pidfd is None
    mount.unmount()
    assert bench.notes == []
