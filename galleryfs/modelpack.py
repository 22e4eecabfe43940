"""The model-revision format: CNCF ModelPack manifests, written and read.

Writing: one raw layer per file, sorted by path, no timestamps unless asked for, so the
same files always give the same manifest digest (one revision per model content).
Reading: ModelPack (and the older `vnd.cnai` names), and ORAS-style artifacts whose
files are named by `org.opencontainers.image.title`. Paths from a manifest are treated
as hostile: anything that could leave the revision folder is dropped. Packed layers
(tar, tar+gzip, tar+zstd: KitOps, ModelPack without `--raw`, ORAS folders) are listed
as one unservable file each here; `tarindex` puts their members in their place.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import posixpath
from dataclasses import dataclass, field

from . import digest as digests
from . import names
from .errors import UnsupportedContent

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class Names:
    """The names one generation of the ModelPack spec writes: `vnd.cncf` since v0.0.7,
    `vnd.cnai` up to v0.0.6, the only ones Harbor 2.13-2.15 show as models."""

    org: str  # cncf or cnai
    diff_ids: str  # the config's modelfs key: diffIds, or diff_ids up to v0.0.6

    @property
    def artifact_type(self) -> str:
        return f"application/vnd.{self.org}.model.manifest.v1+json"

    @property
    def config_type(self) -> str:
        return f"application/vnd.{self.org}.model.config.v1+json"

    @property
    def filepath(self) -> str:
        return f"org.{self.org}.model.filepath"

    def layer_media_type(self, kind: str) -> str:
        return f"application/vnd.{self.org}.model.{kind}.v1.raw"


CNCF = Names("cncf", "diffIds")
CNAI = Names("cnai", "diff_ids")
NAMES = {"cncf": CNCF, "cnai": CNAI}
ARTIFACT_TYPE = CNCF.artifact_type
CONFIG_TYPE = CNCF.config_type
ANNOTATION_FILEPATH = CNCF.filepath
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_CREATED = "org.opencontainers.image.created"
KINDS = ("weight", "weight.config", "doc", "code", "dataset")
# A file's chunk table (README, Security and integrity): the sha256 of every
# `chunks.size` bytes of the blob, in order, as base64 of the concatenated raw digests.
# Kept in the layer's annotations, so the manifest digest covers it, garbage collection
# cannot part it from the revision, and other tools still see one plain file per layer.
ANNOTATION_CHUNK_SIZE = "io.galleryfs.chunks.size"
ANNOTATION_CHUNK_SHA256 = "io.galleryfs.chunks.sha256"
CHUNK_DIGEST = 32  # bytes of a raw sha256
MIN_TABLE_CHUNK = 64 << 10
MAX_TABLE_CHUNK = 1 << 30

# Larger than any model file we can imagine (1 PiB); a descriptor above it is hostile.
MAX_LAYER_SIZE = 1 << 50
MAX_PATH = 4096
MAX_CONFIG_SIZE = 4 << 20
# Layers (files) of one revision (README, Model of the gallery). A 4 MiB manifest holds
# up to about 20,000; no model needs that many files, and each costs the mount an inode
# and the registry a request.
MAX_LAYERS = 10_000

_WEIGHT_EXT = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ggml", ".onnx", ".h5",
               ".msgpack", ".ckpt", ".pkl", ".npz", ".tflite", ".mlmodel", ".pb"}
_CODE_EXT = {".py", ".sh", ".ipynb", ".js", ".ts", ".c", ".cpp", ".cu", ".go", ".rs"}
_DATA_EXT = {".csv", ".tsv", ".parquet", ".jsonl", ".arrow"}
_DOC_EXT = {".md", ".rst", ".pdf", ".html"}
_DOC_NAMES = {"readme", "license", "licence", "notice", "copying", "authors", "citation"}


def layer_kind(path: str) -> str:
    name = posixpath.basename(path).lower()
    stem, ext = posixpath.splitext(name)
    if ext in _WEIGHT_EXT:
        return "weight"
    if ext in _CODE_EXT:
        return "code"
    if ext in _DATA_EXT:
        return "dataset"
    if ext in _DOC_EXT or stem in _DOC_NAMES or name.startswith("."):
        return "doc"
    # Configs, tokenizers, vocabularies: what a loader reads beside the weights.
    return "weight.config"


def layer_media_type(kind: str) -> str:
    return CNCF.layer_media_type(kind)


def layer_path(annotations: dict) -> object:
    """The path a layer's annotations give its file (either spec generation, or ORAS's
    title); unchecked: see `safe_path`."""
    return (annotations.get(CNCF.filepath) or annotations.get(CNAI.filepath)
            or annotations.get(ANNOTATION_TITLE))


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        out: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        return out


def dumps(obj: object) -> bytes:
    """Canonical JSON: the bytes, and so the digest, depend only on the content."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def build_manifest(config: Descriptor, layers: list[Descriptor],
                   annotations: dict[str, str] | None = None, names: Names = CNCF) -> bytes:
    manifest: dict = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": names.artifact_type,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        manifest["annotations"] = dict(sorted(annotations.items()))
    return dumps(manifest)


