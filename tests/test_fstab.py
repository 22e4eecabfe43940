"""Mounting like any Linux file system: mount(8) with -o options, other users through
allow_other, mtimes that survive a remount, and one-line reasons when a mount cannot be."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from galleryfs import cli, fstab
from galleryfs.errors import GalleryError
from galleryfs.mount import daemon
from galleryfs.mount.mountpoint import check_fuse
from galleryfs.mount.tree import UNDATED_NS
from tests.mounting import fuse_available, galleryfs, isolated_env, mounted
from tests.registry_harness import Registry

HELPER = Path("/usr/sbin/mount.fuse.galleryfs")
DATA = b"weights" * 1000


def push_small(registry: Registry, tmp_path: Path, env: dict[str, str]) -> None:
    src = tmp_path / "model"
    src.mkdir()
    (src / "w.bin").write_bytes(DATA)
    r = galleryfs("push", str(src), f"{registry.host}/g/m:v1", "--plain-http", env=env)
    assert r.returncode == 0, r.stderr


@contextlib.contextmanager
def world_reachable_dir() -> Iterator[Path]:
    """A mountpoint other users can reach: pytest's tmp_path is under a 0700 folder."""
    top = Path(tempfile.mkdtemp(prefix="galleryfs-shared-", dir="/tmp"))
    try:
        top.chmod(0o755)
        (top / "mnt").mkdir(mode=0o755)
        yield top / "mnt"
    finally:
        if os.path.ismount(top / "mnt"):
            subprocess.run(["fusermount3", "-uz", str(top / "mnt")], check=False)
        shutil.rmtree(top, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "nobody", "--", *argv], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


# ---- the helper's option mapping --------------------------------------------------------


def test_options_map_to_long_options_and_generic_ones_are_dropped() -> None:
    assert fstab.to_arguments([
        "rw,nosuid,nodev,_netdev,noauto,user,x-systemd.automount,comment=x,default_permissions",
        "plain_http,cache-dir=/var/cache/g,cache_size=20G,require_signed_by=/k.pem",
        "allow_other,uid=1000,umask=027"]) == [
        "--plain-http", "--cache-dir=/var/cache/g", "--cache-size=20G",
        "--require-signed-by=/k.pem", "--allow-other", "--uid=1000", "--umask=027"]
    assert fstab.parse(["reg:5000/team", "/mnt/m", "-n", "-s", "-o", "ro,plain_http",
                        "-t", "fuse.galleryfs"]) == ("reg:5000/team", "/mnt/m", ["ro,plain_http"],
                                                     False)
    assert fstab.parse(["-oplain_http", "-fv", "a", "b"]) == ("a", "b", ["plain_http"], True)
    assert fstab.main(["-f", "reg/team", "/nonexistent"]) == 0  # mount -f: a fake mount


def test_an_option_value_starting_with_a_dash_stays_its_value() -> None:
    # `cache_dir=-x` is a cache folder named "-x", not a flag the mount would parse.
    argv = ["mount", "reg/team", "/mnt/m", *fstab.to_arguments(
        ["cache_dir=-x,username=-svc,refresh=5"])]
    args = cli.build_parser().parse_args(argv)
    assert (args.cache_dir, args.username, args.refresh) == ("-x", "-svc", 5)


