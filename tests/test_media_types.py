"""The older `vnd.cnai` ModelPack names (model-spec up to v0.0.6), the only ones Harbor
2.13-2.15 show as models: written on request by push, read always (pull and mount)."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import trio

from galleryfs import digest as digests
from galleryfs import modelpack
from galleryfs.cli import main
from galleryfs.registry.client import ClientOptions, RegistryClient
from tests.mounting import isolated_env, mounted
from tests.registry_harness import Registry
from tests.schema import pushed, schema_errors, validate_every_config


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_push_with_cnai_names_validates_and_reads_back(registry: Registry, model_dir: Path,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    built = validate_every_config(monkeypatch)  # each against its own generation's schema
    ref = f"{registry.host}/team-a/minilm"
    assert main(["push", str(model_dir), f"{ref}:cnai", "--plain-http", "--media-types",
                 "cnai", "--quiet"]) == 0
    assert main(["push", str(model_dir), f"{ref}:cncf", "--plain-http", "--quiet"]) == 0
    assert len(built) == 2

    manifest, _ = pushed(registry.host, "team-a/minilm", "cncf")
    # `pushed` checks against the cncf schema: the cnai revision is read here.
    async def read() -> tuple[dict, dict]:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            m = json.loads((await client.get_manifest("team-a/minilm", "cnai")).body)
            c = json.loads(await client.read_blob("team-a/minilm", m["config"]["digest"],
                                                  m["config"]["size"]))
            return m, c

    old, config = trio.run(read)
    assert old["artifactType"] == "application/vnd.cnai.model.manifest.v1+json"
    assert old["config"]["mediaType"] == "application/vnd.cnai.model.config.v1+json"
    assert {layer["mediaType"] for layer in old["layers"]} <= {
        f"application/vnd.cnai.model.{k}.v1.raw" for k in modelpack.KINDS}
    assert all("org.cnai.model.filepath" in layer["annotations"] for layer in old["layers"])
    assert schema_errors(config, modelpack.CNAI) == []
    assert config["modelfs"]["diff_ids"] == [layer["digest"] for layer in old["layers"]]
    # The check can fail: each generation's config is invalid under the other's schema.
    assert schema_errors(config, modelpack.CNCF) and schema_errors(
        json.loads(json.dumps(config).replace("diff_ids", "diffIds")), modelpack.CNAI)
    # Same files, other names: another revision.
    assert [x["digest"] for x in old["layers"]] == [x["digest"] for x in manifest["layers"]]

    dest = tmp_path / "pulled"
    assert main(["pull", f"{ref}:cnai", str(dest), "--plain-http", "--quiet"]) == 0
    names = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(model_dir, dest, names, shallow=False)
    assert mismatch == [] and errors == []


def test_a_cnai_revision_named_only_by_org_cnai_filepath_mounts(registry: Registry,
                                                                 tmp_path: Path) -> None:
    # As an older modctl wrote it: no ORAS title beside the cnai path annotation.
    data = b"weights of an older push\n" * 100
    config = b'{"descriptor":{},"config":{},"modelfs":{"type":"layers","diff_ids":[]}}'

    async def push() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            for blob in (data, config):
                await client.upload_blob_bytes("g/old", digests.of_bytes(blob), blob)
            body = modelpack.build_manifest(
                modelpack.Descriptor(modelpack.CNAI.config_type, digests.of_bytes(config),
                                     len(config)),
                [modelpack.Descriptor(modelpack.CNAI.layer_media_type("weight"),
                                      digests.of_bytes(data), len(data),
                                      {"org.cnai.model.filepath": "sub/w.bin"})],
                names=modelpack.CNAI)
            await client.put_manifest("g/old", "v1", body, modelpack.OCI_MANIFEST)

    trio.run(push)
    env = isolated_env(tmp_path)
    with mounted(registry.host, tmp_path / "mnt", env, "--plain-http") as mnt:
        assert (mnt / "g" / "old" / "v1" / "sub" / "w.bin").read_bytes() == data
    dest = tmp_path / "pulled"
    assert main(["pull", f"{registry.host}/g/old:v1", str(dest), "--plain-http", "--quiet"]) == 0
    assert (dest / "sub" / "w.bin").read_bytes() == data


def test_root_level_repositories_list_inspect_and_pull(registry: Registry, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # HOST/model, as oras, skopeo and docker push it: a model outside any gallery.
    data = b"root-level weights\n" * 50

    async def push() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            for blob in (data, b"{}"):
                await client.upload_blob_bytes("rootmodel", digests.of_bytes(blob), blob)
            body = modelpack.build_manifest(
                modelpack.Descriptor("application/vnd.oci.empty.v1+json", digests.of_bytes(b"{}"), 2),
                [modelpack.Descriptor("application/vnd.oci.image.layer.v1.tar",
                                      digests.of_bytes(data), len(data),
                                      {modelpack.ANNOTATION_TITLE: "w.bin"})])
            await client.put_manifest("rootmodel", "v1", body, modelpack.OCI_MANIFEST)

    trio.run(push)
    host = registry.host
    assert main(["ls", host, "--plain-http"]) == 0
    assert "models outside any gallery: rootmodel" in capsys.readouterr().out
    assert main(["ls", host, "--plain-http", "--json"]) == 0
    assert {"gallery": None, "model": "rootmodel"} in json.loads(capsys.readouterr().out)
    assert main(["ls", f"{host}/rootmodel", "--plain-http", "--json"]) == 0
    assert [r["tags"] for r in json.loads(capsys.readouterr().out)] in (["v1"], [["v1"]])
    assert main(["inspect", f"{host}/rootmodel:v1", "--plain-http"]) == 0
    assert [f["path"] for f in json.loads(capsys.readouterr().out)["files"]] == ["w.bin"]
    assert main(["pull", f"{host}/rootmodel:v1", str(tmp_path / "out"), "--plain-http"]) == 0
    assert (tmp_path / "out" / "w.bin").read_bytes() == data
    assert main(["cp", f"{host}/rootmodel:v1", f"{host}/g/promoted:v1", "--plain-http"]) == 0
    capsys.readouterr()
    # --quiet: the first column only, one name a line for scripts (no sentence among them).
    assert main(["ls", host, "--plain-http", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == ["g"]
    # Writing stays inside galleries: a push names GALLERY/MODEL.
    assert main(["push", str(tmp_path / "out"), f"{host}/rootmodel:v2", "--plain-http"]) == 2
    assert "expected HOST/GALLERY/MODEL" in capsys.readouterr().err
    assert main(["ls", f"{host}/nothing", "--plain-http"]) == 1
    assert "no such gallery or model" in capsys.readouterr().err
