"""Packed model artifacts as other tools write them, built here from their published specs
and pushed raw (httpx) to a real registry.

- KitOps ModelKit (kitops-ml/kitops `pkg/artifact/spec.md`, `pkg/lib/constants/mediaType.go`,
  `pkg/lib/kitfile/layer.go`): config `application/vnd.kitops.modelkit.config.v1+json` holding
  the Kitfile as JSON; one layer per Kitfile entry, `application/vnd.kitops.modelkit.<type>.v1.tar`
  or `.tar+gzip`, no layer annotations; tar members named by their path relative to the
  context folder, the folders leading to them included; manifest annotation
  `ml.kitops.modelkit.cli-version`.
- ModelPack without `--raw` (modpack/modctl `pkg/archiver/archiver.go`): one tar per file,
  its member named by the file's path relative to the model folder, the same path in
  `org.cncf.model.filepath`; `.tar`, `.tar+gzip`, `.tar+zstd`.
- ORAS folders come from oras-py itself (`OrasClient.push(files=[folder])`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import httpx
import zstandard

KITOPS_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
FILEPATH = "org.cncf.model.filepath"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(root: Path, paths: list[str], *, parents: bool = False) -> bytes:
    """A tar of `paths` (files or folders, relative to `root`), members named by those
    paths, folders recursively (as Go's archive/tar walks write them)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        added: set[str] = set()
        for rel in paths:
            if parents:  # KitOps writes the folders that lead to a path
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    folder = "/".join(parts[:i])
                    if folder not in added:
                        added.add(folder)
                        tar.add(root / folder, arcname=folder, recursive=False)
            tar.add(root / rel, arcname=rel, recursive=True)
    return buf.getvalue()


def compress(data: bytes, packing: str) -> bytes:
    if packing == "gzip":
        return gzip.compress(data, mtime=0)
    if packing == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    assert packing == "tar"
    return data


def suffix(packing: str) -> str:
    return "" if packing == "tar" else f"+{packing}"


def push_raw(host: str, repo: str, tag: str, config: tuple[str, bytes],
             layers: list[tuple[str, bytes, dict[str, str]]], *,
             artifact_type: str | None = None,
             annotations: dict[str, str] | None = None) -> str:
    """Push blobs and a manifest with plain HTTP calls; the manifest digest."""
    base = f"http://{host}/v2/{repo}"
    with httpx.Client(timeout=60) as http:
        def put_blob(data: bytes) -> str:
            d = digest(data)
            start = http.post(f"{base}/blobs/uploads/")
            assert start.status_code == 202, start.text
            location = start.headers["location"]
            url = location if location.startswith("http") else f"http://{host}{location}"
            sep = "&" if "?" in url else "?"
            done = http.put(f"{url}{sep}digest={d}", content=data,
                            headers={"content-type": "application/octet-stream"})
            assert done.status_code == 201, done.text
            return d

        config_media, config_body = config
        manifest: dict = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_media, "digest": put_blob(config_body),
                       "size": len(config_body)},
            "layers": [],
        }
        if artifact_type:
            manifest["artifactType"] = artifact_type
        for media, data, notes in layers:
            layer = {"mediaType": media, "digest": put_blob(data), "size": len(data)}
            if notes:
                layer["annotations"] = notes
            manifest["layers"].append(layer)
        if annotations:
            manifest["annotations"] = annotations
        body = json.dumps(manifest).encode()
        r = http.put(f"{base}/manifests/{tag}", content=body,
                     headers={"content-type": OCI_MANIFEST})
        assert r.status_code == 201, r.text
        return digest(body)


def push_modelkit(host: str, repo: str, tag: str, root: Path, *, model: str,
                  code: str, docs: str) -> str:
    """A ModelKit: the model a `.tar`, the code folder a `.tar+gzip`, a doc a `.tar`."""
    kitfile = {
        "manifestVersion": "1.0.0",
        "package": {"name": "test-model", "description": "built by galleryfs tests"},
        "model": {"name": "test-model", "path": model},
        "code": [{"path": code, "description": "pooling config"}],
        "docs": [{"path": docs}],
    }
    layers = [
        ("application/vnd.kitops.modelkit.model.v1.tar", tar_of(root, [model], parents=True), {}),
        ("application/vnd.kitops.modelkit.code.v1.tar+gzip",
         compress(tar_of(root, [code], parents=True), "gzip"), {}),
        ("application/vnd.kitops.modelkit.docs.v1.tar", tar_of(root, [docs], parents=True), {}),
    ]
    return push_raw(host, repo, tag, (KITOPS_CONFIG, json.dumps(kitfile).encode()), layers,
                    annotations={"ml.kitops.modelkit.cli-version": "1.5.0"})


def modelpack_config(diff_ids: list[str]) -> bytes:
    return json.dumps({
        "descriptor": {"name": "test-model"},
        "config": {"format": "safetensors"},
        "modelfs": {"type": "layers", "diffIds": diff_ids},
    }).encode()


def push_modelpack(host: str, repo: str, tag: str, root: Path, files: dict[str, str],
                   packing: str) -> str:
    """modctl without --raw: one tar per file (`files`: path -> ModelPack kind)."""
    layers = []
    diff_ids = []
    for path, kind in files.items():
        tar = tar_of(root, [path])
        diff_ids.append(digest(tar))
        layers.append((f"application/vnd.cncf.model.{kind}.v1.tar{suffix(packing)}",
                       compress(tar, packing), {FILEPATH: path}))
    return push_raw(host, repo, tag, (MODELPACK_CONFIG, modelpack_config(diff_ids)), layers,
                    artifact_type=MODELPACK_ARTIFACT)
