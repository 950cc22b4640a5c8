"""Which layers of a model get LoRA, and their kohya names.

The same physical layer must get the same name whatever tree holds it: a diffusers `UNet2DConditionModel` (CLI,
tests) or the ldm/sgm `UNetModel` the webui holds; an HF `CLIPTextModel` (transformers 4 with `text_model.`, 5
without), the ldm `FrozenCLIPEmbedder`, or an OpenCLIP tower whose q/k/v live in one fused `in_proj_weight`.
So names come from fixed tables (lora-format.md 2.2-2.5, 5.1), and live module paths are only used to find the
layers, never copied into a name as they are.

Selection follows sd-scripts' `networks.lora` (lora-format.md 2.1): in the UNet, every Linear / Conv2d inside a
transformer block (diffusers `Transformer2DModel`, ldm `SpatialTransformer`); with `conv_dim` set (LoCon) also the
ones inside ResNet blocks and down/upsamplers. In text encoders: q, k, v, out projections and the two MLP layers.
SD1/SD2 UNet names use diffusers paths (`lora_unet_down_blocks_0_attentions_0_proj_in`), SDXL names use ldm paths
(`lora_unet_input_blocks_4_1_proj_in`), as sd-scripts writes them.

A target is `(kohya_name, module)`. For an OpenCLIP layer the module of `..._self_attn_q_proj|k_proj|v_proj|out_proj`
is the whole `nn.MultiheadAttention` (its forward reads `in_proj_weight` and `out_proj.weight` directly, so LoRA
must be applied to the MHA as one unit); the name's suffix says which part.
"""

from __future__ import annotations

import re
import weakref
from typing import Iterable, Mapping

from torch import nn

from ..errors import BadInput
from .config import NetworkConfig
from .unet_names import UNetLayout, diffusers_to_ldm, ldm_to_diffusers

Target = tuple[str, nn.Module]

ARCHS = ("sd1", "sd2", "sdxl")
TEXT_PREFIXES = ("lora_te", "lora_te1", "lora_te2")
MHA_PARTS = {"self_attn_q_proj": 0, "self_attn_k_proj": 1, "self_attn_v_proj": 2, "self_attn_out_proj": None}

# children of a transformer block that get LoRA (same sub-paths in diffusers and ldm)
_ATTENTION_CHILD = re.compile(
    r"^(proj_in|proj_out|transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
    r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))$"
)
# LoCon: ResNet children (diffusers / ldm spelling), down/upsampler convs
_RESNET_CHILD = {
    "diffusers": ("conv1", "conv2", "time_emb_proj", "conv_shortcut"),
    "ldm": ("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection"),
}
_BLOCK_CLASSES = {
    "diffusers": {"attention": {"Transformer2DModel"}, "resnet": {"ResnetBlock2D"},
                  "down": {"Downsample2D"}, "up": {"Upsample2D"}},
    "ldm": {"attention": {"SpatialTransformer"}, "resnet": {"ResBlock"}, "down": {"Downsample"}, "up": {"Upsample"}},
}
_SAMPLER_CHILD = {("diffusers", "down"): "conv", ("diffusers", "up"): "conv", ("ldm", "down"): "op", ("ldm", "up"): "conv"}

# UNet layer -> its kohya name in the other spelling (diffusers paths for SDXL, ldm paths for SD1/SD2). Files from
# other trainers use it (diffusers' SDXL scripts write `lora_unet_down_blocks_...`); the webui and our merge accept
# both, so loading into a network does too (`name_aliases`). Weak keys: the registry never keeps a model alive.
_UNET_ALIASES: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()

# one CLIP encoder layer: kohya part name -> HF sub-path / OpenCLIP sub-path (None: part of the fused MHA)
_TEXT_PARTS = (
    ("self_attn_q_proj", "self_attn.q_proj", "attn"),
    ("self_attn_k_proj", "self_attn.k_proj", "attn"),
    ("self_attn_v_proj", "self_attn.v_proj", "attn"),
    ("self_attn_out_proj", "self_attn.out_proj", "attn"),
    ("mlp_fc1", "mlp.fc1", "mlp.c_fc"),
    ("mlp_fc2", "mlp.fc2", "mlp.c_proj"),
)


