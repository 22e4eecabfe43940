"""`galleryfs mount` needs galleryfs's build of pyfuse3 and says so, in one line, first."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

from galleryfs.cli import main
from galleryfs.mount.requirements import MissingRequirement, require_patched_pyfuse3


def stand_in(*names: str) -> ModuleType:
    module = ModuleType("pyfuse3")
    for name in names:
        setattr(module, name, object())
    return module


def test_the_installed_pyfuse3_is_galleryfs_build() -> None:
    require_patched_pyfuse3()


def test_a_plain_pyfuse3_is_refused_naming_what_is_missing() -> None:
    with pytest.raises(MissingRequirement) as exc:
        require_patched_pyfuse3(stand_in())
    message = str(exc.value)
    assert "\n" not in message
    assert "pyfuse3.READDIR_INODE_WITHOUT_OPENDIR" in message
    assert "pyfuse3.notify_retrieve" in message
    assert "scripts/setup" in message

    with pytest.raises(MissingRequirement) as exc:
        require_patched_pyfuse3(stand_in("READDIR_INODE_WITHOUT_OPENDIR"))
    assert "notify_retrieve" in str(exc.value)
    assert "READDIR_INODE_WITHOUT_OPENDIR" not in str(exc.value)

    require_patched_pyfuse3(stand_in("READDIR_INODE_WITHOUT_OPENDIR", "notify_retrieve"))


@pytest.mark.parametrize("module", [stand_in("notify_retrieve"), None],
                         ids=["unpatched", "not-installed"])
def test_mount_checks_pyfuse3_before_anything_else(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        module: ModuleType | None) -> None:
    # None in sys.modules makes `import pyfuse3` raise ImportError.
    monkeypatch.setitem(sys.modules, "pyfuse3", module)
    # Neither the missing mountpoint nor the unreachable registry is looked at first.
    code = main(["mount", "127.0.0.1:9/g", "/nonexistent/mnt", "--plain-http"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("galleryfs: error: galleryfs mount needs ")
    assert "scripts/setup" in err
    if module is not None:
        assert "pyfuse3.READDIR_INODE_WITHOUT_OPENDIR" in err
