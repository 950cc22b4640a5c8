"""Module paths of the SD UNet in its two spellings: diffusers (`down_blocks.1.attentions.0`) and ldm/sgm
(`input_blocks.4.1`), the layout the webui holds in `shared.sd_model`.

Why here: kohya names SD1/SD2 LoRA modules after diffusers paths and SDXL modules after ldm paths, the webui's
model is ldm-named and the merger edits ldm checkpoints, so the same physical layer must be found under either
name. Pure string arithmetic (see lora-format.md 5.1); no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# resnet sub-layers: diffusers name -> ldm name
_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_PARTS_LDM = {v: k for k, v in _RESNET_PARTS.items()}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_TOP_LEVEL_LDM = {v: k for k, v in _TOP_LEVEL.items()}


@dataclass(frozen=True)
class UNetLayout:
    """What the index arithmetic needs: resnets per down level and which levels hold attention.

    `down_attention[i]` is for diffusers `down_blocks.i`; `up_attention[i]` for `up_blocks.i` (index 0 = deepest).
    SD1/SD2: layers_per_block 2, down (T, T, T, F), up (F, T, T, T). SDXL: down (F, T, T), up (T, T, F).
    """

    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]

    @classmethod
    def from_diffusers_config(cls, config) -> "UNetLayout":
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        lpb = get("layers_per_block")
        if not isinstance(lpb, int):
            lpb = int(lpb[0])
        return cls(
            layers_per_block=lpb,
            down_attention=tuple("CrossAttn" in t for t in get("down_block_types")),
            up_attention=tuple("CrossAttn" in t for t in get("up_block_types")),
        )


SD_LAYOUT = UNetLayout(2, (True, True, True, False), (False, True, True, True))
SDXL_LAYOUT = UNetLayout(2, (False, True, True), (True, True, False))


def _split_resnet_tail(tail: str, to_ldm: bool) -> str:
    if not tail:
        return tail
    table = _RESNET_PARTS if to_ldm else _RESNET_PARTS_LDM
    for src, dst in table.items():
        if tail == src or tail.startswith(src + "."):
            return dst + tail[len(src):]
    return tail


def diffusers_to_ldm(path: str, layout: UNetLayout) -> str:
    """Map a diffusers UNet module/parameter path to the ldm path of the same layer."""
    n = layout.layers_per_block + 1
    for src, dst in _TOP_LEVEL.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if m:
        i, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4] or ""
        slot = 0 if kind == "resnets" else 1
        if kind == "resnets":
            tail = _split_resnet_tail(tail, True)
        return _join(f"input_blocks.{n * i + j + 1}.{slot}", tail)
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(?:\.(.*))?$", path)
    if m:
        return _join(f"input_blocks.{n * (int(m[1]) + 1)}.0.op", m[2] or "")
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if m:
        kind, j, tail = m[1], int(m[2]), m[3] or ""
        if kind == "resnets":
            return _join(f"middle_block.{2 * j}", _split_resnet_tail(tail, True))
        return _join("middle_block.1", tail)
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if m:
        i, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4] or ""
        slot = 0 if kind == "resnets" else 1
        if kind == "resnets":
            tail = _split_resnet_tail(tail, True)
        return _join(f"output_blocks.{n * i + j}.{slot}", tail)
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(?:\.(.*))?$", path)
    if m:
        i = int(m[1])
        slot = 2 if layout.up_attention[i] else 1
        return _join(f"output_blocks.{n * i + n - 1}.{slot}.conv", m[2] or "")
    raise KeyError(f"not a diffusers UNet path: {path!r}")


def ldm_to_diffusers(path: str, layout: UNetLayout) -> str:
    """Map an ldm UNet module/parameter path (without `model.diffusion_model.`) to the diffusers path."""
    n = layout.layers_per_block + 1
    for src, dst in _TOP_LEVEL_LDM.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    m = re.match(r"input_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        k, slot, tail = int(m[1]), int(m[2]), m[3] or ""
        i, j = divmod(k - 1, n)
        if j == n - 1:
            if not (slot == 0 and (tail == "op" or tail.startswith("op."))):
                raise KeyError(f"not an ldm UNet path: {path!r}")
            return _join(f"down_blocks.{i}.downsamplers.0.conv", tail[3:])
        if slot == 0:
            return _join(f"down_blocks.{i}.resnets.{j}", _split_resnet_tail(tail, False))
        return _join(f"down_blocks.{i}.attentions.{j}", tail)
    m = re.match(r"middle_block\.(\d+)(?:\.(.*))?$", path)
    if m:
        k, tail = int(m[1]), m[2] or ""
        if k == 1:
            return _join("mid_block.attentions.0", tail)
        return _join(f"mid_block.resnets.{k // 2}", _split_resnet_tail(tail, False))
    m = re.match(r"output_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        k, slot, tail = int(m[1]), int(m[2]), m[3] or ""
        i, j = divmod(k, n)
        if slot == 0:
            return _join(f"up_blocks.{i}.resnets.{j}", _split_resnet_tail(tail, False))
        if slot == 1 and layout.up_attention[i]:
            return _join(f"up_blocks.{i}.attentions.{j}", tail)
        if tail == "conv" or tail.startswith("conv."):
            return _join(f"up_blocks.{i}.upsamplers.0.conv", tail[5:])
    raise KeyError(f"not an ldm UNet path: {path!r}")


def _join(head: str, tail: str) -> str:
    return f"{head}.{tail}" if tail else head
