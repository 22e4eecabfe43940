"""Every config galleryfs pushes is valid against ModelPack's published schema
(tests/data/modelpack-config-schema.json); what has no key there is kept in annotations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trio
from jsonschema import Draft202012Validator

from galleryfs import gallery
from galleryfs.errors import UsageError
from galleryfs.gallery import pushing
from galleryfs.reference import parse
from galleryfs.registry.client import ClientOptions, RegistryClient
from tests.registry_harness import Registry
from tests.schema import check_config, pushed, schema_errors, validate_every_config

DIFF_ID = "sha256:" + "0" * 64


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    validate_every_config(monkeypatch)


def test_formats_are_checked() -> None:
    # Without rfc3339-validator, jsonschema skips "date-time" silently.
    assert "date-time" in Draft202012Validator.FORMAT_CHECKER.checkers
    good = {"descriptor": {"createdAt": "2025-01-01T00:00:00Z"}, "config": {},
            "modelfs": {"type": "layers", "diffIds": [DIFF_ID]}}
    check_config(good)
    assert schema_errors({**good, "descriptor": {"createdAt": "2025-01-01"}})
    # What galleryfs wrote before: its own top-level key.
    assert any("'galleryfs' was unexpected" in e for e in schema_errors({**good, "galleryfs": {}}))


GOOD = ["2025-06-01T12:00:00Z", "2025-06-01t12:00:00z", "2025-06-01T12:00:00.123456789+05:30",
        "2025-06-01T12:00:00-00:00", "1999-12-31T23:59:59+23:59", "2024-02-29T00:00:00Z"]


@pytest.mark.parametrize("text", [
    *GOOD, "yesterday", "2025-06-01", "2025-06-01T12:00:00", "2025-06-01 12:00:00Z",
    "2025-06-01T12:00Z", "2025-6-1T12:00:00Z", "2025-06-01T12:00:00+0200",
    "2025-02-29T00:00:00Z", "2025-13-01T00:00:00Z", "2025-06-01T24:00:00Z",
    "2025-06-01T12:60:00Z", "2025-06-01T12:00:00+24:00", "0000-01-01T00:00:00Z",
    "2025-06-01T12:00:00Z ", " 2025-06-01T12:00:00Z", "2025-06-01T12:00:00Z\n",
    "٢٠٢٥-06-01T12:00:00Z", "2025-06-01T12:00:00.Z", "",
])
def test_created_is_an_rfc3339_date_time_the_schema_accepts(text: str) -> None:
    config = {"descriptor": {"createdAt": text}, "config": {},
              "modelfs": {"type": "layers", "diffIds": [DIFF_ID]}}
    valid = not schema_errors(config)
    try:
        pushing.check_created(text)
        accepted = True
    except UsageError as exc:
        accepted = False
        assert "\n" not in str(exc)
    assert accepted == (text in GOOD)
    # Never anything the schema's own date-time check refuses. (It takes a trailing
    # newline, as its regular expression ends in `$`; --created does not.)
    assert valid or not accepted


def test_galleryfs_annotation_keys_are_its_own() -> None:
    pushing.check_annotations({"team": "nlp", "org.opencontainers.image.source": "x"})
    with pytest.raises(UsageError, match="galleryfs's own"):
        pushing.check_annotations({"io.galleryfs.chunks.size": "1"})


def _safetensors_model(root: Path) -> Path:
    from safetensors.numpy import save_file

    root.mkdir()
    save_file({"embed": np.zeros((64, 32), dtype=np.float16),
               "ids": np.arange(8, dtype=np.int64)}, str(root / "model-00001.safetensors"))
    save_file({"head": np.zeros((32, 8), dtype=np.float16)}, str(root / "model-00002.safetensors"))
    (root / "config.json").write_text(json.dumps({"architectures": ["MyModel", "MyModelForX"],
                                                  "model_type": "mine"}))
    return root


@pytest.mark.parametrize("options", [{}, {"created": "2025-06-01T12:00:00Z"},
                                     {"annotations": {"team": "nlp"}},
                                     {"created": "2025-06-01T14:00:00+02:00",
                                      "annotations": {"org.opencontainers.image.source": "x"}}])
@pytest.mark.parametrize("which", ["real", "safetensors"])
def test_pushed_configs_validate(registry: Registry, model_dir: Path, tmp_path: Path,
                                 which: str, options: dict) -> None:
    src = model_dir if which == "real" else _safetensors_model(tmp_path / "st")

    async def push() -> dict:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            await gallery.push(client, src, parse(f"{registry.host}/g/m:v1"), **options)
            return await gallery.inspect(client, parse(f"{registry.host}/g/m:v1"))

    info = trio.run(push)
    manifest, config = pushed(registry.host, "g/m", "v1")
    assert set(config) == {"descriptor", "config", "modelfs"}
    assert config["modelfs"] == {"type": "layers",
                                 "diffIds": [layer["digest"] for layer in manifest["layers"]]}
    assert config["descriptor"] == ({"createdAt": options["created"]} if "created" in options
                                    else {})
    for key, value in options.get("annotations", {}).items():
        assert manifest["annotations"][key] == value
    if which == "safetensors":
        assert config["config"] == {"format": "safetensors", "paramSize": "2.3K",
                                    "precision": "float16", "architecture": "MyModel"}
        assert info["model"]["parameters"] == 64 * 32 + 8 + 32 * 8
        assert info["model"]["architectures"] == ["MyModel", "MyModelForX"]
        assert info["model"]["modelType"] == "mine" and info["model"]["dtypes"] == ["F16", "I64"]
        files = {f["path"]: f for f in info["files"]}
        assert files["model-00001.safetensors"]["dtypes"] == ["F16", "I64"]
        assert files["model-00001.safetensors"]["tensors"] == 2
        assert files["model-00001.safetensors"]["parameters"] == 64 * 32 + 8
        assert files["model-00002.safetensors"]["dtypes"] == ["F16"]
        assert "dtypes" not in files["config.json"]
