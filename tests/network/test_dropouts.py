"""kohya's three dropouts, each on its own, with identity LoRA weights so the branch shows the mask directly.

With down = up = I and alpha = rank, the LoRA branch of a layer is exactly "x after the dropouts", so
`layer(x) - base(x)` must be 0 or x / (1 - p) element by element (network dropout), per sample and rank channel
(rank dropout), or 0 / x for the whole call (module dropout, no rescaling). For a fused MultiheadAttention the same
masks act in weight space (docs/lora-format.md 2): the output must equal the attention run with
`in_proj_weight[q rows] + diag(mask) / (1 - p)` for some mask.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F

from lib_lora.network import LoraNetwork, NetworkConfig

R = 4  # rank = width of every layer here


def identity_network(target: torch.nn.Module, name: str, **dropouts) -> LoraNetwork:
    net = LoraNetwork([(name, target)], NetworkConfig(dim=R, alpha=R, **dropouts))
    with torch.no_grad():
        for lora in net.loras():
            lora.lora_down.weight.copy_(torch.eye(R).reshape(lora.lora_down.weight.shape))
            lora.lora_up.weight.copy_(torch.eye(R).reshape(lora.lora_up.weight.shape))
    return net.train()


def branch_outputs(net: LoraNetwork, layer, base, x, calls: int = 20) -> list[torch.Tensor]:
    torch.manual_seed(0)
    with net.inject(), torch.no_grad():
        return [layer(x) - base(x) for _ in range(calls)]


def test_network_dropout_drops_single_values_and_rescales():
    linear = torch.nn.Linear(R, R)
    net = identity_network(linear, "lora_unet_x_to_q", dropout=0.5)
    x = torch.randn(8, 16, R)
    for diff in branch_outputs(net, linear, lambda v: F.linear(v, linear.weight, linear.bias), x, calls=3):
        dropped, kept = diff.abs() < 1e-6, torch.isclose(diff, 2 * x, atol=1e-5)
        assert bool((dropped | kept).all())  # each value is dropped or scaled by 1 / (1 - p)
        assert 0.3 < float(dropped.float().mean()) < 0.7


def test_rank_dropout_masks_whole_rank_channels_per_sample_and_rescales():
    linear = torch.nn.Linear(R, R)
    net = identity_network(linear, "lora_unet_x_to_q", rank_dropout=0.5)
    x = torch.randn(16, 5, R)  # (batch, tokens, channels)
    masks = []
    for diff in branch_outputs(net, linear, lambda v: F.linear(v, linear.weight, linear.bias), x, calls=3):
        kept = torch.isclose(diff, 2 * x, atol=1e-5).all(dim=1)  # (batch, rank): the whole channel kept
        dropped = (diff.abs() < 1e-6).all(dim=1)
        assert bool((kept | dropped).all())
        masks.append(kept)
    assert any(len({tuple(row.tolist()) for row in mask}) > 1 for mask in masks)  # one mask per sample

    conv = torch.nn.Conv2d(R, R, 1)
    net = identity_network(conv, "lora_unet_x_proj_in", rank_dropout=0.5)
    img = torch.randn(6, R, 3, 3)
    for diff in branch_outputs(net, conv, lambda v: F.conv2d(v, conv.weight, conv.bias), img, calls=3):
        kept = torch.isclose(diff, 2 * img, atol=1e-5).flatten(2).all(dim=2)
        dropped = (diff.abs() < 1e-6).flatten(2).all(dim=2)
        assert bool((kept | dropped).all()) and bool(dropped.any()) and bool(kept.any())


def test_module_dropout_skips_the_whole_module_without_rescaling():
    linear = torch.nn.Linear(R, R)
    net = identity_network(linear, "lora_unet_x_to_q", module_dropout=0.5)
    x = torch.randn(4, 3, R)
    kinds = set()
    for diff in branch_outputs(net, linear, lambda v: F.linear(v, linear.weight, linear.bias), x):
        if bool((diff.abs() < 1e-6).all()):
            kinds.add("skipped")
        else:
            torch.testing.assert_close(diff, x, rtol=1e-5, atol=1e-5)
            kinds.add("full")
    assert kinds == {"skipped", "full"}


def _mha_reference(mha: torch.nn.MultiheadAttention, x: torch.Tensor, q_delta: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(mha)
    with torch.no_grad():
        ref.in_proj_weight[:R] += q_delta
        return ref(x, x, x, need_weights=False)[0]


def _mha_candidates(mha, x, scale: float) -> dict[tuple[int, ...], torch.Tensor]:
    return {mask: _mha_reference(mha, x, torch.diag(torch.tensor(mask, dtype=torch.float32)) * scale)
            for mask in itertools.product((0, 1), repeat=R)}


def _mha_masks(mha, net, x, candidates, calls: int = 12) -> list[tuple[int, ...]]:
    torch.manual_seed(0)
    seen = []
    with net.inject(), torch.no_grad():
        for _ in range(calls):
            out = mha(x, x, x, need_weights=False)[0]
            match = [mask for mask, want in candidates.items() if torch.allclose(out, want, atol=1e-5)]
            assert match, "the output fits no dropout mask of the q delta"
            seen.append(match[0])
    return seen


def test_fused_attention_dropouts_act_on_the_weight_delta():
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(R, 1)
    x = torch.randn(5, 2, R)  # (tokens, batch, width)
    name = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    rescaled = _mha_candidates(mha, x, 2.0)  # kept ranks / entries scaled by 1 / (1 - 0.5)
    for kind in ("rank_dropout", "dropout"):
        masks = _mha_masks(mha, identity_network(mha, name, **{kind: 0.5}), x, rescaled)
        assert len(set(masks)) > 1, kind
    plain = _mha_candidates(mha, x, 1.0)
    masks = _mha_masks(mha, identity_network(mha, name, module_dropout=0.5), x, plain)
    assert set(masks) == {(0,) * R, (1,) * R}
    eval_net = identity_network(mha, name, dropout=0.5, rank_dropout=0.5, module_dropout=0.5).eval()
    assert set(_mha_masks(mha, eval_net, x, plain, calls=3)) == {(1,) * R}
