"""Backends + lib_lora.network: targets from `lora_targets`, a real LoRA training step through each backend, the
model handed back bit-exactly, and (where diffusers is installed) one LoRA giving the same result on both backends."""

from __future__ import annotations

import pytest
import torch

from lib_lora.backends import LdmBackend
from lib_lora.network import LoraNetwork, NetworkConfig

from .helpers import assert_same_state, model_state

CFG = NetworkConfig(dim=4, alpha=2, conv_dim=2, conv_alpha=1)


def _randomise(network: LoraNetwork, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _lora_step(backend, network, sizes=((64, 64, 0, 0, 64, 64),) * 2):
    opt = torch.optim.AdamW([g for g in network.param_groups(1e-3, 1e-3)])
    lat = backend.encode_images(torch.zeros(2, 3, 64, 64), sample=False)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([50, 600])
    a = backend.alphas_cumprod[t].view(-1, 1, 1, 1)
    pred = backend.predict(a.sqrt() * lat + (1 - a).sqrt() * noise, t, backend.encode_prompts(["a cat", "a dog"], sizes=sizes))
    target = noise if backend.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * lat
    loss = torch.nn.functional.mse_loss(pred, target)
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_lora_training_step_through_ldm_backend_then_bit_exact_restore(webui_model, arch):
    model = webui_model(arch)
    backend = LdmBackend(model)
    backend.encode_prompts(["warm up"])
    before = model_state(model)
    targets = backend.lora_targets(CFG)
    names = [n for n, _ in targets]
    assert any(n.startswith("lora_unet_") for n in names)
    assert any(n.startswith("lora_te2_" if arch == "sdxl" else "lora_te_") for n in names)
    network = LoraNetwork(targets, CFG)
    _randomise(network)
    with backend.training(train_text_encoder=True, gradient_checkpointing=True):
        with network.inject():
            _lora_step(backend, network)
            te_grads = [p.grad for n, lora in network.named_children() if "_te" in n for p in lora.parameters()]
            unet_grads = [p.grad for n, lora in network.named_children() if "_unet_" in n for p in lora.parameters()]
    assert unet_grads and all(g is not None for g in unet_grads)
    assert te_grads and sum(float(g.abs().sum()) for g in te_grads if g is not None) > 0
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_one_lora_file_same_result_on_both_backends(arch, shared_webui_models, single_file_backends):
    ldm, dif = LdmBackend(shared_webui_models(arch)), single_file_backends(arch)
    net_ldm = LoraNetwork(ldm.lora_targets(CFG), CFG)
    net_dif = LoraNetwork(dif.lora_targets(CFG), CFG)
    assert sorted(net_ldm.names()) == sorted(net_dif.names())
    _randomise(net_ldm, seed=1)
    net_dif.load_kohya(net_ldm.state_dict())
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([333])
    outs = []
    for backend, net in ((ldm, net_ldm), (dif, net_dif)):
        with torch.no_grad(), net.inject():
            cond = backend.encode_prompts(["a photo of a cat"], sizes=[(64, 64, 0, 0, 64, 64)])
            outs.append((cond.crossattn, backend.predict(lat, t, cond)))
        plain = backend.predict(lat, t, backend.encode_prompts(["a photo of a cat"]))
        assert (outs[-1][1] - plain).abs().max() > 1e-4  # the LoRA changes the output
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)
