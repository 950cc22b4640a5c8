"""LoRA modules on real (tiny) models: zero at start, exact math, exact restore, only LoRA trains."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lib_lora.network import LoraNetwork, NetworkConfig, find_targets, inject, text_encoder_targets, unet_targets
from tests.network.helpers import (
    assert_snapshot_equal, clip_forward, instance_forwards, ldm_unet_forward, openclip_forward, snapshot,
)

LOCON = NetworkConfig(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0)


@pytest.fixture(scope="module")
def sd1():
    from tests.fixtures.ldm_models import clip_embedder, ldm_unet

    return ldm_unet("sd1"), clip_embedder()


@pytest.fixture(scope="module")
def sdxl_te2():
    from tests.fixtures.ldm_models import openclip_embedder

    return openclip_embedder()


def randomise_up(net: LoraNetwork, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.1)


def outputs(unet, te, te2=None):
    with torch.no_grad():
        out = [ldm_unet_forward(unet, "sd1"), clip_forward(te)]
        if te2 is not None:
            out.append(openclip_forward(te2))
    return out


def test_fresh_network_changes_nothing(sd1, sdxl_te2):
    unet, te = sd1
    targets = find_targets(unet, {"lora_te": te}, "sd1", LOCON) + text_encoder_targets(sdxl_te2, "lora_te2", LOCON)
    base = outputs(unet, te, sdxl_te2)
    with inject(targets, LOCON) as net:
        assert all(float(lora.lora_up.weight.detach().abs().sum()) == 0 for lora in net.loras())
        assert all(lora.lora_down.weight.abs().sum() > 0 for lora in net.loras())
        injected = outputs(unet, te, sdxl_te2)
    for a, b in zip(base, injected):
        assert torch.equal(a, b)


def test_inject_restore_is_bit_identical_even_after_an_exception(sd1, sdxl_te2):
    unet, te = sd1
    targets = find_targets(unet, {"lora_te": te}, "sd1", LOCON) + text_encoder_targets(sdxl_te2, "lora_te2", LOCON)
    before, base = snapshot(unet, te, sdxl_te2), outputs(unet, te, sdxl_te2)
    modules_before = [(name, id(m)) for model in (unet, te, sdxl_te2) for name, m in model.named_modules()]
    net = LoraNetwork(targets, LOCON)
    randomise_up(net)
    with pytest.raises(ValueError, match="boom"):
        with net.inject():
            changed = outputs(unet, te, sdxl_te2)
            assert all(not torch.equal(a, b) for a, b in zip(base, changed))
            mha_parts = sum(lora.part is not None for lora in net.loras())
            assert len(instance_forwards(unet, te, sdxl_te2)) == len(list(net.loras())) - mha_parts + mha_parts // 4
            raise ValueError("boom")
    assert not net.applied
    assert instance_forwards(unet, te, sdxl_te2) == []
    assert [(name, id(m)) for model in (unet, te, sdxl_te2) for name, m in model.named_modules()] == modules_before
    assert_snapshot_equal(before, unet, te, sdxl_te2)
    for a, b in zip(base, outputs(unet, te, sdxl_te2)):
        assert torch.equal(a, b)


def test_apply_and_restore_are_idempotent(sd1):
    unet, te = sd1
    net = LoraNetwork(unet_targets(unet, "sd1", LOCON), LOCON)
    randomise_up(net)
    net.apply()
    once = outputs(unet, te)[0]
    net.apply()
    assert torch.equal(outputs(unet, te)[0], once)  # not applied twice
    net.restore()
    net.restore()
    assert instance_forwards(unet) == []


def test_multiplier_scales_the_delta(sd1):
    unet, te = sd1
    net = LoraNetwork(text_encoder_targets(te, "lora_te", LOCON), LOCON).eval()
    randomise_up(net)
    base = clip_forward(te).detach()
    with net.inject(), torch.no_grad():
        full = clip_forward(te)
        net.multiplier = 0.0
        zero = clip_forward(te)
    assert torch.equal(zero, base) and not torch.equal(full, base)


def test_linear_and_conv_math():
    """Linear: W x + m * a/r * up(down(x)); kxk conv: conv with the composed delta weight (lora-format 2.8)."""
    torch.manual_seed(0)
    linear, conv = torch.nn.Linear(8, 6), torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
    net = LoraNetwork([("lora_unet_a_to_q", linear), ("lora_unet_b_conv1", conv)], LOCON, multiplier=0.7).eval()
    randomise_up(net)
    x, img = torch.randn(2, 5, 8), torch.randn(2, 4, 9, 9)
    lin, cv = net.lora_unet_a_to_q, net.lora_unet_b_conv1
    assert tuple(cv.lora_down.weight.shape) == (2, 4, 3, 3) and tuple(cv.lora_up.weight.shape) == (6, 2, 1, 1)
    with torch.no_grad():
        want_lin = linear(x) + 0.7 * (2.0 / 4) * (x @ lin.lora_down.weight.T @ lin.lora_up.weight.T)
        delta = (cv.lora_up.weight.reshape(6, 2) @ cv.lora_down.weight.reshape(2, -1)).reshape(6, 4, 3, 3)
        want_conv = F.conv2d(img, conv.weight + 0.7 * (1.0 / 2) * delta, conv.bias, stride=2, padding=1)
        with net.inject():
            got_lin, got_conv = linear(x), conv(img)
    torch.testing.assert_close(got_lin, want_lin, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_conv, want_conv, rtol=1e-5, atol=1e-5)


def test_mha_lora_equals_deltas_on_in_proj_slices(sdxl_te2):
    """q/k/v LoRA = rows [0:d], [d:2d], [2d:3d] of in_proj_weight; out LoRA = out_proj.weight (webui's merge)."""
    targets = text_encoder_targets(sdxl_te2, "lora_te2", LOCON)
    net = LoraNetwork(targets, LOCON, multiplier=0.5).eval()
    randomise_up(net, seed=3)
    reference = copy.deepcopy(sdxl_te2)
    with torch.no_grad():
        for lora in net.loras():
            layer = int(lora.lora_name.split("_layers_")[1].split("_")[0])
            block = reference.model.transformer.resblocks[layer]
            delta = 0.5 * (2.0 / 4) * (lora.lora_up.weight @ lora.lora_down.weight)
            d = block.attn.embed_dim
            if lora.part in ("q", "k", "v"):
                row = "qkv".index(lora.part) * d
                block.attn.in_proj_weight[row:row + d] += delta
            elif lora.part == "out":
                block.attn.out_proj.weight += delta
            elif lora.lora_name.endswith("mlp_fc1"):
                block.mlp.c_fc.weight += delta
            else:
                block.mlp.c_proj.weight += delta
        want = openclip_forward(reference)
        with net.inject():
            got = openclip_forward(sdxl_te2)
        base = openclip_forward(sdxl_te2)
    assert not torch.allclose(want, base)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_lora_parameters_train(sd1, sdxl_te2):
    unet, te = sd1
    targets = find_targets(unet, {"lora_te": te}, "sd1", LOCON) + text_encoder_targets(sdxl_te2, "lora_te2", LOCON)
    before = snapshot(unet, te, sdxl_te2)
    net = LoraNetwork(targets, LOCON)
    groups = net.param_groups(unet_lr=1e-3, text_encoder_lr=5e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-3), ("text_encoder", 5e-4)]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters())) == 2 * len(list(net.loras()))
    optimizer = torch.optim.SGD(groups, lr=0.1)
    with net.inject():
        loss = ldm_unet_forward(unet, "sd1").square().mean() + clip_forward(te).square().mean() \
            + openclip_forward(sdxl_te2).square().mean()
        loss.backward()
        optimizer.step()
    for model in (unet, te, sdxl_te2):
        assert all(p.grad is None for p in model.parameters())
    assert all(lora.lora_up.weight.grad is not None and lora.lora_up.weight.grad.abs().sum() > 0 for lora in net.loras())
    assert all(not b.requires_grad for b in net.buffers())
    assert_snapshot_equal(before, unet, te, sdxl_te2)
    assert all(lora.lora_up.weight.abs().sum() > 0 for lora in net.loras())


