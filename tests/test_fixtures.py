"""The fixtures themselves: the offline tokenizer is CLIP's, and the tiny models run and differ from zero."""

import torch


def test_tokenizer_is_clips(clip_tokenizer):
    ids = clip_tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(clip_tokenizer) == 49408


def test_tiny_sd1_runs(sd1_components, clip_tokenizer):
    unet, vae, te = sd1_components["unet"], sd1_components["vae"], sd1_components["text_encoder"]
    ids = clip_tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        cond = te(ids)[0]
        latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        out = unet(latents, torch.tensor([10]), encoder_hidden_states=cond).sample
    assert latents.shape == (1, 4, 8, 8)
    assert out.shape == (1, 4, 8, 8) and out.abs().sum() > 0


def test_tiny_sdxl_runs(sdxl_components, clip_tokenizer):
    c = sdxl_components
    ids = clip_tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = c["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]
        o2 = c["text_encoder_2"](ids, output_hidden_states=True)
        ctx = torch.cat([h1, o2.hidden_states[-2]], dim=-1)
        added = {"text_embeds": o2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        out = c["unet"](torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    assert out.shape == (1, 4, 8, 8)


def test_ldm_unets_are_twins_of_the_diffusers_ones():
    """Every ldm UNet weight maps (lib_lora.network.unet_names) onto a diffusers weight with the same numel."""
    import pytest

    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    from lib_lora.network.unet_names import UNetLayout, ldm_to_diffusers
    from tests.fixtures.diffusers_models import unet_config
    from tests.fixtures.ldm_models import ldm_unet

    for arch in ("sd1", "sd2", "sdxl"):
        diffusers_state = UNet2DConditionModel(**unet_config(arch)).state_dict()
        layout = UNetLayout.from_diffusers_config(unet_config(arch))
        mapped = {}
        for key, value in ldm_unet(arch).state_dict().items():
            module, part = key.rsplit(".", 1)
            mapped[f"{ldm_to_diffusers(module, layout)}.{part}"] = value.numel()
        assert mapped == {k: v.numel() for k, v in diffusers_state.items()}, arch


def test_ldm_checkpoint_keys_use_webui_prefixes():
    from tests.fixtures.ldm_models import ldm_checkpoint_state_dict

    sd1 = ldm_checkpoint_state_dict("sd1")
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd1
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in sd1
    assert sd1["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 4  # SD1: conv 1x1
    sd2 = ldm_checkpoint_state_dict("sd2")
    assert sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert sd2["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2
    sdxl = ldm_checkpoint_state_dict("sdxl")
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.weight" in sdxl
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in sdxl
    assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight" in sdxl  # 1 resnet per level
    assert "model.diffusion_model.label_emb.0.0.weight" in sdxl
