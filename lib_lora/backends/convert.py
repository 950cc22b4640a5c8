"""ldm / sgm / OpenCLIP checkpoint keys -> diffusers and transformers keys (pure dict work, no model needed).

Why our own: diffusers' single-file converters infer sizes from the real models (a tiny SDXL becomes an SD1-style
"projection" UNet there) and reach for the hub for text-encoder configs; ours take the sizes from the yaml or the
tensors. The facts (which key is which) are in shared/lora-format.md section 5 and lib_lora/network/unet_names.py.
"""

from __future__ import annotations

import re

import torch

from ..errors import IncompatibleFile
from ..network.unet_names import UNetLayout, ldm_to_diffusers

UNET_PREFIX = "model.diffusion_model."


def take(state: dict, prefix: str) -> dict:
    """The entries under `prefix`, prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---- UNet ---------------------------------------------------------------------------------------------------------
def unet_to_diffusers(ldm_unet: dict, layout: UNetLayout) -> dict:
    """ldm UNet keys (without `model.diffusion_model.`) -> diffusers UNet2DConditionModel keys."""
    out = {}
    for key, value in ldm_unet.items():
        module, param = key.rsplit(".", 1)
        try:
            out[f"{ldm_to_diffusers(module, layout)}.{param}"] = value
        except KeyError:
            raise IncompatibleFile(
                f"the checkpoint's UNet does not fit its config: unexpected {UNET_PREFIX}{key}") from None
    return out


# ---- VAE ----------------------------------------------------------------------------------------------------------
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_TOP = {"norm_out": "conv_norm_out"}


def vae_to_diffusers(ldm_vae: dict, levels: int) -> dict:
    """ldm AutoencoderKL keys (without `first_stage_model.`) -> diffusers AutoencoderKL keys.
    Decoder levels run the other way round (ldm up.0 is the last diffusers up block); the mid attention's 1x1 convs
    become linear layers."""
    return _renamed_vae(ldm_vae, lambda key: _vae_key(key, levels),
                        lambda key: f"the checkpoint's VAE does not fit its config: unexpected first_stage_model.{key}",
                        ".mid_block.attentions.0.", 4, lambda w: w[:, :, 0, 0])


def _renamed_vae(state: dict, rename, unknown, attention: str, conv_ndim: int, reshape) -> dict:
    """One pass for both directions: every key must rename, and the mid attention's weights change shape
    (1x1 conv in ldm, linear in diffusers)."""
    out = {}
    for key, value in state.items():
        new = rename(key)
        if new is None:
            raise IncompatibleFile(unknown(key))
        if attention in new and new.endswith(".weight") and value.ndim == conv_ndim:
            value = reshape(value)
        out[new] = value
    return out


def _vae_key(key: str, levels: int) -> str | None:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    m = re.match(r"(encoder|decoder)\.(.*)$", key)
    if not m:
        return None
    side, rest = m[1], m[2]
    m = re.match(r"(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)$", rest)
    if m:
        level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
        blocks = "down_blocks" if m[1] == "down" else "up_blocks"
        if m[4] is not None:
            part, leaf = m[5].rsplit(".", 1)
            return f"{side}.{blocks}.{level}.resnets.{m[4]}.{_VAE_RESNET.get(part, part)}.{leaf}"
        sampler = "downsamplers" if m[3] == "downsample" else "upsamplers"
        return f"{side}.{blocks}.{level}.{sampler}.0.{m[5]}"
    m = re.match(r"mid\.block_(\d)\.(.*)$", rest)
    if m:
        part, leaf = m[2].rsplit(".", 1)
        return f"{side}.mid_block.resnets.{int(m[1]) - 1}.{_VAE_RESNET.get(part, part)}.{leaf}"
    m = re.match(r"mid\.attn_1\.(\w+)\.(weight|bias)$", rest)
    if m and m[1] in _VAE_ATTN:
        return f"{side}.mid_block.attentions.0.{_VAE_ATTN[m[1]]}.{m[2]}"
    m = re.match(r"(conv_in|conv_out|norm_out)\.(weight|bias)$", rest)
    if m:
        return f"{side}.{_VAE_TOP.get(m[1], m[1])}.{m[2]}"
    return None


_VAE_RESNET_BACK = {v: k for k, v in _VAE_RESNET.items()}
_VAE_ATTN_BACK = {v: k for k, v in _VAE_ATTN.items()}
_VAE_TOP_BACK = {v: k for k, v in _VAE_TOP.items()}


def vae_to_ldm(diffusers_vae: dict, levels: int) -> dict:
    """diffusers AutoencoderKL keys -> ldm keys (the layout of separate VAE files): the inverse of
    `vae_to_diffusers`, the mid attention's linear weights back to 1x1 convs."""
    return _renamed_vae(diffusers_vae, lambda key: _vae_ldm_key(key, levels),
                        lambda key: f"not a diffusers AutoencoderKL key: {key}",
                        ".mid.attn_1.", 2, lambda w: w[:, :, None, None])


