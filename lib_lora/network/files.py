"""LoRA files on disk: save (atomic, hashed), load (with clear errors), the webui's user-metadata sidecar.

Facts these follow (lora-format.md 1, 4.3; webui-api.md 4.8-4.10):
- safetensors, header JSON starting with `{"` (the webui's metadata reader checks those two bytes), every metadata
  value a string;
- `sshs_model_hash` = sha256 of everything after the header (kohya's "addnet" hash, what the webui trusts as the
  LoRA hash); `sshs_legacy_hash` = first 8 hex of sha256 over 0x10000 bytes at 0x100000 of an in-memory
  serialisation holding only the `ss_*` metadata, as sd-scripts computes it;
- `ss_output_name` equals the file's own stem (the webui inserts it as `<lora:NAME:w>`);
- `<stem>.json` beside the file carries the card's user metadata under the webui's exact keys.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch

from ..errors import BadInput, IncompatibleFile
from ..fsutil import atomic_write_bytes, check_name
from ..safetensors_header import parse_header

PRECISIONS = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
SD_VERSIONS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
SIDECAR_KEYS = ("activation text", "preferred weight", "sd version", "description")
_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000


# --------------------------------------------------------------------------------------------------- save
def save_lora(
    path: str | os.PathLike,
    network_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    precision: str = "fp16",
) -> Path:
    """Write a kohya LoRA safetensors file atomically and return its path.

    Floating tensors are cast to `precision` ('fp16' | 'bf16' | 'fp32'; alpha too, as sd-scripts does).
    `ss_output_name` (if present) is set to the file's stem; `sshs_model_hash` / `sshs_legacy_hash` are added.
    Nothing is written when anything is wrong (bad name, non-string metadata, disk full)."""
    from safetensors.torch import save as serialise

    target = Path(path)
    if ".." in target.parts:
        raise BadInput(f"LoRA path may not contain '..': {str(target)!r}")
    if target.suffix != ".safetensors":
        raise BadInput(f"LoRA file name must end in .safetensors: {target.name!r}")
    check_name(target.stem, "output name")
    dtype = _precision(precision)
    source = network_or_state_dict.state_dict() if isinstance(network_or_state_dict, torch.nn.Module) \
        else network_or_state_dict
    tensors = {}
    for key, value in source.items():
        if not isinstance(value, torch.Tensor):
            raise BadInput(f"{key} is not a tensor")
        value = value.detach()
        if value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.to("cpu").contiguous()
    if not tensors:
        raise BadInput("nothing to save: the network has no modules")
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise BadInput(f"metadata {key!r} must be a string (got {type(value).__name__})")
    if "ss_output_name" in meta:
        if meta.get("modelspec.title") == meta["ss_output_name"]:
            meta["modelspec.title"] = target.stem
        meta["ss_output_name"] = target.stem
    for key in ("sshs_model_hash", "sshs_legacy_hash"):
        meta.pop(key, None)
    # sd-scripts hashes a serialisation that carries only the ss_* metadata (so later user metadata edits don't
    # change the legacy hash), passed as a dict even when empty (the header then holds `"__metadata__":{}`); the
    # data section, hence the model hash, does not depend on the header at all
    hashed = serialise(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    meta["sshs_model_hash"] = hashlib.sha256(_data_section(hashed)).hexdigest()
    meta["sshs_legacy_hash"] = hashlib.sha256(hashed[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]
    data = serialise(tensors, metadata=meta)
    if not data[8:10] == b'{"':
        raise RuntimeError("safetensors wrote a header the webui cannot read (it must start with '{\"')")
    _write(target, data)
    return target


def _write(target: Path, data: bytes) -> None:
    """Atomic write; a full disk or an unwritable folder is a one-line BadInput (the old file, if any, is kept)."""
    try:
        atomic_write_bytes(target, data)
    except OSError as exc:
        reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise BadInput(f"could not write {target.name}: {reason} (in {target.parent}); nothing was written") from None


def _precision(precision: str) -> torch.dtype:
    try:
        return PRECISIONS[str(precision).lower()]
    except KeyError:
        raise BadInput(f"unknown save precision {precision!r} (use fp16, bf16 or fp32)") from None


def _data_section(serialised: bytes) -> bytes:
    (length,) = struct.unpack("<Q", serialised[:8])
    return serialised[8 + length:]


def lora_path(folder: str | os.PathLike, output_name: str, epoch: int | None = None) -> Path:
    """`<folder>/<output_name>.safetensors`, or `<output_name>-NN.safetensors` for an epoch (sd-scripts' and the
    webui's naming). The name is checked (`fsutil.check_name`): no path separators, no '..'."""
    name = check_name(output_name, "output name")
    if epoch is not None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise BadInput(f"epoch must be a whole number >= 0, got {epoch!r}")
        name = f"{name}-{epoch:02d}"
    return Path(folder) / f"{name}.safetensors"


# --------------------------------------------------------------------------------------------------- load
def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The safetensors header (tensor entries + `__metadata__`) and its byte length, checked against the file size
    (`lib_lora.safetensors_header`, the parser the merge uses too).

    Raises IncompatibleFile for a missing, empty, truncated or non-safetensors file."""
    p = Path(path)
    if not p.exists():
        raise IncompatibleFile(f"{p}: no such file")
    if p.is_dir():
        raise IncompatibleFile(f"{p}: is a folder, not a LoRA file")
    if p.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise IncompatibleFile(f"{p.name}: only .safetensors LoRA files are supported (not {p.suffix})")
    with open(p, "rb") as fh:
        header = parse_header(fh, p.name)
    return header.as_json(), header.length


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header's `__metadata__` (string -> string), empty when there is none."""
    header, _ = read_header(path)
    return dict(header.get("__metadata__") or {})


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors LoRA file, tensors on the CPU as stored.

    Raises IncompatibleFile with a one-line reason for a missing, corrupt, truncated or non-safetensors file."""
    from safetensors.torch import load_file

    header, _ = read_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types; the user needs one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IncompatibleFile(f"{Path(path).name}: corrupt safetensors file ({reason})") from None
    return tensors, dict(header.get("__metadata__") or {})


def file_model_hash(path: str | os.PathLike) -> str:
    """sha256 of the file after its header: the hash the webui shows for a LoRA ("addnet hash")."""
    _, length = read_header(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(8 + length)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ sidecar
def _existing_card(path: Path) -> dict:
    """The card already beside the file (what the user typed into the webui: notes, negative text, ...), or {}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_sidecar(
    lora_path: str | os.PathLike,
    activation_text: str = "",
    preferred_weight: float = 0.0,
    sd_version: str = "SD1",
    description: str = "",
) -> Path:
    """Write `<stem>.json` beside the LoRA with the webui's user-metadata keys and return its path. Other keys of
    an existing card (the webui's "notes", "negative text", ...) are kept.

    `sd_version` is 'SD1' | 'SD2' | 'SDXL' (or 'sd1' | 'sd2' | 'sdxl'); `preferred_weight` 0 means the webui's
    default multiplier."""
    version = SD_VERSIONS.get(str(sd_version).lower(), str(sd_version))
    if version not in SD_VERSIONS.values():
        raise BadInput(f"sd version must be SD1, SD2 or SDXL, got {sd_version!r}")
    if isinstance(preferred_weight, bool) or not isinstance(preferred_weight, (int, float)):
        raise BadInput(f"preferred weight must be a number, got {preferred_weight!r}")
    target = Path(lora_path).with_suffix(".json")
    if ".." in target.parts:
        raise BadInput(f"LoRA path may not contain '..': {str(target)!r}")
    check_name(target.stem, "output name")
    data = {
        "activation text": str(activation_text),
        "preferred weight": float(preferred_weight),
        "sd version": version,
        "description": str(description),
    }
    data.update({k: v for k, v in _existing_card(target).items() if k not in data})
    _write(target, (json.dumps(data, indent=4, ensure_ascii=False) + "\n").encode("utf-8"))
    return target
