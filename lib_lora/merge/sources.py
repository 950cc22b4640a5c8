"""The checkpoint being merged into, as one interface over `.safetensors` and pickled `.ckpt` files.

A `.safetensors` checkpoint is streamed (one tensor in memory at a time, untouched tensors copied byte for byte).
A `.ckpt` is read with `torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary
unpickling (a checkpoint that needs more is refused with one line); it is memory-mapped when it is a zip-format
file, so its tensors are paged in as they are written out.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import IO

from ..errors import BadInput, IncompatibleFile
from .safetensors_io import SafetensorsFile, safetensors_dtype, tensor_bytes

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")


class CheckpointSource:
    """keys (storage order), dtype/shape per key, one tensor at a time, raw copy of untouched tensors."""

    path: Path
    metadata: dict[str, str]
    keys: list[str]

    def dtype(self, key: str) -> str: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def read(self, key: str): ...
    def copy_raw(self, key: str, out: IO[bytes]) -> int: ...
    def close(self) -> None: ...


class SafetensorsSource(CheckpointSource):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = SafetensorsFile(path, what="model file")
        self.metadata = dict(self._file.metadata)
        self.keys = list(self._file.entries)

    def dtype(self, key: str) -> str:
        return self._file.entries[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file.entries[key].shape

    def read(self, key: str):
        return self._file.read_tensor(key)

    def copy_raw(self, key: str, out: IO[bytes]) -> int:
        return self._file.copy_raw(key, out)

    def close(self) -> None:
        self._file.close()


class TorchSource(CheckpointSource):
    def __init__(self, path: Path) -> None:
        import torch

        self.path = path
        self.metadata = {}
        state = _torch_load(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise IncompatibleFile(f"{path.name} does not hold a state dict")
        self._tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if not self._tensors:
            raise IncompatibleFile(f"{path.name} holds no tensors")
        self.keys = list(self._tensors)

    def dtype(self, key: str) -> str:
        return safetensors_dtype(self._tensors[key].dtype)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def read(self, key: str):
        return self._tensors[key]

    def copy_raw(self, key: str, out: IO[bytes]) -> int:
        data = tensor_bytes(self._tensors[key])
        out.write(data)
        return data.nbytes

    def close(self) -> None:
        self._tensors = {}


def _torch_load(path: Path):
    import torch

    def load(mmap: bool):
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(mmap=zipfile.is_zipfile(path))
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return load(mmap=False)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        needed = re.search(r"GLOBAL (\S+)", text)
        if needed or "allowed global" in text:
            what = f" ({needed[1]})" if needed else ""
            raise IncompatibleFile(
                f"{path.name} holds Python objects besides tensors{what} and is not unpickled for safety "
                "(weights_only); convert it to .safetensors with a tool you trust"
            ) from None
        raise IncompatibleFile(f"{path.name} is not a readable checkpoint (corrupt or not a PyTorch file)") from None
    except MemoryError:
        raise
    except Exception as exc:  # torch.load on a damaged file raises almost anything (IndexError, RuntimeError, ...)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise IncompatibleFile(f"{path.name} is not a readable checkpoint (corrupt or truncated: {first})") from None


def open_checkpoint(path: str | os.PathLike) -> CheckpointSource:
    """Open the model to merge into; `.safetensors` streamed, `.ckpt`/`.pt`/`.pth` via weights-only unpickling."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"model file not found: {p}")
    if not p.is_file():
        raise BadInput(f"model is not a file: {p}")
    if p.suffix.lower() in TORCH_SUFFIXES:
        return TorchSource(p)
    if p.suffix.lower() != ".safetensors":
        raise BadInput(f"model {p.name}: expected a .safetensors or .ckpt file")
    return SafetensorsSource(p)
