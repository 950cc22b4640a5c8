"""The one safetensors header parser: LoRA files (network, inspect) and checkpoints (merge) are read through it.

Why our own: the header alone answers what inspect and the merge planner need (keys, dtypes, shapes, metadata)
without loading a tensor, and it lets us name the problem in one line when a file is truncated, empty or not
safetensors at all (the library's errors are multi-line Rust messages). No torch here.

Format: 8-byte little-endian header length N, N bytes of JSON (`__metadata__`: str -> str; per tensor
`{"dtype", "shape", "data_offsets": [begin, end]}` relative to the data section), then the data section, which
the tensors fill exactly, in any order, without gaps.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import IO

from .errors import IncompatibleFile

# safetensors dtype -> (torch attribute name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    metadata: dict[str, str]  # `__metadata__`, every value a string (a non-string is JSON-encoded)
    entries: dict[str, TensorEntry]  # in storage order
    length: int  # N: the JSON's byte length; the data section starts at 8 + N

    def as_json(self) -> dict:
        """The header as the file's JSON spells it: tensor entries (offsets relative to the data section) and
        `__metadata__` when present."""
        base = 8 + self.length
        out: dict = {"__metadata__": dict(self.metadata)} if self.metadata else {}
        for e in self.entries.values():
            out[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin - base, e.end - base]}
        return out


def parse_header(fh: IO[bytes], name: str) -> Header:
    """Read and check the header of the open file `fh` (at offset 0); `name` is how errors name the file.

    Raises IncompatibleFile with one line for an empty, truncated, padded or non-safetensors file."""
    size = os.fstat(fh.fileno()).st_size
    head = fh.read(8)
    if len(head) < 8:
        raise IncompatibleFile(f"{name} is not a safetensors file (empty or truncated: only {size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n < 2 or n > MAX_HEADER:
        raise IncompatibleFile(f"{name} is not a safetensors file (it does not start with a header length)")
    if 8 + n > size:
        raise IncompatibleFile(f"{name} is truncated (header needs {8 + n} bytes, file has {size})")
    try:
        header = json.loads(fh.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise IncompatibleFile(f"{name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise IncompatibleFile(f"{name} is not a safetensors file (its header is not a JSON object)")
    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict):
        raise IncompatibleFile(f"{name} has a malformed __metadata__ block")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw_meta.items()}
    entries: list[TensorEntry] = []
    base = 8 + n
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise IncompatibleFile(f"{name} has a malformed header entry for {key!r}") from None
        if dtype not in DTYPES:
            raise IncompatibleFile(f"{name}: tensor {key!r} has an unknown dtype {dtype!r}")
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * DTYPES[dtype][1]:
            raise IncompatibleFile(f"{name} is corrupt (size of tensor {key!r} does not match its shape)")
        entries.append(TensorEntry(key, dtype, shape, base + begin, base + end))
    entries.sort(key=lambda e: (e.begin, e.end))
    expected = base
    for entry in entries:
        if entry.begin != expected:
            raise IncompatibleFile(f"{name} is corrupt (tensor data overlaps or has gaps at {entry.key!r})")
        expected = entry.end
    if expected > size:
        raise IncompatibleFile(f"{name} is truncated (needs {expected} bytes, file has {size})")
    if expected < size:
        raise IncompatibleFile(f"{name} is corrupt ({size - expected} unexpected bytes after the tensor data)")
    return Header(metadata, {e.key: e for e in entries}, n)
