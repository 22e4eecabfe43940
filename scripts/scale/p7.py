"""P7 (issue 15): a FUSE peer in the same run, what a user might mount instead of galleryfs.

`rclone mount` (Debian's rclone) of nginx (`sendfile on`) serving the bench's own model
files from the local disk, `--vfs-cache-mode off`, beside galleryfs mounting the same
files from the registry: a cold sequential read, `get_tensor` of one tensor (time, and
bytes sent: the registry's to galleryfs, nginx's `$body_bytes_sent` to rclone) and two
readers at once. Cold on both sides: a fresh mount of each, the page cache dropped (the
registry and nginx then read from disk too). The two sides alternate, the first one
switching from repeat to repeat.

nginx and every rclone mount run as our own children, each in its own process group, and
are torn down (bounded waits, then SIGKILL, then a lazy unmount) on errors and Ctrl-C too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scripts.bench import Bench

GOALS = ["P7"]

ROOT = Path(__file__).resolve().parent.parent.parent
# Where scripts/bench puts Debian's nginx when the machine has none (`apt-get download` +
# `dpkg -x`: no service is installed or started), beside the default work directory.
PRIVATE_NGINX = ROOT / ".bench" / "tools" / "nginx" / "usr" / "sbin" / "nginx"
RCLONE_OPTIONS = ["--read-only", "--vfs-cache-mode", "off"]
START_TIMEOUT = 30.0  # s: nginx answering, rclone mounted
STOP_TIMEOUT = 15.0
BIG = ("bench/big", "model.safetensors")
BIG2 = ("bench/big2", "model.safetensors")
INSTALL_HINT = "scripts/bench installs it when missing (see its header); or run it with setup"


NGINX_CANDIDATES = ("/usr/sbin/nginx", str(PRIVATE_NGINX))  # after PATH's


def find_nginx() -> str | None:
    for candidate in (shutil.which("nginx"), *NGINX_CANDIDATES):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _version(cmd: list[str]) -> str:
    from scripts.bench import BenchError, first_line

    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{cmd[0]} does not run: {exc}") from None
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise BenchError(f"{cmd[0]} does not run: {first_line(out)}")
    return out.splitlines()[0].strip() if out else "?"


def tools() -> tuple[str, str]:
    """rclone and nginx, or BenchError saying which one is missing."""
    from scripts.bench import BenchError

    rclone = shutil.which("rclone")
    if rclone is None:
        raise BenchError(f"rclone not found (Debian: apt-get install rclone; {INSTALL_HINT})")
    nginx = find_nginx()
    if nginx is None:
        raise BenchError(f"nginx not found (Debian: nginx-light; {INSTALL_HINT})")
    return rclone, nginx


def setup(bench: Bench) -> None:
    from scripts.bench import BenchError

    if bench.args.only and "P7" not in bench.args.only:
        return
    rclone, nginx = tools()
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        raise BenchError("fusermount not found (Debian: fuse3): rclone cannot mount")
    bench.notes.append(f"P7: {_version([rclone, 'version'])} (`rclone mount :http: MNT "
                       f"--http-url URL {' '.join(RCLONE_OPTIONS)}`), "
                       f"{_version([nginx, '-v']).removeprefix('nginx version: ')} "
                       f"(sendfile on) serving the bench's local copies")


# ---- nginx ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[Any], what: str) -> None:
    """Ask our child to stop, wait (bounded), then kill its whole process group (its own:
    nginx's workers, or anything rclone started)."""
    from scripts.bench import log

    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log(f"{what} (pid {proc.pid}) did not stop in {STOP_TIMEOUT:g}s: killing it")
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is its pid
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_TIMEOUT)


def _tail(path: Path) -> str:
    from scripts.bench import first_line

    try:
        return first_line(path.read_text(errors="replace"))
    except OSError:
        return "no log"


