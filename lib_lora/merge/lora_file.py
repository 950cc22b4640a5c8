"""A LoRA / LoCon file as modules (down, up, optional Tucker mid, alpha), read straight from safetensors.

The merge reads LoRA files itself, independent of lib_lora.network, and normalises what different trainers write
at this boundary: kohya `lora_down`/`lora_up` or PEFT `lora_A`/`lora_B` spellings, diffusers/PEFT module names
(`unet.down_blocks...`, `text_encoder.text_model...`, `text_encoder_2...`, a raw PEFT `base_model.model....`) turned
into kohya names (`network.keys.kohya_module_name`, which inspect uses too), and a missing
`.alpha` meaning alpha = rank (scale 1). Tensors stay in the file until a module is merged (a big LoRA costs no RAM).

Formats we cannot merge exactly (LoHa, LoKr, DoRA, full-weight diffs) are refused by name, never skipped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput, IncompatibleFile
from ..network.keys import foreign_type, kohya_module_name
from .safetensors_io import FLOAT_DTYPES, SafetensorsFile

_PARTS = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".alpha", "alpha"),
)
_FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class LoraModule:
    name: str
    down: str | None = None  # tensor keys in the file
    up: str | None = None
    mid: str | None = None
    alpha: str | None = None

    @property
    def part(self) -> str:
        return self.name.split("_")[1]  # lora_unet_... -> unet, lora_te1_... -> te1


@dataclass
class LoraFile:
    path: Path
    reader: SafetensorsFile
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    ignored_keys: list[str] = field(default_factory=list)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.reader.entries[key].shape

    def delta_shape(self, module: LoraModule) -> tuple[int, ...]:
        """Shape of the composed update: (out, in) or (out, in, kh, kw)."""
        down, up = self.shape(module.down), self.shape(module.up)
        if module.mid is not None:
            mid = self.shape(module.mid)
            return (up[0], down[1], *mid[2:])
        return (up[0], *down[1:])

    def alpha_value(self, module: LoraModule) -> float:
        rank = self.shape(module.down)[0]
        if module.alpha is None:
            return float(rank)
        value = float(self.reader.read_tensor(module.alpha).float().reshape(-1)[0])
        if not math.isfinite(value):
            raise IncompatibleFile(f"{self.path.name}: alpha of {module.name} is not a finite number")
        return value

    def delta(self, module: LoraModule):
        """(alpha / rank) * up @ down in float32 (conv: flatten, matmul, reshape; Tucker: contract mid)."""
        import torch

        down = self.reader.read_tensor(module.down).float()
        up = self.reader.read_tensor(module.up).float()
        rank = down.shape[0]
        out = up.shape[0]
        scale = self.alpha_value(module) / rank
        if module.mid is not None:
            mid = self.reader.read_tensor(module.mid).float()
            delta = torch.einsum("oa,abhw,bi->oihw", up.reshape(out, -1), mid, down.reshape(rank, -1))
        else:
            delta = (up.reshape(out, rank) @ down.reshape(rank, -1)).reshape(out, *down.shape[1:])
        return delta * scale

    def add_to(self, module: LoraModule, region, multiplier: float) -> None:
        """region += multiplier * delta, in place on a contiguous float32 region (one fused matmul-add, no
        full-size temporary except for Tucker modules)."""
        flat = region.view(region.shape[0], -1)
        rank = self.shape(module.down)[0]
        scale = self.alpha_value(module) / rank * multiplier
        if not (abs(scale) <= _FLOAT32_MAX and abs(multiplier) <= _FLOAT32_MAX):  # torch refuses such float32 factors
            raise BadInput(f"multiplier {multiplier:g} for {self.path.name} is too large (module {module.name}: "
                           f"{multiplier:g} x alpha / rank overflows float32)")
        if module.mid is not None:
            flat.add_(self.delta(module).reshape(flat.shape), alpha=multiplier)
            return
        down = self.reader.read_tensor(module.down).float()
        up = self.reader.read_tensor(module.up).float()
        flat.addmm_(up.reshape(up.shape[0], rank), down.reshape(rank, -1), alpha=scale)

    def close(self) -> None:
        self.reader.close()


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, part in _PARTS:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def open_lora(path: str | Path, arch: str) -> LoraFile:
    """Read a LoRA file's header and group its tensors into modules; refuses files that are no LoRA."""
    p = Path(path)
    if p.exists() and p.is_file() and p.suffix.lower() != ".safetensors":
        raise BadInput(f"LoRA {p.name}: only .safetensors LoRA files can be merged")
    reader = SafetensorsFile(p, what="LoRA file")
    try:
        return _group(p, reader, arch)
    except BaseException:
        reader.close()
        raise


def _group(p: Path, reader: SafetensorsFile, arch: str) -> LoraFile:
    modules: dict[str, LoraModule] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key, entry in reader.entries.items():
        if key.startswith("bundle_emb."):  # textual-inversion embeddings bundled in the LoRA: not part of a model
            ignored.append(key)
            continue
        part = key.partition(".")[2]  # formats that are not up @ down are refused by name (the webui's table)
        kind = "DoRA" if part == "dora_scale" else foreign_type(part)
        if kind:
            raise IncompatibleFile(f"{p.name} is a {kind} file (key {key}); only LoRA / LoCon can be merged")
        split = _split_key(key)
        name = kohya_module_name(split[0], arch) if split else None
        if name is None:
            unknown.append(key)
            continue
        if entry.dtype not in FLOAT_DTYPES:
            raise IncompatibleFile(f"{p.name}: tensor {key} has type {entry.dtype}, expected floating point")
        module = modules.setdefault(name, LoraModule(name))
        part = split[1]
        if getattr(module, part) is not None:
            raise IncompatibleFile(f"{p.name}: module {name} has two {part} tensors")
        setattr(module, part, key)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        what = "is not a LoRA file" if not modules else "has keys that are not LoRA tensors"
        raise IncompatibleFile(f"{p.name} {what}: {', '.join(unknown[:3])}{more}")
    for name, module in list(modules.items()):
        if module.down is None and module.up is None and module.mid is None:  # an alpha alone changes nothing
            ignored.append(module.alpha)
            del modules[name]
    if not modules:
        raise IncompatibleFile(f"{p.name} holds no LoRA modules")
    lora = LoraFile(p, reader, modules, dict(reader.metadata), ignored)
    for module in modules.values():
        _check_module(lora, module)
    return lora


def _check_module(lora: LoraFile, module: LoraModule) -> None:
    name = lora.path.name
    if module.down is None or module.up is None:
        missing = "lora_down" if module.down is None else "lora_up"
        raise IncompatibleFile(f"{name}: module {module.name} has no {missing} weight")
    down, up = lora.shape(module.down), lora.shape(module.up)
    rank = down[0] if down else 0
    ok = len(down) in (2, 4) and len(up) in (2, 4) and rank > 0 and up[1] == rank and math.prod(up[2:]) == 1
    if module.mid is not None:
        mid = lora.shape(module.mid)
        ok = ok and len(mid) == 4 and mid[:2] == (rank, rank) and len(down) == 4 and math.prod(down[2:]) == 1
    if module.alpha is not None and math.prod(lora.shape(module.alpha)) != 1:
        ok = False
    if not ok:
        raise IncompatibleFile(f"{name}: module {module.name} has inconsistent shapes (down {down}, up {up})")