def test_network_state_holds_only_kohya_tensors(sd1):
    unet, _ = sd1
    net = LoraNetwork(unet_targets(unet, "sd1", LOCON), LOCON)
    parts = {k.split(".", 1)[1] for k in net.state_dict()}
    assert parts == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert net.lora_unet_down_blocks_0_resnets_0_conv1.alpha.shape == ()
    assert float(net.lora_unet_down_blocks_0_resnets_0_conv1.alpha) == 1.0  # conv_alpha for 3x3
    assert float(net.lora_unet_down_blocks_0_resnets_0_time_emb_proj.alpha) == 2.0  # Linear inside a ResNet: dim/alpha


def test_dropouts_act_only_in_training():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 16)
    cfg = NetworkConfig(dim=8, alpha=8, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    net = LoraNetwork([("lora_unet_x_to_q", linear)], cfg)
    randomise_up(net)
    x = torch.randn(4, 3, 16)
    with net.inject(), torch.no_grad():
        net.eval()
        first, second = linear(x), linear(x)
        net.train()
        samples = [linear(x) for _ in range(20)]
    assert torch.equal(first, second)
    base = torch.nn.functional.linear(x, linear.weight, linear.bias)
    assert any(torch.equal(s, base) for s in samples)  # module dropout skipped the module
    assert any(not torch.equal(s, base) and not torch.allclose(s, first) for s in samples)


def test_class_forward_and_earlier_instance_forwards_still_run(monkeypatch):
    """The base path goes through the class's forward (the webui patches nn.Linear.forward) and through a forward
    set on the instance before ours; restore puts the earlier one back."""
    calls = []
    original = torch.nn.Linear.forward

    def patched(self, x):
        if self is linear:
            calls.append("class")
        return original(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", patched)
    linear = torch.nn.Linear(4, 4)
    earlier = lambda x: patched(linear, x) * 2  # noqa: E731
    linear.forward = earlier
    net = LoraNetwork([("lora_unet_x_to_q", linear)], NetworkConfig())
    with net.inject():
        out = linear(torch.ones(1, 4))
    assert calls == ["class"]
    torch.testing.assert_close(out, original(linear, torch.ones(1, 4)) * 2)
    assert linear.__dict__["forward"] is earlier


def test_restore_refuses_when_someone_replaced_our_forward():
    linear = torch.nn.Linear(4, 4)
    net = LoraNetwork([("lora_unet_x_to_q", linear)], NetworkConfig())
    net.apply()
    linear.forward = lambda x: x
    with pytest.raises(RuntimeError, match="replaced after attaching"):
        net.restore()
