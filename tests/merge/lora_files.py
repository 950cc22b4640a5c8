"""Test-side helpers: checkpoint files, kohya LoRA files written by hand, raw safetensors bytes, expected deltas.

Independent of lib_lora: LoRA files are plain safetensors dicts with kohya keys, the expected update is computed
here from the formula W + m * (alpha / dim) * up @ down (conv: flatten, matmul, reshape), and the output is read
back with the safetensors library or a few lines of header parsing.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

U = "model.diffusion_model."
SD1_TE = "cond_stage_model.transformer.text_model."
SD2_TE = "cond_stage_model.model.transformer.resblocks."
XL_TE1 = "conditioner.embedders.0.transformer.text_model."
XL_TE2 = "conditioner.embedders.1.model.transformer.resblocks."


def qkv_rows(which: str, d: int) -> tuple[int, int]:
    k = "qkv".index(which)
    return (k * d, (k + 1) * d)


def random_module(target_shape, rank: int, gen: torch.Generator, alpha: float | None = 2.0, conv_shape: str = "same"):
    """(down, up, alpha) for a target of `target_shape` (out, in) or (out, in, kh, kw).

    conv_shape "linear": 2-D LoRA even for a 1x1 conv target; "conv1x1": 4-D (r, in, 1, 1) LoRA for a 2-D target.
    """
    out, inp = target_shape[0], target_shape[1]
    kernel = tuple(target_shape[2:])
    if conv_shape == "conv1x1":
        kernel = (1, 1)
    elif conv_shape == "linear" and kernel == (1, 1):
        kernel = ()
    down = torch.randn((rank, inp, *kernel), generator=gen) * 0.2
    up = torch.randn((out, rank, *((1, 1) if kernel else ())), generator=gen) * 0.2
    return down, up, (None if alpha is None else torch.tensor(float(alpha)))


def lora_tensors(modules: dict, spelling: str = "kohya") -> dict[str, torch.Tensor]:
    names = {"kohya": ("lora_down.weight", "lora_up.weight"), "peft": ("lora_A.weight", "lora_B.weight")}[spelling]
    out = {}
    for name, (down, up, alpha) in modules.items():
        out[f"{name}.{names[0]}"] = down.contiguous()
        out[f"{name}.{names[1]}"] = up.contiguous()
        if alpha is not None:
            out[f"{name}.alpha"] = alpha
    return out


def write_lora(path: Path, modules: dict, metadata: dict | None = None, spelling: str = "kohya", dtype=None) -> Path:
    tensors = lora_tensors(modules, spelling)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata or {"ss_network_module": "networks.lora"})
    return path


def make_lora(targets, ckpt: dict, rank: int = 4, seed: int = 0, alpha: float | None = 2.0, conv_shape="same"):
    """{lora_name: (down, up, alpha)} for [(lora_name, ckpt_key, rows)] using the checkpoint's shapes."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, key, rows in targets:
        shape = tuple(ckpt[key].shape)
        if rows is not None:
            shape = (rows[1] - rows[0], *shape[1:])
        modules[name] = random_module(shape, rank, gen, alpha, conv_shape)
    return modules


def expected_delta(down, up, alpha, multiplier: float, target_shape) -> torch.Tensor:
    rank = down.shape[0]
    a = float(alpha) if alpha is not None else float(rank)
    if down.ndim == 2 and up.ndim == 2:
        delta = up.float() @ down.float()
    else:
        delta = (up.float().flatten(1) @ down.float().flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return (multiplier * a / rank * delta).reshape(target_shape)


def expected_checkpoint(ckpt: dict, loras: list[tuple[dict, list, float]]) -> dict[str, torch.Tensor]:
    """float32 copies of the touched tensors after applying every (modules, targets, multiplier)."""
    result: dict[str, torch.Tensor] = {}
    for modules, targets, multiplier in loras:
        for name, key, rows in targets:
            if name not in modules:
                continue
            down, up, alpha = modules[name]
            w = result.setdefault(key, ckpt[key].float().clone())
            region = w if rows is None else w[rows[0]:rows[1]]
            region += expected_delta(down, up, alpha, multiplier, region.shape)
    return result


def raw_tensors(path: Path) -> tuple[dict, dict[str, tuple[str, list, bytes]]]:
    """(metadata, {key: (dtype, shape, bytes)}) parsed straight from the file."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    return meta, {k: (v["dtype"], v["shape"], data[base + v["data_offsets"][0]: base + v["data_offsets"][1]])
                  for k, v in header.items()}


def save_checkpoint(path: Path, sd: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path