@pytest.mark.parametrize("option", ["foreground", "fore", "password_stdin"])
def test_options_that_would_hang_mount8_are_refused(option: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # mount(8) (and systemd, at boot) waits for the helper: a foreground mount never returns.
    assert fstab.main(["reg/team", "/nonexistent", "-o", f"ro,{option}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mount.fuse.galleryfs: -o ") and "cannot be used" in err
    assert len(err.splitlines()) == 1


def test_helper_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert fstab.main(["only-one"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mount.fuse.galleryfs: expected SOURCE and MOUNTPOINT")
    assert len(err.splitlines()) == 1
    # An option the mount does not have: argparse's one line, exit 2, nothing mounted.
    with pytest.raises(SystemExit) as exc:
        fstab.main(["127.0.0.1:9/g", "/nonexistent", "-o", "no_such_option"])
    assert exc.value.code == 2


# ---- through the kernel ------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) runs helpers for root")
def test_mount_through_mount8(registry: Registry, tmp_path: Path) -> None:
    if not fuse_available():
        pytest.skip("/dev/fuse cannot be opened")
    assert HELPER.is_file(), "run scripts/setup (as root) to install mount.fuse.galleryfs"
    env = isolated_env(tmp_path)
    push_small(registry, tmp_path, env)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "fuse.galleryfs", registry.host, str(mnt), "-o",
         f"ro,nosuid,nodev,_netdev,plain_http,cache_dir={tmp_path / 'cache'},refresh=5"],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    try:
        assert r.returncode == 0, r.stderr
        assert (mnt / "g" / "m" / "v1" / "w.bin").read_bytes() == DATA
        line = next(x for x in Path("/proc/self/mounts").read_text().splitlines()
                    if x.split()[1] == str(mnt))
        assert line.split()[2] == "fuse.galleryfs" and "nosuid" in line and "nodev" in line
    finally:
        done = galleryfs("unmount", str(mnt), env=env)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a reader as another user")
def test_allow_other_lets_another_user_read_and_umask_restricts(registry: Registry,
                                                                 tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    push_small(registry, tmp_path, env)
    common = ("--plain-http", "--cache-size", "0")
    with world_reachable_dir() as mnt:
        with mounted(registry.host, mnt, env, *common):
            denied = as_nobody("cat", str(mnt / "g" / "m" / "v1" / "w.bin"))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr
        with mounted(registry.host, mnt, env, *common, "--allow-other"):
            got = as_nobody("cat", str(mnt / "g" / "m" / "v1" / "w.bin"))
            assert got.returncode == 0, got.stderr
            assert got.stdout.encode() == DATA
        with mounted(registry.host, mnt, env, *common, "--allow-other", "--umask", "077",
                     "--uid", "0", "--gid", "0"):
            denied = as_nobody("ls", str(mnt / "g"))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr
            st = (mnt / "g" / "m" / "v1" / "w.bin").stat()
            assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o400, 0, 0)
            assert (mnt / "g" / "m" / "v1" / "w.bin").read_bytes() == DATA  # the owner reads


def test_undated_revisions_keep_their_mtime_across_remounts(registry: Registry,
                                                            tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    push_small(registry, tmp_path, env)
    seen = []
    for _ in range(2):
        with mounted(registry.host, tmp_path / "mnt", env, "--plain-http") as mnt:
            seen.append((mnt / "g" / "m" / "v1" / "w.bin").stat().st_mtime_ns)
    assert seen == [UNDATED_NS, UNDATED_NS]


# ---- why a mount cannot be, in one line ---------------------------------------------------


def test_missing_fuse_device_and_fusermount3_are_one_line(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(GalleryError) as exc:
        check_fuse(device=str(tmp_path / "no-fuse"))
    assert "cannot use" in str(exc.value) and "modprobe fuse" in str(exc.value)
    assert "\n" not in str(exc.value)

    if not fuse_available():
        pytest.skip("/dev/fuse cannot be opened")
    # A PATH without fusermount3: the mount says so before anything starts.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**isolated_env(tmp_path), "PATH": str(bin_dir)}
    (tmp_path / "mnt").mkdir()
    r = galleryfs("mount", registry.host, str(tmp_path / "mnt"), "--plain-http", env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == "galleryfs: error: fusermount3 not found: install fuse3 " \
                               "(`apt install fuse3`)"
    assert not os.path.ismount(tmp_path / "mnt")


def test_a_dead_child_is_reported_by_its_last_error(tmp_path: Path) -> None:
    log = tmp_path / "mount.log"
    log.write_text("2026-12-03 galleryfs: INFO: x: starting\n"
                   "2026-12-03 galleryfs: ERROR: galleryfs.mount.daemon: cannot mount on /m: "
                   "fuse: device not found\n")
    assert daemon._last_error(log) == "cannot mount on /m: fuse: device not found"
    log.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "    boom()\nRuntimeError: something broke\n")
    assert daemon._last_error(log) == "RuntimeError: something broke"
