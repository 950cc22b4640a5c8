"""A safetensors reader and a streaming writer of our own.

Why not `safetensors.torch`: `load_file` / `save_file` hold the whole checkpoint in memory (twice while saving),
and the merge must stay near one checkpoint's size. Reading the header ourselves (`lib_lora.safetensors_header`,
shared with the LoRA file reader) lets untouched tensors be copied byte for byte from file to file (no torch round
trip, so they stay bit-identical), and names the problem precisely when a file is truncated or not safetensors at
all. The writer lays out the header first (every output shape and dtype is known before any tensor is computed)
and then streams tensor after tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

from ..errors import BadInput, IncompatibleFile
from ..safetensors_header import DTYPES, TensorEntry, parse_header

__all__ = ["DTYPES", "FLOAT_DTYPES", "TensorEntry", "SafetensorsFile", "PlannedTensor", "StreamWriter", "encode_header",
           "tensor_bytes", "torch_dtype", "safetensors_dtype"]

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_CHUNK = 16 * 1024 * 1024


def torch_dtype(name: str):
    import torch

    attr = DTYPES[name][0]
    dtype = getattr(torch, attr, None)
    if dtype is None:
        raise IncompatibleFile(f"tensors of type {name} are not supported by this torch version")
    return dtype


def safetensors_dtype(dtype) -> str:
    attr = str(dtype).replace("torch.", "")
    for name, (torch_attr, _) in DTYPES.items():
        if torch_attr == attr:
            return name
    raise IncompatibleFile(f"tensors of type {attr} cannot be written to safetensors")


class SafetensorsFile:
    """An open safetensors file: validated header, entries in storage order, reads one tensor at a time."""

    def __init__(self, path: str | os.PathLike, what: str = "file") -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise BadInput(f"{what} not found: {self.path}")
        if not self.path.is_file():
            raise BadInput(f"{what} is not a file: {self.path}")
        self._fh: IO[bytes] = open(self.path, "rb")
        try:
            header = parse_header(self._fh, self.path.name)
            self.metadata, self.entries = header.metadata, header.entries
        except BaseException:
            self._fh.close()
            raise

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_tensor(self, key: str):
        """The tensor `key` as a fresh CPU tensor of its stored dtype."""
        import torch

        entry = self.entries[key]
        dtype = torch_dtype(entry.dtype)
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        buf = bytearray(entry.nbytes)
        self._fh.seek(entry.begin)
        got = self._fh.readinto(buf)
        if got != entry.nbytes:
            raise IncompatibleFile(f"{self.path.name} is truncated (tensor {key} is cut short)")
        return torch.frombuffer(buf, dtype=dtype).reshape(entry.shape)

    def copy_raw(self, key: str, out: IO[bytes]) -> int:
        """Copy the stored bytes of `key` to `out` unchanged; returns the byte count."""
        entry = self.entries[key]
        self._fh.seek(entry.begin)
        left = entry.nbytes
        while left:
            chunk = self._fh.read(min(left, _CHUNK))
            if not chunk:
                raise IncompatibleFile(f"{self.path.name} is truncated (tensor {key} is cut short)")
            out.write(chunk)
            left -= len(chunk)
        return entry.nbytes


@dataclass(frozen=True)
class PlannedTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def encode_header(plan: Iterable[PlannedTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header (starting with `{"`, padded with spaces to a multiple of 8)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for item in plan:
        header[item.key] = {"dtype": item.dtype, "shape": list(item.shape), "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text


class StreamWriter:
    """Writes a planned safetensors file to an open binary file, tensor by tensor, in plan order."""

    def __init__(self, fh: IO[bytes], plan: list[PlannedTensor], metadata: dict[str, str]) -> None:
        self._fh = fh
        self._plan = plan
        self._next = 0
        fh.write(encode_header(plan, metadata))

    @property
    def next_item(self) -> PlannedTensor:
        return self._plan[self._next]

    def write_bytes(self, key: str, data) -> None:
        item = self._plan[self._next]
        if key != item.key or memoryview(data).nbytes != item.nbytes:
            raise RuntimeError(f"stream writer: {key} out of order or wrong size")  # a bug, not bad input
        self._fh.write(data)
        self._next += 1

    def write_tensor(self, key: str, tensor) -> None:
        self.write_bytes(key, tensor_bytes(tensor))

    def mark_copied(self, key: str, nbytes: int) -> None:
        """Record a tensor whose bytes the caller copied straight into the file."""
        item = self._plan[self._next]
        if key != item.key or nbytes != item.nbytes:
            raise RuntimeError(f"stream writer: {key} out of order or wrong size")
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self._plan):
            raise RuntimeError("stream writer: not every planned tensor was written")


def tensor_bytes(tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (no copy when it is already contiguous)."""
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy())