def _vae_ldm_key(key: str, levels: int) -> str | None:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    m = re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.*)$", key)
    if m:
        side, way, level = m[1], m[2], int(m[3])
        level = level if way == "down" else levels - 1 - level
        if m[5] is not None:
            part, leaf = m[6].rsplit(".", 1)
            return f"{side}.{way}.{level}.block.{m[5]}.{_VAE_RESNET_BACK.get(part, part)}.{leaf}"
        return f"{side}.{way}.{level}.{'downsample' if way == 'down' else 'upsample'}.{m[6]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)\.(weight|bias)$", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_VAE_RESNET_BACK.get(m[3], m[3])}.{m[4]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key)
    if m and m[2] in _VAE_ATTN_BACK:
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN_BACK[m[2]]}.{m[3]}"
    m = re.match(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)$", key)
    if m:
        return f"{m[1]}.{_VAE_TOP_BACK.get(m[2], m[2])}.{m[3]}"
    return None


# ---- text encoders ------------------------------------------------------------------------------------------------
def hf_clip_keys(state: dict) -> dict:
    """HF CLIP keys in transformers-4 spelling (old checkpoints lack `text_model.`); position_ids dropped."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = value
    return out


def openclip_to_hf(state: dict, layers: int, projection: bool) -> dict:
    """OpenCLIP text-tower keys (`transformer.resblocks.N...`) -> HF CLIP keys (transformers-4 spelling), keeping the
    first `layers` blocks. The fused q|k|v projection is split in three row blocks; `text_projection` (used as
    x @ P) becomes a Linear weight, its transpose."""
    out = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
    }
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for key, value in state.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)\.(weight|bias)$", key)
        if not m:
            m2 = re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)
            if m2 and int(m2[1]) < layers:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"text_model.encoder.layers.{m2[1]}.self_attn.{name}.{m2[2]}"] = part
            continue
        if int(m[1]) >= layers:
            continue
        if m[2] in names:
            out[f"text_model.encoder.layers.{m[1]}.{names[m[2]]}.{m[3]}"] = value
    if projection:
        if "text_projection.weight" in state:  # open_clip built with a Linear projection
            out["text_projection.weight"] = state["text_projection.weight"]
        else:
            out["text_projection.weight"] = state["text_projection"].t().contiguous()
    return out


def clip_config_from_state(hf_state: dict, *, act: str, heads: int | None = None, eos: int = 49407,
                           pad: int = 49407, projection: bool = False):
    """A transformers CLIPTextConfig sized from the tensors (heads: given, else width / 64 as every released CLIP)."""
    from transformers import CLIPTextConfig

    tok = hf_state["text_model.embeddings.token_embedding.weight"]
    pos = hf_state["text_model.embeddings.position_embedding.weight"]
    layer_ids = {int(m[1]) for k in hf_state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    width = tok.shape[1]
    kwargs = dict(
        vocab_size=tok.shape[0], hidden_size=width, num_hidden_layers=len(layer_ids),
        intermediate_size=hf_state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_attention_heads=heads or max(1, width // 64), max_position_embeddings=pos.shape[0], hidden_act=act,
        bos_token_id=49406, eos_token_id=eos, pad_token_id=pad,
    )
    if projection:
        kwargs["projection_dim"] = hf_state["text_projection.weight"].shape[0]
    return CLIPTextConfig(**kwargs)


def fit_text_keys(model: torch.nn.Module, hf_state: dict) -> dict:
    """transformers 5's CLIPTextModel has no `text_model.` level; 4.x and CLIPTextModelWithProjection do."""
    wants_prefix = any(k.startswith("text_model.") for k in model.state_dict())
    if wants_prefix:
        return hf_state
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in hf_state.items()}


def load_exact(model: torch.nn.Module, state: dict, what: str) -> None:
    """load_state_dict(assign=True) onto a meta-built model, with a readable message for missing/extra keys."""
    expected = set(model.state_dict())
    extra = sorted(set(state) - expected)
    missing = sorted(k for k in expected - set(state) if not k.endswith("position_ids"))
    if extra or missing:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise IncompatibleFile(f"the checkpoint's {what} does not fit its config: {detail}")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        reason = str(exc).splitlines()[-1].strip()
        raise IncompatibleFile(f"the checkpoint's {what} does not fit its config: {reason}") from None
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (position_ids) are not in checkpoints
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if leaf == "position_ids":
                owner._buffers[leaf] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
            else:
                raise IncompatibleFile(f"the {what} has a buffer {name} that the checkpoint does not provide")
