"""diffusers <-> ldm UNet paths, checked against diffusers' own ldm converter (an independent implementation)."""

import pytest
import torch

from lib_lora.network.unet_names import SD_LAYOUT, SDXL_LAYOUT, UNetLayout, diffusers_to_ldm, ldm_to_diffusers

LAYOUTS = {
    "sd1-full-layout": dict(
        block_out_channels=(32, 64, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32, attention_head_dim=4,
    ),
    "sdxl-full-layout": dict(
        block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=4, use_linear_projection=True, transformer_layers_per_block=(1, 2, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    ),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_weight_maps_like_diffusers_converter(name):
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = UNet2DConditionModel(sample_size=8, **LAYOUTS[name])
    layout = UNetLayout.from_diffusers_config(unet.config)
    keys = list(unet.state_dict())
    ldm = {}
    for index, key in enumerate(keys):
        module, part = key.rsplit(".", 1)
        mapped = diffusers_to_ldm(module, layout)
        assert ldm_to_diffusers(mapped, layout) == module
        ldm[f"model.diffusion_model.{mapped}.{part}"] = torch.tensor([float(index)])
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert {k: int(v.item()) for k, v in converted.items()} == {k: i for i, k in enumerate(keys)}


def test_known_anchor_names():
    assert diffusers_to_ldm("down_blocks.1.attentions.0.proj_in", SD_LAYOUT) == "input_blocks.4.1.proj_in"
    assert diffusers_to_ldm("up_blocks.1.resnets.2.conv1", SD_LAYOUT) == "output_blocks.5.0.in_layers.2"
    assert diffusers_to_ldm("up_blocks.0.upsamplers.0.conv", SD_LAYOUT) == "output_blocks.2.1.conv"
    assert diffusers_to_ldm("up_blocks.1.upsamplers.0.conv", SD_LAYOUT) == "output_blocks.5.2.conv"
    assert diffusers_to_ldm("down_blocks.2.downsamplers.0.conv", SD_LAYOUT) == "input_blocks.9.0.op"
    assert diffusers_to_ldm("up_blocks.0.upsamplers.0.conv", SDXL_LAYOUT) == "output_blocks.2.2.conv"
    assert ldm_to_diffusers("middle_block.2.skip_connection", SD_LAYOUT) == "mid_block.resnets.1.conv_shortcut"
    with pytest.raises(KeyError):
        ldm_to_diffusers("input_blocks.3.1.proj_in", SD_LAYOUT)  # slot 3 is a downsampler, it has no attention
