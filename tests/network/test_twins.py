"""One file, two trees: a LoRA trained on the ldm UNet the webui holds computes the same function when loaded
onto the diffusers UNet with the same weights (so the names point at the same physical layers)."""

from __future__ import annotations

import pytest
import torch

from lib_lora.network import LoraNetwork, NetworkConfig, load_lora, save_lora, unet_layout, unet_targets
from lib_lora.network.unet_names import ldm_to_diffusers
from tests.fixtures.diffusers_models import TEXT_HIDDEN, unet_config

LOCON = NetworkConfig.from_args(4, 2.0, ["conv_dim=2", "conv_alpha=1"])
_LABEL_EMB = {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}


def diffusers_twin(ldm):
    """A diffusers UNet2DConditionModel holding the ldm UNet's weights (heads matched: 8 channels per head)."""
    from diffusers import UNet2DConditionModel

    arch = "sdxl" if hasattr(ldm, "label_emb") else ("sd2" if ldm.input_blocks[1][1].use_linear else "sd1")
    unet = UNet2DConditionModel(**{**unet_config(arch), "attention_head_dim": (4, 8)}).eval()
    layout = unet_layout(ldm)
    state = {}
    for key, value in ldm.state_dict().items():
        module, part = key.rsplit(".", 1)
        state[f"{_LABEL_EMB.get(module) or ldm_to_diffusers(module, layout)}.{part}"] = value
    unet.load_state_dict(state, strict=True)
    return unet


def run_both(arch, ldm, twin):
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 500])
    ctx = torch.randn(2, 7, 2 * TEXT_HIDDEN if arch == "sdxl" else TEXT_HIDDEN, generator=gen)
    with torch.no_grad():
        if arch != "sdxl":
            return ldm(x, timesteps=t, context=ctx), twin(x, t, encoder_hidden_states=ctx).sample
        text_embeds = torch.randn(2, TEXT_HIDDEN, generator=gen)
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
        y = torch.cat([text_embeds, twin.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return ldm(x, timesteps=t, context=ctx, y=y), twin(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_ldm_trained_file_means_the_same_on_diffusers(arch, tmp_path):
    pytest.importorskip("diffusers")
    from tests.fixtures.ldm_models import ldm_unet

    ldm = ldm_unet(arch)
    twin = diffusers_twin(ldm)
    base_ldm, base_twin = run_both(arch, ldm, twin)
    torch.testing.assert_close(base_ldm, base_twin, rtol=1e-4, atol=1e-5)  # the twins really are one model

    net = LoraNetwork(unet_targets(ldm, arch, LOCON), LOCON).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.2)
    tensors, _ = load_lora(save_lora(tmp_path / f"{arch}.safetensors", net, None, "fp32"))
    other = LoraNetwork.from_kohya(unet_targets(twin, arch, LOCON), tensors)
    with net.inject(), other.inject():
        lora_ldm, lora_twin = run_both(arch, ldm, twin)
    assert (lora_ldm - base_ldm).abs().max() > 1e-2
    torch.testing.assert_close(lora_ldm, lora_twin, rtol=1e-4, atol=1e-5)
