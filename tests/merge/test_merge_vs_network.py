"""Cross-check with lib_lora.network (written independently): a checkpoint merged with a file our trainer saved
computes what the model computes with that LoRA injected, for the UNet (SD1 1x1-conv proj, LoCon 3x3 convs, SDXL
SAI names) and the fused-qkv OpenCLIP text encoders (SD2, SDXL te2)."""

from __future__ import annotations

import copy

import pytest
import torch

from lib_lora.merge import merge_loras
from lib_lora.network import LoraNetwork, NetworkConfig, save_lora, text_encoder_targets, unet_targets
from tests.fixtures.diffusers_models import TEXT_HIDDEN

LOCON = NetworkConfig.from_args(4, 2.0, ["conv_dim=2", "conv_alpha=1"])
MULTIPLIER = 0.7


def unet_forward(unet, arch):
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 500])
    ctx = torch.randn(2, 7, 2 * TEXT_HIDDEN if arch == "sdxl" else TEXT_HIDDEN, generator=gen)
    with torch.no_grad():
        if arch != "sdxl":
            return unet(x, timesteps=t, context=ctx)
        y = torch.randn(2, unet.label_emb[0][0].in_features, generator=gen)
        return unet(x, timesteps=t, context=ctx, y=y)


def text_forward(embedder):
    """Every resblock of an ldm FrozenOpenCLIPEmbedder's tower. ldm's encode_with_transformer assumes the
    sequence-first layout of open_clip 2.x; open_clip 3.x is batch-first, so the blocks are run here."""
    model = embedder.model
    tokens = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70, [49406, 1237, 1929, 49407] + [0] * 73])
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding
        batch_first = model.transformer.resblocks[0].attn.batch_first
        x = x if batch_first else x.permute(1, 0, 2)
        for block in model.transformer.resblocks:
            x = block(x, attn_mask=model.attn_mask)
        return x if batch_first else x.permute(1, 0, 2)


def load_part(model, merged: dict, prefix: str):
    model = copy.deepcopy(model)
    model.load_state_dict({k[len(prefix):]: v for k, v in merged.items() if k.startswith(prefix)}, strict=True)
    return model


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_merged_checkpoint_equals_injected_network(arch, tmp_path, ckpts):
    from safetensors.torch import load_file

    from tests.fixtures.ldm_models import ldm_unet, openclip_embedder, sdxl_conditioner

    ckpt_path, ckpt = ckpts[arch]
    unet = ldm_unet(arch)
    te, te_prefix, te_key_prefix = None, None, None
    if arch == "sd2":
        te, te_prefix, te_key_prefix = openclip_embedder(), "lora_te", "cond_stage_model."
    elif arch == "sdxl":
        te, te_prefix, te_key_prefix = sdxl_conditioner().embedders[1], "lora_te2", "conditioner.embedders.1."
    # the models the network is injected into are the checkpoint's own weights
    assert all(torch.equal(v, ckpt["model.diffusion_model." + k]) for k, v in unet.state_dict().items())

    targets = unet_targets(unet, arch, LOCON) + (text_encoder_targets(te, te_prefix, LOCON) if te is not None else [])
    net = LoraNetwork(targets, LOCON, multiplier=MULTIPLIER).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.2)
    lora_file = save_lora(tmp_path / f"{arch}-net.safetensors", net, None, "fp32")

    base_unet = unet_forward(unet, arch)
    base_te = text_forward(te) if te is not None else None
    with net.inject():
        injected_unet = unet_forward(unet, arch)
        injected_te = text_forward(te) if te is not None else None
    assert (injected_unet - base_unet).abs().max() > 1e-2

    out = tmp_path / "merged.safetensors"
    report = merge_loras(ckpt_path, [(lora_file, MULTIPLIER)], out)
    assert sum(report.modules_merged.values()) == len(targets)
    merged = load_file(str(out))
    torch.testing.assert_close(unet_forward(load_part(unet, merged, "model.diffusion_model."), arch), injected_unet,
                               rtol=1e-4, atol=1e-4)
    if te is not None:
        assert (injected_te - base_te).abs().max() > 1e-2
        torch.testing.assert_close(text_forward(load_part(te, merged, te_key_prefix)), injected_te, rtol=1e-4, atol=1e-4)
