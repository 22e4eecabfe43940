"""scripts/bench's P6 (Mountpoint-S3's fio jobs) and P7 (rclone mount of nginx) plumbing:
the job files parse, a missing peer tool is a one-line reason (its rows then say n/a), and
nginx and rclone mounts are gone after use, also when the measurement fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from scripts.bench import BenchError
from scripts.scale import p6, p7
from tests.mounting import fuse_available

needs_nginx = pytest.mark.skipif(p7.find_nginx() is None, reason="nginx not installed")
needs_rclone = pytest.mark.skipif(shutil.which("rclone") is None or not fuse_available(),
                                  reason="rclone or FUSE not available")


def _gone(pid: int) -> bool:
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
@pytest.mark.parametrize("job", p6.JOBS, ids=lambda j: j.name)
def test_p6_job_files_parse_and_name_their_source(job: p6.Job) -> None:
    text = (p6.JOB_DIR / job.file).read_text()
    assert "Source: mountpoint-s3/scripts/fio/" in text and "Scaled:" in text
    assert f"[{job.name}]" in text  # Mountpoint's job name, which names the row
    env = {**os.environ, "SIZE": str(1 << 30), "RUNTIME": "30", "BS": "256m", "SKIP": "17m",
           "DIRECT": "1"}
    proc = subprocess.run(["fio", "--parse-only", str(p6.JOB_DIR / job.file)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_p6_first_latency_from_fio_log(tmp_path: Path) -> None:
    (tmp_path / "x-lat_lat.1.log").write_text("0, 91234567, 0, 1, 0\n3, 2000, 0, 1, 0\n")
    assert p6._first_latency(tmp_path / "x-lat") == pytest.approx(91.234567)
    with pytest.raises(BenchError, match="no latency log"):
        p6._first_latency(tmp_path / "other")


def test_p6_markdown_table() -> None:
    rows = [{"id": "P6.sequential_read", "goal_id": "P6", "unit": "MB/s", "na": None,
             "metric": "Mountpoint-S3 fio job sequential_read (1 GiB file, 256 KiB reads), cold "
                       "(vs cold local file)", "galleryfs": 612.4, "baseline": 1500.0, "ratio": 0.408},
            {"id": "P6.random_read", "goal_id": "P6", "unit": "MB/s", "na": "not measured",
             "metric": "Mountpoint-S3 fio job random_read (1 GiB file, 256 KiB random reads), cold "
                       "(vs cold local file)", "galleryfs": None, "baseline": None, "ratio": None},
            {"id": "G1", "goal_id": "G1", "unit": "MB/s", "na": None, "metric": "x",
             "galleryfs": 1.0, "baseline": 1.0, "ratio": 1.0}]
    table = p6.markdown({"rows": rows}).splitlines()
    assert table[2] == "| `sequential_read` | 1 GiB file, 256 KiB reads | 612 MB/s | 1500 MB/s | 0.41× |"
    assert table[3].startswith("| `random_read` | 1 GiB file, 256 KiB random reads | n/a (not measured)")
    assert len(table) == 4  # G1 is not P6's


def test_p7_missing_tools_are_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(p7.shutil, "which", lambda name: None if name == "rclone" else real_which(name))
    with pytest.raises(BenchError, match=r"^rclone not found \(Debian: apt-get install rclone"):
        p7.setup(SimpleNamespace(notes=[], args=SimpleNamespace(only=None)))  # type: ignore[arg-type]
    monkeypatch.setattr(p7.shutil, "which", lambda name: "/bin/true" if name == "rclone" else None)
    monkeypatch.setattr(p7, "NGINX_CANDIDATES", (str(Path("/nonexistent/nginx")),))
    with pytest.raises(BenchError, match=r"^nginx not found \(Debian: nginx-light"):
        p7.setup(SimpleNamespace(notes=[], args=SimpleNamespace(only=None)))  # type: ignore[arg-type]


def test_p7_cpu_seconds() -> None:
    t0 = p7.cpu_seconds([os.getpid()])
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    t1 = p7.cpu_seconds([os.getpid()])
    assert t0 is not None and t1 is not None and t1 >= t0 + 0.03
    assert p7.cpu_seconds([None]) is None
    assert p7.cpu_seconds([2**22 + 7]) is None  # above pid_max: never a process


@needs_nginx
def test_p7_nginx_counts_bytes_and_stops(tmp_path: Path) -> None:
    root = tmp_path / "www"
    (root / "big").mkdir(parents=True)
    (root / "big" / "model.safetensors").write_bytes(os.urandom(300_000))
    web = p7.Nginx(p7.find_nginx() or "", root, tmp_path / "nginx")
    with pytest.raises(RuntimeError, match="boom"), web:
        assert web.pid is not None
        pids = p7._tree(web.pid)
        assert len(pids) >= 2  # the master and its workers
        r = httpx.get(web.url + "big/model.safetensors", headers={"Range": "bytes=1000-100999"})
        assert r.status_code == 206 and len(r.content) == 100_000
        httpx.head(web.url + "big/model.safetensors")
        web.idle()
        assert web.bytes_sent("/big/model.safetensors") == 100_000  # GETs only
        raise RuntimeError("boom")
    assert web.proc is None
    assert all(_gone(p) for p in pids), "nginx left processes behind"


@needs_nginx
@needs_rclone
def test_p7_rclone_mount_reads_and_is_torn_down_on_error(tmp_path: Path) -> None:
    root = tmp_path / "www"
    (root / "big").mkdir(parents=True)
    data = os.urandom(3 << 20)
    (root / "big" / "model.safetensors").write_bytes(data)
    bench = SimpleNamespace(run_dir=tmp_path / "run")
    with p7.Nginx(p7.find_nginx() or "", root, tmp_path / "nginx") as web:
        mount = p7.RcloneMount(bench, shutil.which("rclone") or "", web.url, "peer")  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="boom"), mount as r:
            pid = r.pid
            assert pid is not None and os.path.ismount(r.path)
            assert Path(r.file("bench/big", "model.safetensors")).read_bytes() == data
            raise RuntimeError("boom")
        assert not os.path.ismount(mount.path)
        assert _gone(pid), "rclone still running"
        web.idle()
        assert web.bytes_sent("/big/model.safetensors") >= len(data)
