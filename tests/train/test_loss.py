"""Loss pieces against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lib_lora.errors import BadInput
from lib_lora.train.loss import add_noise, diffusion_loss, min_snr_weight, offset_noise, snr, target_for


def _ac():
    # SD's scaled_linear betas (0.00085 .. 0.012 over 1000 steps), written out by hand
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_noising_and_targets_by_hand():
    ac = torch.tensor([0.64, 0.36, 0.25])  # sqrt: 0.8/0.6, 0.6/0.8, 0.5/~0.866
    x0 = torch.full((2, 1, 1, 1), 2.0)
    eps = torch.full((2, 1, 1, 1), 1.0)
    t = torch.tensor([0, 1])
    noisy = add_noise(x0, eps, t, ac)
    assert noisy.flatten().tolist() == pytest.approx([0.8 * 2 + 0.6 * 1, 0.6 * 2 + 0.8 * 1])
    assert torch.equal(target_for("epsilon", x0, eps, t, ac), eps)
    v = target_for("v_prediction", x0, eps, t, ac)
    assert v.flatten().tolist() == pytest.approx([0.8 * 1 - 0.6 * 2, 0.6 * 1 - 0.8 * 2])
    with pytest.raises(BadInput, match="sample"):
        target_for("sample", x0, eps, t, ac)


def test_min_snr_weights_by_hand():
    ac = torch.tensor([0.9, 0.5, 0.2])  # SNR 9, 1, 0.25
    t = torch.tensor([0, 1, 2])
    assert snr(t, ac).tolist() == pytest.approx([9.0, 1.0, 0.25])
    eps_w = min_snr_weight(t, ac, 5.0, "epsilon")  # min(snr, 5) / snr
    assert eps_w.tolist() == pytest.approx([5 / 9, 1.0, 1.0])
    v_w = min_snr_weight(t, ac, 5.0, "v_prediction")  # min(snr, 5) / (snr + 1)
    assert v_w.tolist() == pytest.approx([5 / 10, 1 / 2, 0.25 / 1.25])


def test_loss_with_prior_weight_and_min_snr_by_hand():
    ac = torch.tensor([0.9, 0.5])
    t = torch.tensor([0, 1])
    pred = torch.zeros(2, 4, 2, 2)
    target = torch.stack([torch.full((4, 2, 2), 2.0), torch.full((4, 2, 2), 1.0)])  # MSE 4 and 1
    mean, per = diffusion_loss(pred, target, t, ac, "epsilon")
    assert per.tolist() == pytest.approx([4.0, 1.0]) and mean.item() == pytest.approx(2.5)
    mean, per = diffusion_loss(pred, target, t, ac, "epsilon", sample_weights=torch.tensor([1.0, 0.5]), min_snr_gamma=5.0)
    assert per.tolist() == pytest.approx([4.0 * 5 / 9, 1.0 * 0.5 * 1.0])
    mean, per = diffusion_loss(pred, target, t, ac, "v_prediction", min_snr_gamma=5.0)
    assert per.tolist() == pytest.approx([4.0 * 0.5, 1.0 * 0.5])
    assert mean.item() == pytest.approx((2.0 + 0.5) / 2)


def test_min_snr_on_real_schedule_matches_formula():
    ac = _ac()
    t = torch.tensor([10, 500, 999])
    a = ac[t].double()
    s = a / (1 - a)
    expected = torch.minimum(s, torch.tensor(5.0, dtype=torch.float64)) / s
    assert min_snr_weight(t, ac, 5.0, "epsilon").double().tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert min_snr_weight(t, ac, 5.0, "epsilon")[0].item() < 1.0  # low t: high SNR is down-weighted
    assert min_snr_weight(t, ac, 5.0, "epsilon")[2].item() == pytest.approx(1.0)


def test_offset_noise_is_constant_per_channel_and_seeded():
    lat = torch.zeros(3, 4, 8, 8)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, b = offset_noise(lat, 0.1, g1), offset_noise(lat, 0.1, g2)
    assert a.shape == (3, 4, 1, 1) and torch.equal(a, b)
    ref = 0.1 * torch.randn((3, 4, 1, 1), generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a, ref)
    assert not math.isclose(a.std().item(), 0.0)
