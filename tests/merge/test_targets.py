"""locate() on full-size layouts (2 resnets per level): real ldm UNets built on the meta device, no weights.

Anchors and counts are the ones lora-format.md 2.6 / 2.7 lists for sd-scripts' own networks.
"""

from __future__ import annotations

import re
from functools import lru_cache

import pytest
import torch

from lib_lora.merge.targets import CheckpointIndex
from lib_lora.network.unet_names import SD_LAYOUT, SDXL_LAYOUT

U = "model.diffusion_model."


@lru_cache(maxsize=None)
def full_size_keys(arch: str) -> dict[str, tuple[int, ...]]:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    common = dict(image_size=64, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2,
                  use_spatial_transformer=True, transformer_depth=1, legacy=False)
    with torch.device("meta"):
        if arch == "sd1":
            unet = UNetModel(attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4], num_heads=8, context_dim=768,
                             **common)
        else:  # SDXL's level layout (depth 1 per block is enough for names and shapes)
            unet = UNetModel(attention_resolutions=[4, 2], channel_mult=[1, 2, 4], num_head_channels=64,
                             context_dim=2048, use_linear_in_transformer=True, **common)
    keys = {U + k: tuple(v.shape) for k, v in unet.state_dict().items()}
    if arch == "sdxl":
        keys["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = (768,)
    else:
        keys["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = (768,)
    return keys


def index(arch: str) -> CheckpointIndex:
    keys = full_size_keys(arch)
    return CheckpointIndex(keys, keys.__getitem__)


@pytest.mark.parametrize("name,key,shape", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "input_blocks.1.1.proj_in.weight", (320, 320, 1, 1)),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k",
     "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", (320, 768)),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", "input_blocks.4.0.skip_connection.weight", (640, 320, 1, 1)),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", "input_blocks.9.0.op.weight", (1280, 1280, 3, 3)),
    ("lora_unet_mid_block_attentions_0_proj_in", "middle_block.1.proj_in.weight", (1280, 1280, 1, 1)),
    ("lora_unet_mid_block_resnets_1_time_emb_proj", "middle_block.2.emb_layers.1.weight", (1280, 1280)),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "output_blocks.2.1.conv.weight", (1280, 1280, 3, 3)),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "output_blocks.5.2.conv.weight", (1280, 1280, 3, 3)),
    ("lora_unet_up_blocks_1_resnets_2_conv1", "output_blocks.5.0.in_layers.2.weight", (1280, 1920, 3, 3)),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
     "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight", (2560, 320)),
    ("lora_unet_output_blocks_11_1_proj_out", "output_blocks.11.1.proj_out.weight", (320, 320, 1, 1)),  # SAI spelling
])
def test_sd1_full_size_anchors(name, key, shape):
    idx = index("sd1")
    assert idx.layout == SD_LAYOUT
    target = idx.locate(name)
    assert target is not None and target.key == U + key and target.shape == shape and target.part == "unet"


@pytest.mark.parametrize("name,key,shape", [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
     "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", (640, 2048)),
    ("lora_unet_input_blocks_4_1_proj_in", "input_blocks.4.1.proj_in.weight", (640, 640)),
    ("lora_unet_input_blocks_4_0_skip_connection", "input_blocks.4.0.skip_connection.weight", (640, 320, 1, 1)),
    ("lora_unet_input_blocks_1_0_in_layers_2", "input_blocks.1.0.in_layers.2.weight", (320, 320, 3, 3)),
    ("lora_unet_input_blocks_6_0_op", "input_blocks.6.0.op.weight", (640, 640, 3, 3)),
    ("lora_unet_output_blocks_2_2_conv", "output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
    ("lora_unet_output_blocks_5_2_conv", "output_blocks.5.2.conv.weight", (640, 640, 3, 3)),
    # diffusers spelling of the same layers (other trainers write SDXL this way)
    ("lora_unet_down_blocks_1_attentions_0_proj_in", "input_blocks.4.1.proj_in.weight", (640, 640)),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
    ("lora_unet_up_blocks_2_resnets_2_conv_shortcut", "output_blocks.8.0.skip_connection.weight", (320, 640, 1, 1)),
])
def test_sdxl_full_size_anchors(name, key, shape):
    idx = index("sdxl")
    assert idx.arch == "sdxl" and idx.layout == SDXL_LAYOUT
    target = idx.locate(name)
    assert target is not None and target.key == U + key and target.shape == shape


def test_target_counts_match_sd_scripts():
    """SD1: 192 default (transformer) modules + 86 LoCon extras; SDXL: 66 LoCon extras (lora-format.md 2.4, 2.6)."""
    sd1 = [n for n in index("sd1").by_name if n.startswith("lora_unet_") and re.match(r"lora_unet_(down|mid|up)_", n)]
    attention = [n for n in sd1 if "_attentions_" in n and re.search(
        r"_(proj_in|proj_out|to_q|to_k|to_v|to_out_0|ff_net_0_proj|ff_net_2)$", n)]
    locon = [n for n in sd1 if re.search(r"_resnets_\d+_(conv1|conv2|time_emb_proj|conv_shortcut)$|samplers_0_conv$", n)]
    assert (len(attention), len(locon)) == (192, 86)
    xl = [n for n in index("sdxl").by_name if re.match(r"lora_unet_(input|middle|output)_block", n)]
    xl_locon = [n for n in xl if re.search(r"_(in_layers_2|out_layers_3|emb_layers_1|skip_connection|0_op|2_conv)$", n)]
    assert len(xl_locon) == 66