# ----------------------------------------------------------------------------------------------------- UNet
def unet_targets(unet: nn.Module, arch: str, cfg: NetworkConfig | None = None) -> list[Target]:
    """`[(kohya_name, layer)]` for a diffusers, ldm or sgm UNet of `arch` ('sd1' | 'sd2' | 'sdxl').

    Empty when `cfg.train_unet` is off. Accepts the webui's `DiffusionWrapper` too (uses `.diffusion_model`).
    """
    cfg = cfg or NetworkConfig()
    if arch not in ARCHS:
        raise BadInput(f"unknown architecture {arch!r} (expected one of {', '.join(ARCHS)})")
    if not cfg.train_unet:
        return []
    unet = getattr(unet, "diffusion_model", unet)
    style, layout = _unet_style(unet)
    kinds = ("attention", "resnet", "down", "up") if cfg.is_locon else ("attention",)
    classes = {cls: kind for kind in kinds for cls in _BLOCK_CLASSES[style][kind]}
    targets: list[Target] = []
    for block_path, block in unet.named_modules():
        kind = classes.get(type(block).__name__)
        if kind is None:
            continue
        for child_path, child in _children(block, style, kind):
            path = f"{block_path}.{child_path}"
            name, alias = _unet_names(path, style, arch, layout)
            targets.append((name, child))
            if alias is not None:
                _UNET_ALIASES[child] = alias
    _check_unique(targets)
    if not targets:
        raise BadInput(f"found no LoRA target in the UNet ({type(unet).__name__}): not a Stable Diffusion UNet?")
    return targets


def unet_layout(unet: nn.Module) -> UNetLayout:
    """The index layout (resnets per level, attention per level) of a diffusers or ldm/sgm UNet."""
    return _unet_style(getattr(unet, "diffusion_model", unet))[1]


def _unet_style(unet: nn.Module) -> tuple[str, UNetLayout]:
    if hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks"):
        config = getattr(unet, "config", None)
        if config is None:
            raise BadInput(f"{type(unet).__name__} has down_blocks but no diffusers config")
        return "diffusers", UNetLayout.from_diffusers_config(config)
    if hasattr(unet, "input_blocks") and hasattr(unet, "output_blocks"):
        return "ldm", _ldm_layout(unet)
    raise BadInput(f"{type(unet).__name__} is not a Stable Diffusion UNet (no down_blocks / input_blocks)")


def _ldm_layout(unet: nn.Module) -> UNetLayout:
    res = getattr(unet, "num_res_blocks", None)
    per_level = res[0] if isinstance(res, (list, tuple)) else res
    if not isinstance(per_level, int) or (isinstance(res, (list, tuple)) and len(set(res)) != 1):
        raise BadInput(f"unsupported ldm UNet: num_res_blocks={res!r} (need the same count on every level)")
    n = per_level + 1
    levels = len(unet.input_blocks) // n
    has_attention = lambda block: any(type(m).__name__ == "SpatialTransformer" for m in block.modules())  # noqa: E731
    down = tuple(has_attention(unet.input_blocks[n * i + 1]) for i in range(levels))
    up = tuple(has_attention(unet.output_blocks[n * i]) for i in range(levels))
    return UNetLayout(per_level, down, up)


def _children(block: nn.Module, style: str, kind: str) -> Iterable[tuple[str, nn.Module]]:
    if kind == "attention":
        for path, child in block.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)) and _ATTENTION_CHILD.match(path):
                yield path, child
        return
    wanted = _RESNET_CHILD[style] if kind == "resnet" else (_SAMPLER_CHILD[(style, kind)],)
    modules = dict(block.named_modules())
    for path in wanted:
        child = modules.get(path)
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            yield path, child


def _unet_names(path: str, style: str, arch: str, layout: UNetLayout) -> tuple[str, str | None]:
    """(kohya name as sd-scripts writes it for `arch`, the same layer's name in the other spelling or None)."""
    try:
        ldm = diffusers_to_ldm(path, layout) if style == "diffusers" else path
        diffusers = ldm_to_diffusers(path, layout) if style == "ldm" else path
    except KeyError as exc:
        raise BadInput(f"UNet layer {path!r} has no kohya name for {arch}: {exc}") from None
    primary, other = (ldm, diffusers) if arch == "sdxl" else (diffusers, ldm)
    name, alias = "lora_unet_" + primary.replace(".", "_"), "lora_unet_" + other.replace(".", "_")
    return name, (alias if alias != name else None)


def name_aliases(targets: Iterable[Target]) -> dict[str, str]:
    """`{other spelling: kohya name}` for the UNet targets among `targets` (made by `unet_targets`): the ldm name
    of an SD1/SD2 layer, the diffusers name of an SDXL layer."""
    out = {}
    for name, module in targets:
        alias = _UNET_ALIASES.get(module)
        if alias is not None:
            out[alias] = name
    return out


