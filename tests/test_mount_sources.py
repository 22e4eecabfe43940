"""Where the mount's galleries come from: Harbor's project API when the catalog is closed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harbor_api import HarborAPIStandIn
from tests.mounting import fuse_available, galleryfs, isolated_env, mounted
from tests.registry_harness import Registry

pytestmark = pytest.mark.mount


def test_mount_lists_harbor_projects_without_catalog(registry: Registry, tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    env = isolated_env(tmp_path)
    # Harbor's API in front of the real registry; its catalog is admin-only.
    with HarborAPIStandIn(registry.url, projects={"alpha": True, "beta": True}) as harbor:
        for name in ("alpha/m1", "alpha/llm/base", "beta/m2"):
            r = galleryfs("push", str(src), f"{harbor.host}/{name}:v1", "--plain-http", "--quiet", env=env)
            assert r.returncode == 0, r.stderr
        with mounted(harbor.host, tmp_path / "mnt", env, "--plain-http", "--cache-dir",
                     str(tmp_path / "fscache")) as mnt:
            assert sorted(os.listdir(mnt)) == ["alpha", "beta"]
            assert sorted(os.listdir(mnt / "alpha")) == ["llm", "m1"]
            assert (mnt / "alpha" / "llm" / "base" / "v1" / "config.json").read_text() == "{}"
        assert not harbor.requests("/v2/_catalog")


def _daemon_pids(marker: str) -> list[int]:
    """The mount daemons started with our isolated environment (their argv names no path)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"galleryfs.mount.daemon" in cmdline and marker.encode() in environ:
            pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_unmounts_cleanly(registry: Registry, tmp_path: Path, sig: str) -> None:
    import signal
    import subprocess
    import time

    env = isolated_env(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = galleryfs("mount", registry.host, str(mnt), "--plain-http", "--cache-dir", str(tmp_path / "c"),
                  env=env)
    assert r.returncode == 0, r.stderr
    try:
        pids = _daemon_pids(str(tmp_path))
        assert len(pids) == 1
        os.kill(pids[0], getattr(signal, sig))
        deadline = time.monotonic() + 20
        while os.path.ismount(mnt) or _daemon_pids(str(tmp_path)):
            assert time.monotonic() < deadline, "daemon did not unmount and exit after the signal"
            time.sleep(0.05)
        assert os.listdir(mnt) == []  # the plain, empty directory is back
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)


def test_the_daemon_keeps_the_password_out_of_argv_environment_and_log(
        basic_registry: Registry, tmp_path: Path) -> None:
    """The background child gets its credentials on stdin: nothing another user can read
    in /proc, nor the log a support request would carry (even with --debug), holds them."""
    import subprocess
    import sys

    if not fuse_available():
        pytest.skip("/dev/fuse cannot be opened")
    reg = basic_registry
    env = isolated_env(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "c"
    r = subprocess.run(
        [sys.executable, "-m", "galleryfs", "mount", reg.host, str(mnt), "--plain-http", "--debug",
         "--cache-dir", str(cache), "-u", reg.username, "--password-stdin"],
        input=reg.password + "\n", capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    try:
        assert os.listdir(mnt) == []  # authenticated: the (empty) catalog answered
        (pid,) = _daemon_pids(str(tmp_path))
        secret = reg.password.encode()
        assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert secret not in Path(f"/proc/{pid}/environ").read_bytes()
    finally:
        done = galleryfs("unmount", str(mnt), env=env)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
    assert done.returncode == 0, done.stderr
    logs = list((cache / "logs").glob("*.log"))
    assert logs and all(secret not in log.read_bytes() for log in logs)
    assert any(b"DEBUG" in log.read_bytes() for log in logs)  # the log did say things
    assert secret not in (r.stdout + r.stderr).encode()
