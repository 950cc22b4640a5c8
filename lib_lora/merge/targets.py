"""locate(): which checkpoint tensor (and which rows of it) a kohya LoRA module name changes.

kohya names replace every `.` of a module path by `_`, which cannot be undone by substitution, so the map is
built the other way round: every weight key of the checkpoint is turned into the LoRA names that may address it
(lora-format.md 5 and 6). The checkpoint is in the webui's format (ldm/sgm keys):

- UNet `model.diffusion_model.<ldm path>.weight`: addressed by its SAI/ldm name (what sd-scripts writes for SDXL)
  and by its diffusers name (what sd-scripts writes for SD1/SD2), for every architecture, because other trainers
  write the other spelling. The UNet layout (resnets per level, which levels hold attention) is read from the
  checkpoint's own keys, never assumed.
- HF CLIP text encoders (SD1 `cond_stage_model.transformer.`, SDXL te1 `conditioner.embedders.0.transformer.`):
  the path after the prefix, with `text_model.` inserted for old SD1 checkpoints that lack it.
- OpenCLIP text encoders (SD2 `cond_stage_model.model.`, SDXL te2 `conditioner.embedders.1.model.`): q/k/v are the
  row thirds of the fused `attn.in_proj_weight`; out_proj, `mlp.c_fc` (= fc1) and `mlp.c_proj` (= fc2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

from ..errors import IncompatibleFile
from ..network.unet_names import SD_LAYOUT, SDXL_LAYOUT, UNetLayout, ldm_to_diffusers

UNET_PREFIX = "model.diffusion_model."
ARCH_TITLES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}

_OPENCLIP_BLOCK = re.compile(
    r"transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$"
)
_OPENCLIP_TO_HF = {
    "attn.out_proj.weight": "self_attn_out_proj",
    "mlp.c_fc.weight": "mlp_fc1",
    "mlp.c_proj.weight": "mlp_fc2",
}


@dataclass(frozen=True)
class Target:
    """A region of one checkpoint tensor: the whole tensor, or rows [start, stop) of a fused in_proj_weight."""

    key: str
    part: str  # "unet", "te", "te1", "te2"
    shape: tuple[int, ...]  # shape of the region
    rows: tuple[int, int] | None = None


class CheckpointIndex:
    """LoRA module name -> Target, for one checkpoint's key set."""

    def __init__(self, keys: Iterable[str], shape_of: Callable[[str], tuple[int, ...]], file_name: str = "model") -> None:
        keys = list(keys)
        self.arch = detect_arch(keys, shape_of, file_name)
        self.layout = unet_layout_from_keys(keys)
        self.by_name: dict[str, Target] = {}
        for key in keys:
            if not key.endswith("weight"):
                continue
            shape = tuple(shape_of(key))
            if key.startswith(UNET_PREFIX):
                self._add_unet(key, shape)
            elif key.startswith("cond_stage_model.transformer."):
                self._add_hf_text(key, shape, "cond_stage_model.transformer.", "te")
            elif key.startswith("conditioner.embedders.0.transformer."):
                self._add_hf_text(key, shape, "conditioner.embedders.0.transformer.", "te1")
            elif key.startswith("cond_stage_model.model."):
                self._add_openclip(key, shape, "cond_stage_model.model.", "te")
            elif key.startswith("conditioner.embedders.1.model."):
                self._add_openclip(key, shape, "conditioner.embedders.1.model.", "te2")

    @property
    def title(self) -> str:
        return ARCH_TITLES[self.arch]

    def locate(self, name: str) -> Target | None:
        return self.by_name.get(name)

    def _add(self, name: str, target: Target) -> None:
        self.by_name.setdefault(name, target)

    def _add_unet(self, key: str, shape: tuple[int, ...]) -> None:
        if len(shape) not in (2, 4) or not key.endswith(".weight"):
            return
        path = key[len(UNET_PREFIX):-len(".weight")]
        target = Target(key, "unet", shape)
        self._add("lora_unet_" + path.replace(".", "_"), target)
        try:
            diffusers_path = ldm_to_diffusers(path, self.layout)
        except (KeyError, IndexError):
            return
        self._add("lora_unet_" + diffusers_path.replace(".", "_"), target)

    def _add_hf_text(self, key: str, shape: tuple[int, ...], prefix: str, part: str) -> None:
        if len(shape) != 2 or not key.endswith(".weight"):
            return
        rest = key[len(prefix):-len(".weight")]
        if not rest.startswith("text_model."):
            rest = "text_model." + rest  # old SD1 checkpoints lack the `text_model.` level
        self._add(f"lora_{part}_" + rest.replace(".", "_"), Target(key, part, shape))

    def _add_openclip(self, key: str, shape: tuple[int, ...], prefix: str, part: str) -> None:
        m = _OPENCLIP_BLOCK.match(key[len(prefix):])
        if not m or len(shape) != 2:
            return
        layer, what = m[1], m[2]
        base = f"lora_{part}_text_model_encoder_layers_{layer}_"
        if what == "attn.in_proj_weight":
            if shape[0] % 3:
                return
            d = shape[0] // 3
            for i, qkv in enumerate("qkv"):
                self._add(f"{base}self_attn_{qkv}_proj", Target(key, part, (d, shape[1]), (i * d, (i + 1) * d)))
        else:
            self._add(base + _OPENCLIP_TO_HF[what], Target(key, part, shape))


def detect_arch(keys: list[str], shape_of: Callable[[str], tuple[int, ...]], file_name: str) -> str:
    """`sd1`, `sd2` or `sdxl` from the text-encoder prefixes (UNet shapes when there is no text encoder)."""
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise IncompatibleFile(
            f"{file_name} is not a Stable Diffusion checkpoint in the webui's format (no model.diffusion_model.* keys)"
        )
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys):
        return "sdxl"
    for k in keys:
        if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight"):
            return "sd1" if len(shape_of(k)) == 4 else "sd2"
    return "sd1"


def unet_layout_from_keys(keys: list[str]) -> UNetLayout:
    """Resnets per level and attention levels, counted from `input_blocks.N` / `output_blocks.N` keys."""
    inputs: dict[int, set[int]] = {}
    outputs: dict[int, set[int]] = {}
    downsample: list[int] = []
    out_attention: set[int] = set()
    pattern = re.compile(r"model\.diffusion_model\.(input|output)_blocks\.(\d+)\.(\d+)\.(.*)$")
    for key in keys:
        m = pattern.match(key)
        if not m:
            continue
        kind, block, slot, tail = m[1], int(m[2]), int(m[3]), m[4]
        (inputs if kind == "input" else outputs).setdefault(block, set()).add(slot)
        if kind == "input" and slot == 0 and tail.startswith("op."):
            downsample.append(block)
        if kind == "output" and slot == 1 and (tail.startswith("proj_in.") or tail.startswith("transformer_blocks.")):
            out_attention.add(block)
    if not downsample:
        # a single-level UNet (never seen in the wild): fall back to the standard tables
        return SDXL_LAYOUT if any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys) else SD_LAYOUT
    n = min(downsample)  # input_blocks.n.0.op is level 0's downsampler, so each level spans n blocks
    lpb = n - 1
    levels = (max(inputs) - 1) // n + 1 if inputs else 1
    down_attention = tuple(
        any(1 in inputs.get(n * i + j + 1, set()) for j in range(lpb)) for i in range(levels)
    )
    up_attention = tuple(any(n * i + j in out_attention for j in range(n)) for i in range(levels))
    return UNetLayout(lpb, down_attention, up_attention)