# ------------------------------------------------------------------------------------------- text encoders
def text_encoder_targets(te: nn.Module, prefix: str, cfg: NetworkConfig | None = None) -> list[Target]:
    """`[(kohya_name, layer)]` for one CLIP text encoder under kohya prefix 'lora_te' | 'lora_te1' | 'lora_te2'.

    Accepts HF `CLIPTextModel` / `CLIPTextModelWithProjection` (transformers 4 and 5 trees), ldm/sgm
    `FrozenCLIPEmbedder`, `FrozenOpenCLIPEmbedder(2)`, open_clip models / text towers, and the webui's wrappers
    (`.wrapped`). Empty when `cfg.train_text_encoder` is off. An OpenCLIP encoder under 'lora_te' (SD2) drops its
    last block, as sd-scripts' 23-layer SD2 text encoder does (SD2 reads the penultimate layer).
    """
    cfg = cfg or NetworkConfig()
    prefix = normalise_prefix(prefix)
    if not cfg.train_text_encoder:
        return []
    style, layers = _text_layers(te)
    if style == "openclip" and prefix == "lora_te":
        layers = layers[:-1]
    targets: list[Target] = []
    for index, layer in enumerate(layers):
        modules = dict(layer.named_modules())
        for part, hf_path, openclip_path in _TEXT_PARTS:
            name = f"{prefix}_text_model_encoder_layers_{index}_{part}"
            module = modules.get(hf_path if style == "hf" else openclip_path)
            if style == "openclip" and openclip_path == "attn":
                if not isinstance(module, nn.MultiheadAttention) or not module._qkv_same_embed_dim:
                    raise BadInput(f"OpenCLIP layer {index} has no fused MultiheadAttention at .attn")
            elif not isinstance(module, nn.Linear):
                raise BadInput(f"text encoder layer {index} has no Linear at {hf_path if style == 'hf' else openclip_path}")
            targets.append((name, module))
    return targets


def normalise_prefix(prefix: str) -> str:
    """'te' / 'te1' / 'lora_te2' -> the kohya prefix; anything else is BadInput."""
    full = prefix if prefix.startswith("lora_") else f"lora_{prefix}"
    if full not in TEXT_PREFIXES:
        raise BadInput(f"unknown text encoder prefix {prefix!r} (expected one of {', '.join(TEXT_PREFIXES)})")
    return full


def _text_layers(te: nn.Module) -> tuple[str, list[nn.Module]]:
    node: nn.Module = te
    for _ in range(8):
        wrapped = getattr(node, "wrapped", None)
        if isinstance(wrapped, nn.Module):
            node = wrapped
            continue
        encoder = getattr(node, "encoder", None)
        if isinstance(encoder, nn.Module) and isinstance(getattr(encoder, "layers", None), nn.ModuleList):
            return "hf", list(encoder.layers)
        resblocks = getattr(node, "resblocks", None)
        if isinstance(resblocks, nn.ModuleList):
            return "openclip", list(resblocks)
        for attr in ("text_model", "transformer", "model", "text"):
            child = getattr(node, attr, None)
            if isinstance(child, nn.Module):
                node = child
                break
        else:
            break
    raise BadInput(f"{type(te).__name__} is not a CLIP / OpenCLIP text encoder (no encoder.layers or resblocks)")


# ------------------------------------------------------------------------------------------------ together
def find_targets(
    unet: nn.Module | None,
    text_encoders: Mapping[str, nn.Module] | None,
    arch: str,
    cfg: NetworkConfig | None = None,
) -> list[Target]:
    """UNet and text-encoder targets of one model; `text_encoders` maps kohya prefix -> encoder
    (SD1/SD2: {'lora_te': te}; SDXL: {'lora_te1': clip_l, 'lora_te2': openclip_g})."""
    cfg = cfg or NetworkConfig()
    expected = ("lora_te1", "lora_te2") if arch == "sdxl" else ("lora_te",)
    targets: list[Target] = []
    if unet is not None:
        targets += unet_targets(unet, arch, cfg)
    for prefix, te in (text_encoders or {}).items():
        full = normalise_prefix(prefix)
        if full not in expected:
            raise BadInput(f"text encoder prefix {full!r} does not belong to {arch} (expected {', '.join(expected)})")
        targets += text_encoder_targets(te, full, cfg)
    _check_unique(targets)
    return targets


def _check_unique(targets: list[Target]) -> None:
    seen: set[str] = set()
    for name, _ in targets:
        if name in seen:
            raise BadInput(f"two layers map to the same kohya name {name!r}")
        seen.add(name)
