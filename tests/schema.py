"""ModelPack's published config schema (tests/data, see its README) and the checks of
every config galleryfs pushes against it."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

import pytest
import trio
from jsonschema import Draft202012Validator

from galleryfs.gallery import pushing
from galleryfs.registry.client import ClientOptions, RegistryClient

SCHEMA = Path(__file__).parent / "data" / "modelpack-config-schema.json"
# modelpack/model-spec schema/config-schema.json at d78bf3231b4f26196c4a955e1007ccc47e19a77c
SCHEMA_SHA256 = "2b47aec475d4e1d82075a1ac414e4b42830ca89f701da47c84425a336ef6a2c3"


@cache
def validator() -> Draft202012Validator:
    raw = SCHEMA.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SCHEMA_SHA256, "the schema copy was changed"
    schema = json.loads(raw)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_errors(config: object) -> list[str]:
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                  for e in validator().iter_errors(config))


def check_config(config: bytes | dict) -> dict:
    """The config, asserted valid against ModelPack's schema (formats checked too)."""
    parsed = json.loads(config) if isinstance(config, bytes) else config
    errors = schema_errors(parsed)
    assert not errors, f"config invalid against ModelPack's schema: {errors}"
    return parsed


def pushed(registry_host: str, repo: str, version: str) -> tuple[dict, dict]:
    """The manifest and the config of a pushed revision, read back from the registry;
    the config asserted valid."""

    async def read() -> tuple[dict, bytes]:
        async with RegistryClient(registry_host, ClientOptions(plain_http=True)) as client:
            m = await client.get_manifest(repo, version)
            manifest = json.loads(m.body)
            desc = manifest["config"]
            return manifest, await client.read_blob(repo, desc["digest"], desc["size"])

    manifest, config = trio.run(read)
    return manifest, check_config(config)


def validate_every_config(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """From now on, every config a push builds in this process is checked as it is
    built; returns the list they are recorded in."""
    built: list[dict] = []
    real = pushing.build_config

    def checked(*args: object, **kwargs: object) -> bytes:
        config = real(*args, **kwargs)  # type: ignore[arg-type]
        built.append(check_config(config))
        return config

    monkeypatch.setattr(pushing, "build_config", checked)
    return built
