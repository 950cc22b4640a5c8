"""Kohya names: the same layer gets the same name and shapes in every tree that can hold it."""

from __future__ import annotations

import re

import pytest
import torch

from lib_lora.errors import BadInput
from lib_lora.network import KEY_GRAMMAR, LoraNetwork, NetworkConfig, find_targets, text_encoder_targets, unet_targets
from tests.network.helpers import V4Tree, WebuiWrapper, hf_clip, shapes

LORA = NetworkConfig(dim=4, alpha=2.0)
LOCON = NetworkConfig(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0)
ARCHS = ("sd1", "sd2", "sdxl")


def kohya_shapes(targets, cfg) -> dict[str, tuple[int, ...]]:
    return shapes(LoraNetwork(targets, cfg).state_dict())


def module_paths(model) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


@pytest.fixture(scope="module")
def ldm_unets():
    from tests.fixtures.ldm_models import ldm_unet

    return {arch: ldm_unet(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def diffusers_unets():
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    from tests.fixtures.diffusers_models import unet_config

    torch.manual_seed(0)
    return {arch: UNet2DConditionModel(**unet_config(arch)).eval() for arch in ARCHS}


@pytest.fixture(scope="module")
def openclip():
    from tests.fixtures.ldm_models import openclip_embedder

    return openclip_embedder()


@pytest.fixture(scope="module")
def ldm_clip():
    from tests.fixtures.ldm_models import clip_embedder

    return clip_embedder()


# ------------------------------------------------------------------------------------------------------ UNet
@pytest.mark.parametrize("cfg", [LORA, LOCON], ids=["lora", "locon"])
@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_and_ldm_unets_give_identical_keys_and_shapes(arch, cfg, ldm_unets, diffusers_unets):
    from_diffusers = kohya_shapes(unet_targets(diffusers_unets[arch], arch, cfg), cfg)
    from_ldm = kohya_shapes(unet_targets(ldm_unets[arch], arch, cfg), cfg)
    assert from_diffusers == from_ldm
    assert all(KEY_GRAMMAR.match(key) for key in from_ldm)


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_sd1_sd2_names_are_diffusers_module_paths(arch, diffusers_unets):
    """sd-scripts' rule on its diffusers-layout SD1/SD2 UNet: name = lora_unet_ + module path, dots -> _."""
    unet = diffusers_unets[arch]
    paths = module_paths(unet)
    for name, module in unet_targets(unet, arch, LOCON):
        assert name == "lora_unet_" + paths[id(module)].replace(".", "_")


def test_sdxl_names_are_ldm_module_paths(ldm_unets):
    """sd-scripts' rule on its ldm-layout SDXL UNet: name = lora_unet_ + ldm path (input_blocks_...)."""
    unet = ldm_unets["sdxl"]
    paths = module_paths(unet)
    targets = unet_targets(unet, "sdxl", LOCON)
    for name, module in targets:
        assert name == "lora_unet_" + paths[id(module)].replace(".", "_")
    assert any(name.startswith("lora_unet_input_blocks_") for name, _ in targets)


def test_webui_diffusion_wrapper_is_accepted(ldm_unets):
    wrapper = torch.nn.Module()
    wrapper.diffusion_model = ldm_unets["sd1"]
    assert [n for n, _ in unet_targets(wrapper, "sd1", LORA)] == [n for n, _ in unet_targets(ldm_unets["sd1"], "sd1", LORA)]


def test_tiny_sd1_anchor_shapes(ldm_unets):
    """lora-format.md 2.7 scaled to the tiny layout (C = 32/64, context 32, time embedding 128, r = 4, rc = 2)."""
    got = kohya_shapes(unet_targets(ldm_unets["sd1"], "sd1", LOCON), LOCON)
    expect = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": ((4, 32, 1, 1), (32, 4, 1, 1)),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((4, 32), (32, 4)),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": ((4, 32), (256, 4)),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2": ((4, 128), (32, 4)),
        "lora_unet_down_blocks_0_resnets_0_conv1": ((2, 32, 3, 3), (32, 2, 1, 1)),
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj": ((4, 128), (32, 4)),
        "lora_unet_down_blocks_0_downsamplers_0_conv": ((2, 32, 3, 3), (32, 2, 1, 1)),
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": ((4, 32, 1, 1), (64, 4, 1, 1)),
        "lora_unet_up_blocks_0_upsamplers_0_conv": ((2, 64, 3, 3), (64, 2, 1, 1)),
        "lora_unet_mid_block_attentions_0_proj_in": ((4, 64, 1, 1), (64, 4, 1, 1)),
    }
    for name, (down, up) in expect.items():
        assert got[f"{name}.lora_down.weight"] == down, name
        assert got[f"{name}.lora_up.weight"] == up, name
        assert got[f"{name}.alpha"] == ()
    assert "lora_unet_down_blocks_0_resnets_0_conv_shortcut.lora_down.weight" not in got  # in == out channels


def test_sd2_projections_are_linear(ldm_unets):
    got = kohya_shapes(unet_targets(ldm_unets["sd2"], "sd2", LORA), LORA)
    assert got["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] == (4, 32)


def test_tiny_sdxl_anchor_shapes(ldm_unets):
    got = kohya_shapes(unet_targets(ldm_unets["sdxl"], "sdxl", LOCON), LOCON)
    expect = {  # tiny analogues of input_blocks_4_1_*, 4_0_skip_connection, 1_0_in_layers_2, output_blocks_2_2_conv
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k": ((4, 64), (64, 4)),
        "lora_unet_input_blocks_3_1_proj_in": ((4, 64), (64, 4)),
        "lora_unet_input_blocks_3_0_skip_connection": ((4, 32, 1, 1), (64, 4, 1, 1)),
        "lora_unet_input_blocks_1_0_in_layers_2": ((2, 32, 3, 3), (32, 2, 1, 1)),
        "lora_unet_input_blocks_2_0_op": ((2, 32, 3, 3), (32, 2, 1, 1)),
        "lora_unet_output_blocks_1_2_conv": ((2, 64, 3, 3), (64, 2, 1, 1)),
        "lora_unet_middle_block_1_proj_out": ((4, 64), (64, 4)),
    }
    for name, (down, up) in expect.items():
        assert (got[f"{name}.lora_down.weight"], got[f"{name}.lora_up.weight"]) == (down, up), name


def _ldm_full_layout_sd1():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(
        image_size=8, in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=[4, 2, 1], num_head_channels=8, use_spatial_transformer=True, context_dim=32,
        legacy=False,
    )


def test_full_sd1_layout_counts_match_sd_scripts():
    """lora-format.md 2.6: SD1 UNet 192 modules, 278 with conv_dim; per block 24/24/24/12/36/36/36."""
    unet = _ldm_full_layout_sd1()
    lora = [n for n, _ in unet_targets(unet, "sd1", LORA)]
    locon = [n for n, _ in unet_targets(unet, "sd1", LOCON)]
    assert (len(lora), len(locon)) == (192, 278)
    per_block = {b: sum(n.startswith(f"lora_unet_{b}_") for n in lora) for b in
                 ("down_blocks_0", "down_blocks_1", "down_blocks_2", "mid_block", "up_blocks_1", "up_blocks_2", "up_blocks_3")}
    assert per_block == {"down_blocks_0": 24, "down_blocks_1": 24, "down_blocks_2": 24, "mid_block": 12,
                         "up_blocks_1": 36, "up_blocks_2": 36, "up_blocks_3": 36}
    block0 = sorted(n[len("lora_unet_down_blocks_0_attentions_0_"):] for n in lora
                    if n.startswith("lora_unet_down_blocks_0_attentions_0_"))
    assert block0 == sorted(["proj_in", "proj_out"] + [f"transformer_blocks_0_{a}_{p}" for a in ("attn1", "attn2")
                             for p in ("to_q", "to_k", "to_v", "to_out_0")]
                            + ["transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2"])
    shortcuts = sorted(n for n in locon if n.endswith("conv_shortcut"))
    assert shortcuts[:2] == ["lora_unet_down_blocks_1_resnets_0_conv_shortcut", "lora_unet_down_blocks_2_resnets_0_conv_shortcut"]
    assert len(shortcuts) == 14
    assert {n for n in locon if "samplers" in n} == {f"lora_unet_{k}_blocks_{i}_{k}samplers_0_conv" for k in ("down", "up") for i in range(3)}


def test_full_sdxl_layout_counts_match_sd_scripts():
    """lora-format.md 2.4/2.6: SDXL UNet 722 modules, 788 with conv_dim, SAI names."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(1, 2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    lora = [n for n, _ in unet_targets(unet, "sdxl", LORA)]
    locon = [n for n, _ in unet_targets(unet, "sdxl", LOCON)]
    assert (len(lora), len(locon)) == (722, 788)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in lora
    assert "lora_unet_output_blocks_2_2_conv" in locon and "lora_unet_input_blocks_6_0_op" in locon
    assert "lora_unet_input_blocks_4_0_skip_connection" in locon


# -------------------------------------------------------------------------------------------- text encoders
def test_hf_clip_v4_v5_and_ldm_trees_agree(ldm_clip):
    hf = hf_clip()
    trees = {
        "hf": hf,
        "v4-tree": V4Tree(hf),
        "ldm": ldm_clip,
        "webui-wrapped": WebuiWrapper(ldm_clip),
        "with-projection": hf_clip(with_projection=True),
    }
    got = {k: kohya_shapes(text_encoder_targets(te, "lora_te", LORA), LORA) for k, te in trees.items()}
    for key, value in got.items():
        assert value == got["hf"], key
    assert len(got["hf"]) == 2 * 6 * 3
    for key, shape in got["hf"].items():
        assert KEY_GRAMMAR.match(key) and "_text_model_encoder_layers_" in key
    assert got["hf"]["lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight"] == (4, 32)
    assert got["hf"]["lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight"] == (128, 4)


def test_clip_names_follow_the_transformers4_module_paths():
    """On a transformers-4 tree the kohya name is lora_te_ + module path (text_model.encoder.layers...)."""
    tree = V4Tree(hf_clip())
    paths = module_paths(tree)
    for name, module in text_encoder_targets(tree, "lora_te", LORA):
        assert name == "lora_te_" + paths[id(module)].replace(".", "_")


def test_sd2_openclip_matches_a_23_of_24_layer_hf_clip(openclip):
    """SD2: sd-scripts' HF text encoder drops OpenCLIP's last block; our 2-block tower gives layer 0 only."""
    from_openclip = kohya_shapes(text_encoder_targets(openclip, "lora_te", LORA), LORA)
    from_hf = kohya_shapes(text_encoder_targets(hf_clip(layers=1, act="gelu"), "lora_te", LORA), LORA)
    assert from_openclip == from_hf
    assert {k.split(".")[0] for k in from_openclip} == {
        f"lora_te_text_model_encoder_layers_0_{p}"
        for p in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
    }


def test_sdxl_te2_openclip_matches_hf_clip_with_projection(openclip):
    from_openclip = kohya_shapes(text_encoder_targets(WebuiWrapper(openclip), "lora_te2", LORA), LORA)
    from_hf = kohya_shapes(text_encoder_targets(hf_clip(act="gelu", with_projection=True), "te2", LORA), LORA)
    assert from_openclip == from_hf
    assert len(from_openclip) == 2 * 6 * 3


def test_sdxl_conditioner_embedders():
    from tests.fixtures.ldm_models import sdxl_conditioner

    cond = sdxl_conditioner()
    targets = find_targets(None, {"lora_te1": cond.embedders[0], "lora_te2": cond.embedders[1]}, "sdxl", LORA)
    names = [n for n, _ in targets]
    assert sum(n.startswith("lora_te1_") for n in names) == 12 and sum(n.startswith("lora_te2_") for n in names) == 12
    mha = [m for n, m in targets if n.endswith("_self_attn_q_proj") and n.startswith("lora_te2_")]
    assert all(isinstance(m, torch.nn.MultiheadAttention) for m in mha)


def test_train_flags_and_bad_input(ldm_unets, ldm_clip):
    assert unet_targets(ldm_unets["sd1"], "sd1", NetworkConfig(train_unet=False)) == []
    assert text_encoder_targets(ldm_clip, "lora_te", NetworkConfig(train_text_encoder=False)) == []
    with pytest.raises(BadInput, match="not a Stable Diffusion UNet"):
        unet_targets(torch.nn.Linear(2, 2), "sd1")
    with pytest.raises(BadInput, match="not a CLIP"):
        text_encoder_targets(torch.nn.Linear(2, 2), "lora_te")
    with pytest.raises(BadInput, match="unknown architecture"):
        unet_targets(ldm_unets["sd1"], "sd3")
    with pytest.raises(BadInput, match="does not belong to sdxl"):
        find_targets(None, {"lora_te": ldm_clip}, "sdxl")
    with pytest.raises(BadInput, match="unknown text encoder prefix"):
        text_encoder_targets(ldm_clip, "lora_te3")


def test_whole_model_key_grammar(ldm_unets, ldm_clip):
    net = LoraNetwork(find_targets(ldm_unets["sd1"], {"te": ldm_clip}, "sd1", LOCON), LOCON)
    keys = list(net.state_dict())
    assert keys and all(re.match(KEY_GRAMMAR, k) for k in keys)
    modules = {k.split(".")[0] for k in keys}
    for module in modules:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= set(keys)
    assert len(keys) == 3 * len(modules)