class Nginx:
    """nginx serving `root` on a free loopback port, with its own prefix, config, pid file
    and logs under `prefix`; never the system's configuration or service."""

    LOG_FORMAT = "$request_method $uri $status $body_bytes_sent"

    def __init__(self, binary: str, root: Path, prefix: Path) -> None:
        self.binary = binary
        self.root = root
        self.prefix = prefix
        self.access_log = prefix / "access.log"
        self.error_log = prefix / "error.log"
        self.port = 0
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _config(self) -> str:
        p = self.prefix
        # As root, nginx's workers run as nobody, and the bench's files sit in folders
        # only root may enter (a 0700 temp folder): they would answer 403.
        user = "user root;\n" if os.geteuid() == 0 else ""
        temps = "".join(f"  {name}_temp_path {p / 'tmp' / name};\n"
                        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return (f"{user}worker_processes 2;\ndaemon off;\npid {p / 'nginx.pid'};\n"
                f"error_log {self.error_log} warn;\n"
                "events { worker_connections 256; }\n"
                "http {\n"
                f"  log_format p7 '{self.LOG_FORMAT}';\n"
                f"  access_log {self.access_log} p7;\n"
                "  sendfile on;\n  tcp_nopush on;\n  default_type application/octet-stream;\n"
                f"{temps}"
                "  server {\n"
                f"    listen 127.0.0.1:{self.port};\n"
                f"    root {self.root};\n"
                "    autoindex on;\n"
                "    location = /.p7-status { stub_status; access_log off; }\n"
                "  }\n}\n")

    def __enter__(self) -> Nginx:
        from scripts.bench import BenchError

        for attempt in range(3):  # the free port may be taken between the probe and nginx
            shutil.rmtree(self.prefix, ignore_errors=True)
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (self.prefix / "tmp" / name).mkdir(parents=True)
            self.port = _free_port()
            conf = self.prefix / "nginx.conf"
            conf.write_text(self._config())
            self.proc = subprocess.Popen(
                [self.binary, "-p", str(self.prefix), "-c", str(conf), "-e", str(self.error_log)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            try:
                if self._wait_ready():
                    return self
            except BaseException:
                self.__exit__()
                raise
            why = _tail(self.error_log)
            self.__exit__()
            if "in use" not in why or attempt == 2:
                raise BenchError(f"nginx did not start: {why}")
        raise AssertionError("unreachable")

    def _wait_ready(self) -> bool:
        import httpx

        from scripts.bench import BenchError

        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + ".p7-status", timeout=2).status_code == 200:
                    return True
            time.sleep(0.05)
        raise BenchError(f"nginx did not answer within {START_TIMEOUT:g}s: {_tail(self.error_log)}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop(self.proc, "nginx")
            self.proc = None

    def idle(self) -> None:
        """Wait (bounded) until nginx is sending nothing but the answer to our own status
        request (idle keep-alive connections may stay): it writes a request's access-log
        line when the request ends, so every byte sent is then in the log."""
        import httpx

        from scripts.bench import BenchError

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = httpx.get(self.url + ".p7-status", timeout=5).text
            m = re.search(r"Reading:\s*(\d+)\s+Writing:\s*(\d+)", text)
            if m is None:
                raise BenchError(f"nginx's stub_status answered {text[:80]!r}")
            if int(m.group(1)) == 0 and int(m.group(2)) <= 1:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"nginx was still sending after {START_TIMEOUT:g}s")
            time.sleep(0.02)

    def bytes_sent(self, uri: str) -> int:
        """$body_bytes_sent of every GET of `uri` so far."""
        total = 0
        with contextlib.suppress(FileNotFoundError), open(self.access_log) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 4 and parts[0] == "GET" and parts[1] == uri:
                    total += int(parts[3])
        return total


# ---- rclone mount ----------------------------------------------------------------------------


class RcloneMount:
    """`rclone mount :http:` in the foreground, as our child; unmounted on exit."""

    def __init__(self, bench: Bench, binary: str, url: str, name: str) -> None:
        self.bench = bench
        self.binary = binary
        self.url = url
        self.path = bench.run_dir / "mnt" / name
        self.home = bench.run_dir / "rclone"
        self.log = self.home / f"{name}.log"
        self.proc: subprocess.Popen[Any] | None = None

    def __enter__(self) -> RcloneMount:
        from scripts.bench import BenchError

        self.path.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        config = self.home / "rclone.conf"
        config.touch()
        with open(self.log, "w") as log_file:
            # Its own config and cache folders: never the user's ~/.config/rclone.
            self.proc = subprocess.Popen(
                [self.binary, "mount", ":http:", str(self.path), "--http-url", self.url,
                 *RCLONE_OPTIONS, "--config", str(config), "--cache-dir", str(self.home / "cache")],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not os.path.ismount(self.path):
                if self.proc.poll() is not None:
                    raise BenchError(f"rclone mount exited ({self.proc.returncode}): {_tail(self.log)}")
                if time.monotonic() > deadline:
                    raise BenchError(f"rclone mount did not mount within {START_TIMEOUT:g}s: "
                                     f"{_tail(self.log)}")
                time.sleep(0.02)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        from scripts.bench import log

        fusermount = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
        if os.path.ismount(self.path):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run([fusermount, "-u", str(self.path)], capture_output=True,
                               timeout=STOP_TIMEOUT)
        if self.proc is not None:
            _stop(self.proc, "rclone mount")
            self.proc = None
        if os.path.ismount(self.path):
            log(f"{self.path} still mounted after rclone stopped: lazy unmount")
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run([fusermount, "-uz", str(self.path)], capture_output=True,
                               timeout=STOP_TIMEOUT)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def file(self, repo: str, path: str) -> str:
        return str(self.path / repo.removeprefix("bench/") / path)


# ---- measurements ---------------------------------------------------------------------------


def steps(bench: Bench) -> list[tuple[list[str], Callable[[int], None]]]:
    return [(["P7"], lambda i: measure(bench, i))]


def _get_tensor(bench: Bench, path: str) -> float:
    from safetensors import safe_open

    from scripts.bench import BenchError

    name = f"model.layers.{bench.sizes.big_tensors // 2:04d}.weight"
    t0 = time.perf_counter()
    with safe_open(path, framework="numpy") as f:
        tensor = f.get_tensor(name)
    dt = time.perf_counter() - t0
    if tensor.nbytes != bench.sizes.tensor:
        raise BenchError(f"get_tensor returned {tensor.nbytes} bytes")
    return dt


def _two(jobs: list[dict[str, Any]]) -> float:
    from scripts.bench import MB

    return sum(j["io_bytes"] for j in jobs) / max(j["runtime"] for j in jobs) / MB


_TICK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """`pid` and its live descendants (nginx's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in children.read_text().split()]
    return out


def cpu_seconds(pids: list[int | None]) -> float | None:
    """utime + stime of these processes and their live descendants; None if one is gone."""
    total = 0
    for pid in pids:
        if pid is None:
            return None
        for p in _tree(pid):
            try:
                # Fields after the command name (which may hold spaces): utime is the 14th
                # field of the line, stime the 15th.
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                return None
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


class _Cpu:
    """CPU seconds the given processes spend inside the block, added to `key` when known."""

    def __init__(self, bench: Bench, key: str, pids: list[int | None]) -> None:
        self.bench, self.key, self.pids = bench, key, pids

    def __enter__(self) -> None:
        self.start = cpu_seconds(self.pids)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        end = cpu_seconds(self.pids)
        if exc_type is None and self.start is not None and end is not None:
            self.bench.add(self.key, end - self.start)


def _registry_pid(bench: Bench) -> int | None:
    proc = getattr(bench.registry, "process", None)
    return proc.pid if proc is not None else None


def measure(bench: Bench, i: int) -> None:
    # safetensors imports numpy at the first get_tensor: imported after the page cache is
    # dropped, that cost 0.3-0.6 s inside the first side's timing (seen here).
    import numpy  # noqa: F401

    rclone, nginx = tools()
    if bench.args.quick and i == 0:
        bench.notes.append("P7 --quick: one mount per side for the three reads (get_tensor "
                           "first, cold); the full run mounts afresh for each")
    with Nginx(nginx, bench.data, bench.run_dir / "nginx") as web:
        sides: list[Callable[[], None]] = [lambda: _galleryfs(bench),
                                           lambda: _rclone(bench, rclone, web)]
        for side in sides if i % 2 == 0 else sides[::-1]:
            side()


class _Mounts:
    """A fresh mount for each read; in --quick (a smoke test that must stay fast) one
    mount for all three, closed with the stack."""

    def __init__(self, bench: Bench, stack: contextlib.ExitStack[Any],
                 make: Callable[[str], Any]) -> None:
        self.make = make
        self.shared = stack.enter_context(make("shared")) if bench.args.quick else None

    def __call__(self, name: str) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext(self.shared) if self.shared is not None else self.make(name)


def _galleryfs(bench: Bench) -> None:
    from scripts.bench import Mount, fio, fio_seq

    with contextlib.ExitStack() as stack:
        mounts = _Mounts(bench, stack, lambda name: Mount(bench, f"p7-{name}", bench.fresh_cache_dir()))
        with mounts("tensor") as m:
            path = m.file(*BIG)
            os.stat(path)
            before = m.registry_bytes()
            bench.drop_caches()
            bench.add("p7.tensor.gfs", _get_tensor(bench, path))
            # Bytes after the disk cache's write-behind has run: what the read cost in all.
            with contextlib.suppress(Exception):
                m.flush()
            bench.add("p7.bytes.gfs", m.registry_bytes() - before)
        with mounts("seq") as m:
            path = m.file(*BIG)
            os.stat(path)
            bench.drop_caches()
            with _Cpu(bench, "p7.seq.gfs_cpu", [m.pid]), \
                    _Cpu(bench, "p7.seq.gfs_srv_cpu", [_registry_pid(bench)]):
                bench.add("p7.seq.gfs", fio_seq(path))
        with mounts("two") as m:
            a, b = m.file(*BIG), m.file(*BIG2)
            os.stat(a)
            os.stat(b)
            bench.drop_caches()
            with _Cpu(bench, "p7.two.gfs_cpu", [m.pid]), \
                    _Cpu(bench, "p7.two.gfs_srv_cpu", [_registry_pid(bench)]):
                bench.add("p7.two.gfs", _two(fio("two-readers.fio", FILE_A=a, FILE_B=b)))


def _rclone(bench: Bench, rclone: str, web: Nginx) -> None:
    from scripts.bench import BenchError, fio, fio_seq

    uri = "/" + BIG[0].removeprefix("bench/") + "/" + BIG[1]
    with contextlib.ExitStack() as stack:
        mounts = _Mounts(bench, stack,
                         lambda name: RcloneMount(bench, rclone, web.url, f"p7-rclone-{name}"))
        with mounts("tensor") as r:
            path = r.file(*BIG)
            os.stat(path)  # a HEAD and listings: no GET of the file yet
            before = web.bytes_sent(uri)
            bench.drop_caches()
            bench.add("p7.tensor.base", _get_tensor(bench, path))
        # The file closed (and, but in --quick, rclone unmounted): rclone has dropped the
        # response it was reading, and nginx logs what it sent on it.
        web.idle()
        sent = web.bytes_sent(uri) - before
        if sent <= 0:
            raise BenchError(f"nginx's access log shows no bytes sent for {uri}")
        bench.add("p7.bytes.base", sent)
        with mounts("seq") as r:
            path = r.file(*BIG)
            os.stat(path)
            bench.drop_caches()
            with _Cpu(bench, "p7.seq.base_cpu", [r.pid]), \
                    _Cpu(bench, "p7.seq.base_srv_cpu", [web.pid]):
                bench.add("p7.seq.base", fio_seq(path))
        with mounts("two") as r:
            a, b = r.file(*BIG), r.file(*BIG2)
            os.stat(a)
            os.stat(b)
            bench.drop_caches()
            with _Cpu(bench, "p7.two.base_cpu", [r.pid]), \
                    _Cpu(bench, "p7.two.base_srv_cpu", [web.pid]):
                bench.add("p7.two.base", _two(fio("two-readers.fio", FILE_A=a, FILE_B=b)))


# ---- rows -------------------------------------------------------------------------------------


def rows(bench: Bench, row: Callable[..., None]) -> None:
    from scripts.bench import GiB, MiB

    big = f"{bench.sizes.big // GiB} GiB" if bench.sizes.big >= GiB else f"{bench.sizes.big // MiB} MiB"
    tensor = f"{bench.sizes.tensor // MiB} MiB"
    peer = "rclone mount of nginx, --vfs-cache-mode off"

    def div(x: float, y: float) -> float:
        return x / y

    row("P7.seq", f"cold sequential read, {big} file, fio 1 MiB (vs {peer})", "MB/s",
        "> 1.0× (ahead)", "p7.seq.gfs", base="p7.seq.base", ratio=div,
        check=lambda r: r.ratio > 1.0, note=_cpu_note(bench, "p7.seq", bench.sizes.big))
    row("P7.tensor", f"get_tensor of one {tensor} tensor, cold: time (vs {peer})", "s",
        "< 1.0× (ahead)", "p7.tensor.gfs", base="p7.tensor.base", ratio=div,
        check=lambda r: r.ratio < 1.0)
    row("P7.tensor.bytes", f"get_tensor of one {tensor} tensor, cold: registry bytes (vs nginx "
        "$body_bytes_sent to rclone)", "bytes", "< 1.0× (ahead)", "p7.bytes.gfs",
        base="p7.bytes.base", ratio=div, check=lambda r: r.ratio < 1.0,
        note="galleryfs's bytes counted after its disk-cache write-behind finished; nginx's "
             "after rclone unmounted (all its connections closed), GETs of the file only")
    row("P7.two", f"two readers of two {big} files at once, aggregate (vs {peer})", "MB/s",
        "> 1.0× (ahead)", "p7.two.gfs", base="p7.two.base", ratio=div,
        check=lambda r: r.ratio > 1.0, note=_cpu_note(bench, "p7.two", 2 * bench.sizes.big))


def _cpu_note(bench: Bench, key: str, size: int) -> str:
    """CPU seconds per GiB read on each side (medians): on 2 shared cores, what a side
    spends on CPU is what it cannot spend reading."""
    from scripts.bench import GiB

    s = bench.samples
    med = {}
    for k in ("gfs_cpu", "gfs_srv_cpu", "base_cpu", "base_srv_cpu"):
        if not s.get(f"{key}.{k}"):
            return ""
        med[k] = statistics.median(s[f"{key}.{k}"]) / (size / GiB)
    return (f"CPU s per GiB read: galleryfs daemon {med['gfs_cpu']:.2f} + registry "
            f"{med['gfs_srv_cpu']:.2f}; rclone {med['base_cpu']:.2f} + nginx "
            f"{med['base_srv_cpu']:.2f}")
