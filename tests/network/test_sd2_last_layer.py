"""SD2 files that carry OpenCLIP's last text layer (layer 23, which sd-scripts drops but other trainers write):
loading applies what the model runs and says what it skipped, as the webui (where that layer never runs)."""

from __future__ import annotations

import pytest
import torch

from lib_lora.errors import IncompatibleFile
from lib_lora.network import LoraNetwork, NetworkConfig, text_encoder_targets
from tests.network.helpers import openclip_forward

CFG = NetworkConfig(dim=2, alpha=1.0)
PARTS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


@pytest.fixture(scope="module")
def sd2_te():
    from tests.fixtures.ldm_models import openclip_embedder

    return openclip_embedder()  # 2 resblocks: SD2 targets layer 0 only (sd-scripts' 23 of 24)


def _file_with_last_layer(targets, extra_layers=(1,)):
    """A trained-looking file for every targeted layer plus modules for `extra_layers`, shaped like layer 0."""
    gen = torch.Generator().manual_seed(3)
    net = LoraNetwork(targets, CFG)
    tensors = {k: (torch.randn(v.shape, generator=gen) * 0.1 if k.endswith("lora_up.weight") else v.clone())
               for k, v in net.state_dict().items()}
    for layer in extra_layers:
        for key in [k for k in tensors if k.startswith("lora_te_text_model_encoder_layers_0_")]:
            tensors[key.replace("layers_0_", f"layers_{layer}_")] = torch.randn(tensors[key].shape, generator=gen)
    return tensors


def test_the_last_layer_is_skipped_and_named(sd2_te):
    targets = text_encoder_targets(sd2_te, "lora_te", CFG)
    assert {name.split("_")[6] for name, _ in targets} == {"0"}
    tensors = _file_with_last_layer(targets)
    net = LoraNetwork.from_kohya(targets, tensors)
    assert net.skipped == [f"lora_te_text_model_encoder_layers_1_{p}" for p in sorted(PARTS)]
    assert "1 text-encoder layer" in net.skip_note and "penultimate" in net.skip_note
    state = net.state_dict()
    assert state.keys() == {k for k in tensors if "_layers_0_" in k}
    assert all(torch.equal(state[k], tensors[k]) for k in state)
    # same output as the file without that layer (the model never runs it in SD2)
    plain = LoraNetwork.from_kohya(targets, {k: v for k, v in tensors.items() if "_layers_0_" in k})
    assert plain.skipped == [] and plain.skip_note is None
    with torch.no_grad():
        with net.inject():
            got = openclip_forward(sd2_te)
        with plain.inject():
            want = openclip_forward(sd2_te)
    assert torch.equal(got, want)
    # loading into an existing network (training from network_weights) does the same
    fresh = LoraNetwork(targets, CFG)
    fresh.load_kohya(tensors)
    assert fresh.skipped == net.skipped and torch.equal(fresh.state_dict()[PARTS_KEY], tensors[PARTS_KEY])


PARTS_KEY = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"


def test_layers_beyond_the_model_are_still_refused(sd2_te):
    targets = text_encoder_targets(sd2_te, "lora_te", CFG)
    with pytest.raises(IncompatibleFile, match="12 of 18 LoRA modules match no layer"):
        LoraNetwork.from_kohya(targets, _file_with_last_layer(targets, extra_layers=(1, 2)))
    odd = _file_with_last_layer(targets)
    odd["lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight"] = torch.zeros(2, 5)  # not the model's width
    with pytest.raises(IncompatibleFile, match="layers_1_"):
        LoraNetwork.from_kohya(targets, odd)
