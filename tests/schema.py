"""ModelPack's published config schema (tests/data, see its README) and the checks of
every config galleryfs pushes against it."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

import pytest
import trio
from jsonschema import Draft4Validator, Draft202012Validator

from galleryfs import modelpack
from galleryfs.gallery import pushing
from galleryfs.registry.client import ClientOptions, RegistryClient

SCHEMA = Path(__file__).parent / "data" / "modelpack-config-schema.json"
# modelpack/model-spec schema/config-schema.json at d78bf3231b4f26196c4a955e1007ccc47e19a77c
SCHEMA_SHA256 = "2b47aec475d4e1d82075a1ac414e4b42830ca89f701da47c84425a336ef6a2c3"


# The schema of the `vnd.cnai` generation (--media-types cnai): model-spec v0.0.6
# (3cc558cc253d3137804ae78fa37a5d13084a3a38), schema/config-schema.json, draft-04.
SCHEMA_CNAI = Path(__file__).parent / "data" / "modelpack-config-schema-v0.0.6.json"
SCHEMA_CNAI_SHA256 = "89370ea64444450e85ab01b0a52102b9080b056fdb0977f34f145e7527604a08"


@cache
def validator(names: modelpack.Names = modelpack.CNCF) -> Draft202012Validator | Draft4Validator:
    path, sha, kind = ((SCHEMA, SCHEMA_SHA256, Draft202012Validator) if names is modelpack.CNCF
                       else (SCHEMA_CNAI, SCHEMA_CNAI_SHA256, Draft4Validator))
    raw = path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == sha, "the schema copy was changed"
    schema = json.loads(raw)
    kind.check_schema(schema)
    return kind(schema, format_checker=kind.FORMAT_CHECKER)


def schema_errors(config: object, names: modelpack.Names = modelpack.CNCF) -> list[str]:
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                  for e in validator(names).iter_errors(config))


def check_config(config: bytes | dict, names: modelpack.Names = modelpack.CNCF) -> dict:
    """The config, asserted valid against ModelPack's schema of its generation (formats
    checked too)."""
    parsed = json.loads(config) if isinstance(config, bytes) else config
    errors = schema_errors(parsed, names)
    assert not errors, f"config invalid against ModelPack's {names.org} schema: {errors}"
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
        names = kwargs.get("names", args[3] if len(args) > 3 else modelpack.CNCF)
        built.append(check_config(config, names))  # type: ignore[arg-type]
        return config

    monkeypatch.setattr(pushing, "build_config", checked)
    return built
