"""Push details: a repeat push neither re-reads unchanged files nor re-sends blobs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from galleryfs import digest as digests
from galleryfs import gallery
from galleryfs.reference import parse
from galleryfs.registry.client import ClientOptions, RegistryClient
from tests.registry_harness import Registry


def test_repeat_push_reuses_digests_and_sees_changes(registry: Registry, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "m"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(50_000))
    (src / "sub" / "b.json").write_text("{}")
    hashed: list[str] = []
    real = digests.of_file

    def counting(path: str | os.PathLike[str], size: int | None = None) -> str:
        hashed.append(Path(path).name)
        return real(path, size)

    monkeypatch.setattr(digests, "of_file", counting)

    requests: list[int] = []

    async def push() -> gallery.PushResult:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            result = await gallery.push(client, src, parse(f"{registry.host}/g/m:v1"))
            requests.append(client.requests_sent)
            return result

    first = trio.run(push)
    assert sorted(hashed) == ["a.bin", "b.json"] and len(first.uploaded) == 2
    hashed.clear()
    again = trio.run(push)
    assert hashed == [] and again.digest == first.digest and again.uploaded == []
    # The tag already names this revision: one HEAD of the manifest, nothing else.
    assert requests[-1] == 1 and sorted(again.existing) == ["a.bin", "sub/b.json"]
    # Changed bytes change the file's metadata: it is hashed again and makes a new revision.
    (src / "a.bin").write_bytes(os.urandom(50_000))
    changed = trio.run(push)
    assert hashed == ["a.bin"] and changed.digest != first.digest and changed.uploaded == ["a.bin"]
