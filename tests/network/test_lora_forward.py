"""The LoRA forward's fast paths against plain references: 2-D matmuls and the fused scale + residual add, autocast
(CPU bf16), an fp16 layer with an fp32 LoRA, the weights cast together per forward, the cached float scale, and
rank dropout's draws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib_lora.network import LoraNetwork, NetworkConfig
from lib_lora.network.modules import _autocast_dtype

CFG = NetworkConfig(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0)


def _net(targets, cfg=CFG, multiplier=0.7, seed=0) -> LoraNetwork:
    torch.manual_seed(seed)
    net = LoraNetwork(targets, cfg, multiplier=multiplier).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.1)
    return net


def _delta(lora, x, factor):
    """factor * up(down(x)) written out with the kohya weights (Linear or conv)."""
    down, up = lora.lora_down.weight, lora.lora_up.weight
    if lora.is_conv:
        conv = lora.lora_down
        return factor * F.conv2d(F.conv2d(x, down, None, conv.stride, conv.padding), up)
    return factor * (x @ down.T @ up.T)


@pytest.mark.parametrize("shape", [(8,), (5, 8), (2, 5, 8), (2, 3, 5, 8)])
def test_linear_fast_path_equals_reference_for_any_leading_dims(shape):
    linear = torch.nn.Linear(8, 6)
    net = _net([("lora_unet_a_to_q", linear)])
    x = torch.randn(*shape)
    with torch.no_grad():
        want = linear(x) + _delta(net.lora_unet_a_to_q, x, 0.7 * 2.0 / 4)
        with net.inject():
            got = linear(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pointwise_and_kxk_conv_equal_reference():
    conv1, conv3 = torch.nn.Conv2d(4, 6, 1), torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
    net = _net([("lora_unet_b_proj_in", conv1), ("lora_unet_c_conv1", conv3)])
    img = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        want1 = conv1(img) + _delta(net.lora_unet_b_proj_in, img, 0.7 * 2.0 / 4)
        want3 = conv3(img) + _delta(net.lora_unet_c_conv1, img, 0.7 * 1.0 / 2)
        with net.inject():
            got1, got3 = conv1(img), conv3(img)
    torch.testing.assert_close(got1, want1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got3, want3, rtol=1e-5, atol=1e-5)


def test_gradients_of_the_fast_path_equal_reference():
    linear = torch.nn.Linear(8, 6).requires_grad_(False)
    net = _net([("lora_unet_a_to_q", linear)])
    lora = net.lora_unet_a_to_q
    x = torch.randn(2, 5, 8, requires_grad=True)
    with net.inject():
        got = torch.autograd.grad(linear(x).square().sum(), [x, lora.lora_down.weight, lora.lora_up.weight])
    want = torch.autograd.grad((linear(x) + _delta(lora, x, 0.7 * 0.5)).square().sum(),
                               [x, lora.lora_down.weight, lora.lora_up.weight])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_cpu_bf16_autocast_keeps_the_layer_output_and_autocast_dtypes():
    """Under autocast the input is cast once for layer and LoRA: the layer's own output is bit-identical to the
    layer alone (multiplier 0), the sum is in autocast's dtype, and the LoRA weights and their grads stay float32."""
    linear, conv = torch.nn.Linear(8, 6), torch.nn.Conv2d(4, 6, 1)
    net = _net([("lora_unet_a_to_q", linear), ("lora_unet_b_proj_in", conv)])
    x, img = torch.randn(2, 5, 8), torch.randn(2, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _autocast_dtype("cpu") == torch.bfloat16
        base_lin, base_conv = linear(x), conv(img)
        with net.inject():
            net.multiplier = 0.0
            zero_lin, zero_conv = linear(x), conv(img)
            net.multiplier = 0.7
            lin, cv = linear(x), conv(img)
    assert _autocast_dtype("cpu") is None
    assert torch.equal(zero_lin, base_lin) and torch.equal(zero_conv, base_conv)
    assert lin.dtype == cv.dtype == torch.bfloat16
    with torch.no_grad():
        want_lin = linear(x) + _delta(net.lora_unet_a_to_q, x, 0.7 * 0.5)
        want_conv = conv(img) + _delta(net.lora_unet_b_proj_in, img, 0.7 * 0.5)
    torch.testing.assert_close(lin.float(), want_lin, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(cv.float(), want_conv, rtol=2e-2, atol=2e-2)
    with net.inject(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear(x).float().square().sum()
    loss.backward()
    lora = net.lora_unet_a_to_q
    assert lora.lora_up.weight.dtype == lora.lora_up.weight.grad.dtype == torch.float32
    assert lora.lora_up.weight.grad.abs().sum() > 0


def test_fp16_layer_with_fp32_lora_without_autocast():
    """No autocast, an fp16 layer, an fp32 LoRA: the LoRA runs in fp32 on the input cast up, and its scaled output is
    cast to fp16 before the add (the rule the webui-style half models need)."""
    linear = torch.nn.Linear(8, 6).half()
    net = _net([("lora_unet_a_to_q", linear)])
    lora = net.lora_unet_a_to_q
    assert lora.lora_down.weight.dtype == torch.float32
    x = torch.randn(2, 5, 8).half()
    with torch.no_grad():
        want = linear(x) + (0.7 * 0.5 * (x.float() @ lora.lora_down.weight.T @ lora.lora_up.weight.T)).half()
        with net.inject():
            got = linear(x)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def _bf16_step(net, linear, conv, x, img, together: bool):
    net.zero_grad(set_to_none=True)
    with net.inject(), torch.autocast("cpu", dtype=torch.bfloat16):
        with net.cast_weights(torch.bfloat16) if together else net.cast_weights(None):
            out = linear(x).float().square().sum() + conv(img).float().square().sum()
    out.backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]


def test_weights_cast_together_give_bit_identical_results():
    """One multi-tensor cast per forward instead of autocast's per-weight casts: same values, same gradients."""
    linear = torch.nn.Linear(8, 6).requires_grad_(False)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1).requires_grad_(False)
    net = _net([("lora_unet_a_to_q", linear), ("lora_unet_c_conv1", conv)]).train()
    x, img = torch.randn(2, 5, 8), torch.randn(2, 4, 5, 5)
    loss_a, grads_a = _bf16_step(net, linear, conv, x, img, together=False)
    loss_b, grads_b = _bf16_step(net, linear, conv, x, img, together=True)
    assert torch.equal(loss_a, loss_b)
    assert len(grads_a) == 4 and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads_b)
    assert all(lora._cast is None for lora in net.loras())