@dataclass(frozen=True)
class ChunkTable:
    """The expected sha256 of each `chunk_size` piece of one blob (the last may be short)."""

    chunk_size: int
    digests: bytes  # CHUNK_DIGEST bytes per chunk, in order

    def __post_init__(self) -> None:
        size = self.chunk_size
        if not MIN_TABLE_CHUNK <= size <= MAX_TABLE_CHUNK or size & (size - 1):
            raise ValueError(f"chunk size {size} is not a power of two in "
                             f"[{MIN_TABLE_CHUNK}, {MAX_TABLE_CHUNK}]")
        if not self.digests or len(self.digests) % CHUNK_DIGEST:
            raise ValueError("a chunk table holds whole sha256 digests, at least one")

    def __len__(self) -> int:
        return len(self.digests) // CHUNK_DIGEST

    def expected(self, index: int) -> bytes:
        """The raw sha256 that chunk `index` must have."""
        if not 0 <= index < len(self):
            raise IndexError(f"chunk {index} of a {len(self)}-chunk table")
        return self.digests[index * CHUNK_DIGEST:(index + 1) * CHUNK_DIGEST]

    def fits(self, size: int) -> bool:
        """The table has exactly one digest per chunk of a `size`-byte blob."""
        return size > 0 and len(self) == math.ceil(size / self.chunk_size)

    def to_annotations(self) -> dict[str, str]:
        return {ANNOTATION_CHUNK_SIZE: str(self.chunk_size),
                ANNOTATION_CHUNK_SHA256: base64.b64encode(self.digests).decode()}

    @classmethod
    def from_annotations(cls, annotations: dict, size: int) -> ChunkTable | None:
        """The table a layer's annotations carry for its `size`-byte blob; None when it
        carries none; ValueError when what it carries is not a table for that blob."""
        raw_size = annotations.get(ANNOTATION_CHUNK_SIZE)
        raw_digests = annotations.get(ANNOTATION_CHUNK_SHA256)
        if raw_size is None and raw_digests is None:
            return None
        if not isinstance(raw_size, str) or not raw_size.isdigit() or len(raw_size) > 12:
            raise ValueError(f"chunk size {str(raw_size)[:20]!r} is not a number")
        if not isinstance(raw_digests, str):
            raise ValueError("chunk digests missing")
        try:
            body = base64.b64decode(raw_digests, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("chunk digests are not base64") from None
        table = cls(int(raw_size), body)
        if not table.fits(size):
            raise ValueError(f"{len(table)} chunk digests do not fit a {size}-byte blob "
                             f"in {table.chunk_size}-byte chunks")
        return table

    @classmethod
    def of_bytes(cls, data: bytes | bytearray | memoryview, chunk_size: int) -> ChunkTable:
        return cls(chunk_size, digests.chunk_digests(data, chunk_size))


# ---- reading ------------------------------------------------------------------------


@dataclass(frozen=True)
class TarMember:
    """Where a file of a packed layer lies: bytes [offset, offset+size) of the layer's
    tar (the blob itself, or its decompressed stream)."""

    offset: int
    layer_size: int  # the layer blob's size, as the manifest says
    packing: str  # TAR, GZIP or ZSTD
    folder: bool = False  # a folder of the tar (size 0): shown even when empty


@dataclass(frozen=True)
class RevisionFile:
    """One file of a revision, as the manifest describes it."""

    path: str
    digest: str
    size: int
    media_type: str
    servable: bool = True
    reason: str = ""
    # The chunk table the manifest carries for this file, if any (bound to the revision
    # digest with the rest of the manifest). For a member: the layer blob's table.
    table: ChunkTable | None = None
    # A packed layer (not served itself): its compression, and the folder (or file) its
    # members must lie in: the layer's path annotation, or "" (the revision root) when
    # it has none, as KitOps layers (paths in the Kitfile, members relative to the root).
    packing: str = ""
    under: str = ""
    # A member of the packed layer `digest` (tarindex.expand), not a layer of its own.
    member: TarMember | None = None


@dataclass(frozen=True)
class Revision:
    digest: str
    manifest: dict
    files: tuple[RevisionFile, ...]
    skipped: tuple[str, ...]  # why layers were left out, one line each

    # The manifest is any JSON object: what is read from it is checked for its type.
    @property
    def config_descriptor(self) -> dict:
        config = self.manifest.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def annotations(self) -> dict[str, str]:
        annotations = self.manifest.get("annotations")
        return annotations if isinstance(annotations, dict) else {}

    @property
    def created(self) -> str | None:
        created = self.annotations.get(ANNOTATION_CREATED)
        return created if isinstance(created, str) else None

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def safe_path(raw: object) -> str | None:
    """A relative POSIX path that stays inside the revision folder, or None."""
    return _path_or_problem(raw)[0]


def _path_or_problem(raw: object) -> tuple[str | None, str]:
    """The normalised path, or None and why it is refused."""
    if not isinstance(raw, str) or not raw or len(raw) > MAX_PATH or "\x00" in raw:
        return None, "unsafe path"
    if raw.startswith("/") or "\\" in raw:
        return None, "unsafe path"
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None, "unsafe path"
    for part in parts:
        # Names a file system can hold: the mount would give EIO for the whole folder,
        # and a pull would fail, on a name no file system takes.
        problem = names.file_name_problem(part)
        if problem is not None:
            return None, f"file name is {problem}"
    return "/".join(parts), ""


class _Paths:
    """The paths taken so far in a revision, as a tree of components, so that a new
    path is checked against all of them in time linear in its own length. (Comparing
    each path with every other one took 99 s of CPU for a 20,000-layer manifest.)"""

    _FILE = "\x00"  # a key no component can be (components never contain NUL)

    def __init__(self) -> None:
        self._root: dict = {}

    def add(self, path: str) -> str:
        """Take `path`; "" if taken, else why it cannot be."""
        node = self._root
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if self._FILE in node:
                return "is inside a path that is a file"
        if parts[-1] in node:
            child = node[parts[-1]]
            return "duplicate path" if self._FILE in child else "is a folder of another file"
        node[parts[-1]] = {self._FILE: True}
        return ""


TAR = "tar"
GZIP = "gzip"
ZSTD = "zstd"
PACKINGS = (TAR, GZIP, ZSTD)


def packing(media_type: str) -> str | None:
    """TAR, GZIP or ZSTD for a packed layer, "" for one packed some other way, None for
    a plain file. ModelPack and `vnd.cnai` `.tar[+gzip|+zstd]`, KitOps
    `vnd.kitops.modelkit.*.v1.tar[+gzip]`, ORAS folders and Docker layers
    (`...layer.v1.tar+gzip`, `tar.gzip`)."""
    if media_type.endswith((".tar+gzip", ".tar.gzip", ".tar.gz")):
        return GZIP
    if media_type.endswith((".tar+zstd", ".tar.zstd")):
        return ZSTD
    if media_type.endswith(".tar"):
        return TAR
    if ".tar" in media_type or media_type.endswith(("+gzip", "+zstd", ".gzip", ".zstd")):
        return ""
    return None


ORAS_UNPACK = "io.deis.oras.content.unpack"


def _oras_plain_file(media_type: str, annotations: dict) -> bool:
    # ORAS gives single files its default type `...layer.v1.tar` although the blob is the
    # file itself; only folders are real archives, and those it marks for unpacking.
    return (media_type == "application/vnd.oci.image.layer.v1.tar"
            and ANNOTATION_TITLE in annotations and ORAS_UNPACK not in annotations)


def parse_manifest(digest: str, body: bytes, media_type: str = "") -> Revision:
    """A revision from its manifest's bytes; UnsupportedContent if it is not one.

    Linear in the size of the manifest (whose bytes the registry client caps at 4 MiB);
    more than MAX_LAYERS layers are refused before any is looked at.
    """
    try:
        manifest = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: `[[[[...` nested too deep
        raise UnsupportedContent(f"{digest}: manifest is not JSON") from None
    if not isinstance(manifest, dict):
        raise UnsupportedContent(f"{digest}: manifest is not a JSON object")
    kind = manifest.get("mediaType")
    kind = kind if isinstance(kind, str) and kind else media_type
    if "index" in kind or "manifest.list" in kind or "manifests" in manifest:
        raise UnsupportedContent(f"{digest}: is an index of several manifests, not a model revision")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise UnsupportedContent(f"{digest}: manifest has no layers")
    if len(layers) > MAX_LAYERS:
        raise UnsupportedContent(f"{digest}: manifest has {len(layers)} layers, more than "
                                 f"galleryfs takes in one revision ({MAX_LAYERS})")
    files: list[RevisionFile] = []
    skipped: list[str] = []
    tables_ignored: list[str] = []
    taken = _Paths()
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            skipped.append(f"layer {i}: not an object")
            continue
        annotations = layer.get("annotations")
        annotations = annotations if isinstance(annotations, dict) else {}
        raw_path = layer_path(annotations)
        layer_digest = layer.get("digest")
        size = layer.get("size")
        layer_type = layer.get("mediaType")
        layer_type = layer_type if isinstance(layer_type, str) else ""
        if not isinstance(layer_digest, str) or not digests.is_digest(layer_digest):
            skipped.append(f"layer {i}: invalid digest")
            continue
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_LAYER_SIZE:
            skipped.append(f"layer {i}: invalid size {str(size)[:40]}")
            continue
        if raw_path is None:
            # Unnamed layers (a container image, say) still show, named by digest.
            raw_path = layer_digest.replace(":", "-")
        path, problem = _path_or_problem(raw_path)
        if path is None:
            skipped.append(f"layer {i}: {problem} {str(raw_path)[:100]!r}")
            continue
        problem = taken.add(path)
        if problem:
            skipped.append(f"layer {i}: path {path[:100]!r} {problem}")
            continue
        try:
            table = ChunkTable.from_annotations(annotations, size)
        except ValueError as exc:
            # Bound to the digest like everything else: a pusher wrote it wrong. The
            # file is served as one without a table (verified whole, see the mount).
            tables_ignored.append(f"layer {i}: {exc}")
            table = None
        packed = packing(layer_type)
        if packed is not None and not _oras_plain_file(layer_type, annotations):
            named = layer_path(annotations) is not None
            reason = (f"packed layer ({layer_type}): its files show in its place"
                      if packed else f"packed layer ({layer_type}): unknown compression")
            files.append(RevisionFile(path, layer_digest, size, layer_type, False, reason,
                                      table=table, packing=packed, under=path if named else ""))
        else:
            files.append(RevisionFile(path, layer_digest, size, layer_type, table=table))
    # One line each, not one per layer: a hostile manifest can have thousands.
    if skipped:
        log.warning("%s: %d layer(s) left out: %s", digest, len(skipped), _some(skipped))
    if tables_ignored:
        log.warning("%s: chunk table ignored on %d layer(s): %s", digest,
                    len(tables_ignored), _some(tables_ignored))
    return Revision(digest, manifest, tuple(files), tuple(skipped))


def _some(lines: list[str]) -> str:
    return "; ".join(lines[:3]) + ("; ..." if len(lines) > 3 else "")


def parse_config(data: bytes) -> dict | None:
    """A ModelPack config blob as a JSON object, or None if it is not one."""
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None
