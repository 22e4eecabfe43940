from __future__ import annotations

import json
from pathlib import Path

import pytest

from galleryfs import modelpack
from galleryfs.errors import UnsupportedContent
from galleryfs.gallery import metadata

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def _manifest(layers: list[dict]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": modelpack.OCI_MANIFEST,
                       "config": {"mediaType": modelpack.CONFIG_TYPE, "digest": D1, "size": 2},
                       "layers": layers}).encode()


def _layer(path: object, digest: str = D1, size: object = 3,
           media: str = "application/vnd.cncf.model.weight.v1.raw", key: str = modelpack.ANNOTATION_FILEPATH
           ) -> dict:
    return {"mediaType": media, "digest": digest, "size": size, "annotations": {key: path}}


@pytest.mark.parametrize(
    ("path", "kind"),
    [("model.safetensors", "weight"), ("pytorch_model.bin", "weight"), ("model.gguf", "weight"),
     ("config.json", "weight.config"), ("1_Pooling/config.json", "weight.config"),
     ("vocab.txt", "weight.config"), ("README.md", "doc"), ("LICENSE", "doc"),
     ("modeling.py", "code"), ("train.parquet", "dataset")],
)
def test_layer_kind(path: str, kind: str) -> None:
    assert modelpack.layer_kind(path) == kind


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs", "a/../../b", "", "a\\b", "x\x00y", 7, None,
                                 "a/" * 3000])
def test_safe_path_rejects_escapes(bad: object) -> None:
    assert modelpack.safe_path(bad) is None


def test_safe_path_normalises() -> None:
    assert modelpack.safe_path("./a//b/./c") == "a/b/c"


def test_hostile_manifest_is_contained() -> None:
    body = _manifest([
        _layer("good.safetensors"),
        _layer("../../escape"),
        _layer("huge.bin", size=1 << 60),
        _layer("neg.bin", size=-1),
        _layer("baddigest", digest="sha256:../../x"),
        _layer("good.safetensors", digest=D2),  # duplicate path
        _layer("good.safetensors/inner"),  # file used as a folder
        _layer("nested/ok.json", media="application/vnd.cncf.model.weight.config.v1.raw"),
        _layer("folder", media="application/vnd.cncf.model.weight.v1.tar"),
        _layer("oras-file.txt", key=modelpack.ANNOTATION_TITLE),
    ])
    rev = modelpack.parse_manifest(D2, body)
    assert [f.path for f in rev.files] == ["good.safetensors", "nested/ok.json", "folder", "oras-file.txt"]
    assert len(rev.skipped) == 6
    folder = rev.files[2]
    # A packed layer: not served itself; its members go under its path (tarindex).
    assert not folder.servable and folder.packing == modelpack.TAR and folder.under == "folder"


@pytest.mark.parametrize(("media", "packing"), [
    ("application/vnd.cncf.model.weight.v1.raw", None),
    ("application/vnd.cncf.model.weight.v1.tar", "tar"),
    ("application/vnd.cncf.model.doc.v1.tar+gzip", "gzip"),
    ("application/vnd.cncf.model.code.v1.tar+zstd", "zstd"),
    ("application/vnd.cnai.model.dataset.v1.tar", "tar"),
    ("application/vnd.kitops.modelkit.model.v1.tar", "tar"),
    ("application/vnd.kitops.modelkit.code.v1.tar+gzip", "gzip"),
    ("application/vnd.oci.image.layer.v1.tar+gzip", "gzip"),
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"),
    ("application/vnd.cncf.model.weight.v1.tar+xz", ""),  # packed, no decompressor
])
def test_packing_of_media_types(media: str, packing: str | None) -> None:
    assert modelpack.packing(media) == packing


def test_unnamed_packed_layer_unpacks_at_the_root() -> None:
    # KitOps layers carry no path: their members are named from the revision root.
    body = _manifest([{"mediaType": "application/vnd.kitops.modelkit.model.v1.tar",
                       "digest": D1, "size": 10}])
    (layer,) = modelpack.parse_manifest(D2, body).files
    assert layer.packing == modelpack.TAR and layer.under == ""


def test_index_and_garbage_are_refused() -> None:
    with pytest.raises(UnsupportedContent):
        modelpack.parse_manifest(D1, b"not json")
    with pytest.raises(UnsupportedContent, match="index"):
        modelpack.parse_manifest(D1, json.dumps({"schemaVersion": 2, "manifests": []}).encode())


def test_build_manifest_is_canonical() -> None:
    cfg = modelpack.Descriptor(modelpack.CONFIG_TYPE, D1, 2)
    layers = [modelpack.Descriptor("t", D2, 3, {"b": "1", "a": "2"})]
    one = modelpack.build_manifest(cfg, layers, {"z": "1", "k": "2"})
    two = modelpack.build_manifest(cfg, layers, {"k": "2", "z": "1"})
    assert one == two
    parsed = json.loads(one)
    assert parsed["artifactType"] == modelpack.ARTIFACT_TYPE
    assert parsed["config"]["mediaType"] == modelpack.CONFIG_TYPE


def test_describe_real_model(model_dir: Path) -> None:
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    info = metadata.describe(model_dir, files)
    assert info["format"] == "safetensors"
    assert info["architecture"] == "BertModel"
    assert info["modelType"] == "bert"
    # all-MiniLM-L6-v2 has about 22.7 million parameters, stored as float32.
    assert 22_000_000 < info["parameters"] < 23_500_000
    assert info["paramSize"] == "22.7M"
    assert info["tensorDtypes"]["F32"] > 90  # (position_ids are I64)
    assert info["precision"] == "float32"
    # Per file too (pushed as the layer's io.galleryfs.file.* annotations).
    assert info["files"]["model.safetensors"]["parameters"] == info["parameters"]
    assert info["files"]["model.safetensors"]["tensorDtypes"] == info["tensorDtypes"]
    assert set(info["files"]) == {"model.safetensors"}


def test_safetensors_header_limit(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    assert metadata.safetensors_summary(bad) is None


def test_older_cnai_media_types_are_read() -> None:
    body = _manifest([
        _layer("model.safetensors", media="application/vnd.cnai.model.weight.v1.raw"),
        _layer("docs", digest=D2, media="application/vnd.cnai.model.doc.v1.tar"),
    ])
    rev = modelpack.parse_manifest(D2, body)
    assert [(f.path, f.servable) for f in rev.files] == [("model.safetensors", True), ("docs", False)]
