"""The mount's configuration: one meaning for each option, the same in the daemon child."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from galleryfs.errors import UsageError
from galleryfs.mount.config import MountConfig
from galleryfs.registry.client import ClientOptions
from galleryfs.registry.credentials import Credentials
from galleryfs.registry.retry import RetryPolicy


def config(**changes: object) -> MountConfig:
    values: dict = dict(source="registry.example:5000/team", mountpoint="mnt",
                        options=ClientOptions(), cache_dir="cache")
    return MountConfig(**{**values, **changes})


def test_the_child_gets_the_same_configuration(tmp_path: Path) -> None:
    options = ClientOptions(plain_http=True, ca_file="/etc/ca.pem", timeout=7.5,
                            credentials=Credentials("ann", "s3cret"),
                            retry=RetryPolicy(attempts=2, deadline=9.0))
    original = config(options=options, cache_size=0, refresh=1.5, chunk_size=1 << 20,
                      debug=True)
    assert MountConfig.from_json(original.to_json()) == original
    plain = config()
    assert MountConfig.from_json(plain.to_json()) == plain


def test_paths_are_absolute_and_values_checked() -> None:
    c = config()
    assert Path(c.mountpoint).is_absolute() and Path(c.cache_dir).is_absolute()
    assert c.root == ("registry.example:5000", "team")
    with pytest.raises(UsageError, match="no tag or digest"):
        config(source="registry.example:5000/team/model:v1")
    with pytest.raises(UsageError, match="--refresh"):
        config(refresh=-1)
    with pytest.raises(UsageError, match="--cache-size"):
        config(cache_size=-1)
    for bad in (1024, 512 << 20):
        with pytest.raises(UsageError, match="--chunk-size"):
            config(chunk_size=bad)


def test_galleryfs_mount_is_the_only_command_line() -> None:
    """The daemon module is no second parser: it only serves what `galleryfs mount` sends."""
    r = subprocess.run([sys.executable, "-m", "galleryfs.mount.daemon", "host", "/mnt", "-f"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert "galleryfs mount" in r.stderr and "Traceback" not in r.stderr


def test_a_child_that_dies_before_ready_is_reported_with_its_log(tmp_path: Path) -> None:
    """The background path's failure: the child's own error comes back in the message."""
    from galleryfs.errors import GalleryError
    from galleryfs.mount.daemon import _spawn

    (tmp_path / "mnt").mkdir()
    # Nothing listens on port 9: the child's registry check fails, quickly (one attempt).
    options = ClientOptions(plain_http=True, timeout=2, retry=RetryPolicy(attempts=1, deadline=2))
    c = config(source="127.0.0.1:9/g", mountpoint=str(tmp_path / "mnt"), options=options,
               cache_dir=str(tmp_path / "cache"))
    with pytest.raises(GalleryError, match="the mount did not come up") as exc:
        _spawn(c)
    message = str(exc.value)
    # One line: the child's own error and where its log is, no traceback or log tail.
    assert "cannot reach registry 127.0.0.1:9" in message and "(log: " in message
    assert "\n" not in message and "Traceback" not in message
    assert not any((tmp_path / "mnt").iterdir())


def test_a_mount_loads_no_crypto_library_unless_it_checks_signatures() -> None:
    """The daemon imports the trust layer, but `cryptography` (about 9 MiB of resident
    memory, scripts/bench G9) only with a key to check: a key loaded imports it."""
    code = ("import sys, galleryfs.mount.daemon, galleryfs.mount.serve, galleryfs.cli\n"
            "assert 'cryptography' not in sys.modules, 'imported without a key'\n"
            "from galleryfs.trust.keys import parse_public\n"
            "try:\n"
            "    parse_public(b'not a key', 'k')\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__)\n"
            "assert 'cryptography' in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "UsageError"
