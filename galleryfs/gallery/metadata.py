"""What a model directory is: format, architecture, parameters, dtypes.

Stored in the revision's config so a user can tell which platforms can run it without
downloading the weights.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

SAFETENSORS_HEADER_LIMIT = 100 << 20

# safetensors dtype names → the names ModelPack and Hugging Face use for precision.
_PRECISION = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "F8_E4M3": "float8_e4m3", "F8_E5M2": "float8_e5m2", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def file_format(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".gguf", ".ggml"):
        return "gguf"
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            return None
        if head == b"GGUF":
            return "gguf"
        # torch.save writes a zip (PK) or a bare pickle (protocol marker 0x80).
        if head.startswith(b"PK") or head[:1] == b"\x80":
            return "pytorch"
    return None


def safetensors_summary(path: Path) -> tuple[int, Counter[str]] | None:
    """(parameter count, tensors per dtype) from a safetensors header, or None."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return None
            (length,) = struct.unpack("<Q", raw)
            if length > SAFETENSORS_HEADER_LIMIT:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return None
    params = 0
    dtypes: Counter[str] = Counter()
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        shape = info.get("shape") or []
        params += math.prod(int(d) for d in shape)
        dtypes[str(info.get("dtype"))] += 1
    return params, dtypes


def human_params(count: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def describe(root: Path, files: list[str]) -> dict:
    """The description of a model directory; `files` are POSIX paths relative to root."""
    formats: set[str] = set()
    params = 0
    dtypes: Counter[str] = Counter()
    per_file: dict[str, dict] = {}
    for rel in files:
        path = root / rel
        fmt = file_format(path)
        if fmt:
            formats.add(fmt)
        if fmt == "safetensors":
            summary = safetensors_summary(path)
            if summary:
                params += summary[0]
                dtypes.update(summary[1])
                per_file[rel] = {"parameters": summary[0],
                                 "tensorDtypes": dict(sorted(summary[1].items()))}
    hf: dict = {}
    if "config.json" in files:
        try:
            hf = json.loads((root / "config.json").read_text(encoding="utf-8"))
            if not isinstance(hf, dict):
                hf = {}
        except (OSError, ValueError) as exc:
            log.warning("config.json is not readable JSON (%s); architecture unknown", exc)
    architectures = hf.get("architectures") or []
    torch_dtype = hf.get("torch_dtype") or hf.get("dtype")
    precision = torch_dtype or (_PRECISION.get(dtypes.most_common(1)[0][0]) if dtypes else None)
    out: dict = {
        "format": ",".join(sorted(formats)) or None,
        "formats": sorted(formats),
        "architecture": architectures[0] if architectures else None,
        "architectures": architectures,
        "modelType": hf.get("model_type"),
        "dtype": torch_dtype,
        "precision": precision,
        "parameters": params or None,
        "paramSize": human_params(params) if params else None,
        "tensorDtypes": dict(sorted(dtypes.items())),
        "files": per_file,  # path -> parameters, tensorDtypes (safetensors files)
    }
    return out
