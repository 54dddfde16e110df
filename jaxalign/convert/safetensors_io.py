"""Read safetensors files tensor by tensor (memory-mapped) and write shards.

The reader parses the header itself so that a truncated or corrupt file is reported with
its name, and so bfloat16 tensors read into numpy without a framework.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxalign.errors import CheckpointError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """A memory-mapped safetensors file; ``get(name)`` returns a numpy view of one tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        bad = f"{self.path}: truncated or corrupt safetensors file"
        if size < 8:
            raise CheckpointError(f"{bad} ({size} bytes); re-download or re-export it")
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise CheckpointError(f"{bad} (header claims {header_len} bytes, file has {size}); re-download or re-export it")
            try:
                header = json.loads(f.read(header_len))
            except (ValueError, UnicodeDecodeError):
                raise CheckpointError(f"{bad} (unreadable header); re-download or re-export it") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        for name, e in header.items():
            if not isinstance(e, dict) or e.get("dtype") not in _DTYPES:
                dtype = e.get("dtype") if isinstance(e, dict) else None
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r}")
            try:
                start, end = (int(x) for x in e["data_offsets"])
                nbytes = math.prod(int(n) for n in e["shape"]) * np.dtype(_DTYPES[e["dtype"]]).itemsize
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{bad}: tensor {name!r} has a malformed header entry; re-download or re-export it") from None
            if start < 0 or end - start != nbytes:
                raise CheckpointError(
                    f"{bad}: tensor {name!r} spans bytes {start}..{end} but its shape {e['shape']} "
                    f"and dtype {e['dtype']} need {nbytes}; re-download or re-export it"
                )
            if end > data_len:
                raise CheckpointError(
                    f"{bad}: tensor {name!r} ends at byte {end} of {data_len} data bytes; re-download or re-export it"
                )
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if data_len > 0 else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        start, end = e["data_offsets"]
        raw = self._mmap[self._data_start + start : self._data_start + end]
        return raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


def parse_size(size: str | int) -> int:
    """'5GB', '500MB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_shards(tensors, out_dir: Path, max_shard_size: str | int) -> None:
    """Write an iterable of (name, numpy array) as model.safetensors or numbered shards + index.

    Holds at most one shard in memory at a time.
    """
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    current: dict[str, np.ndarray] = {}
    current_bytes = 0
    tmp_names: list[Path] = []
    total = 0

    def flush():
        nonlocal current, current_bytes
        if not current:
            return
        tmp = out_dir / f"shard-{len(tmp_names):05d}.tmp"
        save_file(current, str(tmp), metadata={"format": "pt"})
        tmp_names.append(tmp)
        shards.append(list(current))
        current, current_bytes = {}, 0

    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        if current and current_bytes + arr.nbytes > limit:
            flush()
        current[name] = arr
        current_bytes += arr.nbytes
        total += arr.nbytes
    flush()
    if len(tmp_names) == 1:
        os.replace(tmp_names[0], out_dir / "model.safetensors")
        return
    weight_map = {}
    n = len(tmp_names)
    for i, (tmp, names) in enumerate(zip(tmp_names, shards)):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, out_dir / final)
        weight_map.update({k: final for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