def test_cast_weights_is_undone_on_error_and_ignored_outside_its_dtype():
    linear = torch.nn.Linear(8, 6)
    net = _net([("lora_unet_a_to_q", linear)])
    x = torch.randn(3, 8)
    with net.inject(), torch.no_grad():
        plain = linear(x)
        with net.cast_weights(torch.bfloat16):  # no autocast here: the float32 weights are used
            assert net.lora_unet_a_to_q._cast is not None
            assert torch.equal(linear(x), plain)
        with pytest.raises(ValueError), net.cast_weights(torch.float16):
            raise ValueError("boom")
    assert net.lora_unet_a_to_q._cast is None


def test_scale_follows_every_write_to_alpha():
    linear = torch.nn.Linear(8, 6)
    net = _net([("lora_unet_a_to_q", linear)], multiplier=1.0)
    lora = net.lora_unet_a_to_q
    x = torch.randn(3, 8)

    def delta():
        with torch.no_grad(), net.inject():
            return linear(x) - F.linear(x, linear.weight, linear.bias)

    first = delta()
    assert lora.scale == 0.5
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["lora_unet_a_to_q.alpha"] = torch.tensor(1.0)
    net.load_kohya(state)
    assert lora.scale == 0.25
    torch.testing.assert_close(delta(), first / 2, rtol=1e-5, atol=1e-6)
    state["lora_unet_a_to_q.alpha"] = torch.tensor(4.0)
    net.load_state_dict(state)
    assert lora.scale == 1.0
    with torch.no_grad():
        lora.alpha.fill_(0.1)  # any other in-place write is seen through the tensor's version counter
    assert lora.scale == pytest.approx(0.1 / 4)
    net.to(torch.float16)  # a dtype change rounds alpha: the scale follows the rounded value
    assert lora.scale == float(torch.tensor(0.1, dtype=torch.float16)) / 4
    net.to(torch.float32)
    lora.alpha = torch.tensor(2.0)  # a replaced buffer
    assert lora.scale == 0.5
    assert "alpha=2" in repr(lora)


def test_rank_dropout_draws_one_mask_per_sample_and_rank():
    """sd-scripts' rank dropout: one keep/drop per (sample, rank), shared by the tokens, with 1/(1-p) rescaling."""
    linear = torch.nn.Linear(8, 6)
    cfg = NetworkConfig(dim=4, alpha=4.0, rank_dropout=0.5)
    net = _net([("lora_unet_a_to_q", linear)], cfg, multiplier=1.0).train()
    lora = net.lora_unet_a_to_q
    x = torch.randn(3, 5, 8)
    with torch.no_grad(), net.inject():
        torch.manual_seed(11)
        got = linear(x)
        torch.manual_seed(11)
        mask = (torch.rand(3, 4) > 0.5).float()[:, None, :]
        want = F.linear(x, linear.weight, linear.bias) + (x @ lora.lora_down.weight.T * mask) @ lora.lora_up.weight.T / 0.5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_autocast_probe_on_torch_without_device_type_arguments(monkeypatch):
    """torch < 2.4 (the webui's 2.1) has no `is_autocast_enabled(device_type)`: the per-device functions are used."""
    from lib_lora.network import modules

    real = torch.is_autocast_enabled
    with monkeypatch.context() as patched:
        patched.setattr(torch, "is_autocast_enabled", lambda: real("cuda"))
        patched.delattr(torch, "get_autocast_dtype")
        probe = modules._autocast_getter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert probe("cpu") == torch.bfloat16
    assert probe("cpu") is None and probe("cuda") is None and probe("meta") is None


@pytest.mark.parametrize("reentrant", [False, True])
def test_weights_cast_together_under_gradient_checkpointing(reentrant):
    """A checkpointed block recomputes its forward during backward, after `cast_weights` has ended: the recompute
    uses autocast's own casts of the same values, so the gradients are still bit-identical."""
    from torch.utils.checkpoint import checkpoint

    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8)).requires_grad_(False)
    net = _net([("lora_unet_a_to_q", block[0]), ("lora_unet_a_to_k", block[2])]).train()
    x = torch.randn(2, 5, 8, requires_grad=True)

    def grads(together: bool):
        net.zero_grad(set_to_none=True)
        with net.inject(), torch.autocast("cpu", dtype=torch.bfloat16):
            with net.cast_weights(torch.bfloat16 if together else None):
                out = checkpoint(block, x, use_reentrant=reentrant)
            loss = out.float().square().sum()
            loss.backward()
        return [p.grad.clone() for p in net.parameters()]

    plain, together = grads(False), grads(True)
    assert all(g.abs().sum() > 0 for g in plain)
    assert all(torch.equal(a, b) for a, b in zip(plain, together))
