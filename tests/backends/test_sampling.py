"""The preview sampler's arithmetic: with a denoiser that knows the answer, every sampler lands on it (epsilon and
v models), and the step grid runs from the noisiest timestep to 0."""

from __future__ import annotations

import pytest
import torch

from lib_lora.backends.base import Cond, scaled_linear_alphas_cumprod
from lib_lora.backends.sampling import sample_latents, timestep_grid
from lib_lora.errors import BadInput


class KnowsTheAnswer:
    """Implements the part of the Backend contract the sampler uses; `predict` returns the exact noise (or v) that
    leads to `target` from any noisy sample, so an exact sampler must end on `target`."""

    latent_channels, vae_scale = 4, 8

    def __init__(self, prediction_type: str, target: torch.Tensor) -> None:
        self.prediction_type, self.target = prediction_type, target
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        self.calls = 0

    def predict(self, noisy, timesteps, cond):
        self.calls += 1
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        x0 = self.target.expand_as(noisy)
        eps = (noisy - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if self.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim"])
def test_samplers_reach_the_denoisers_answer(prediction, sampler):
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    oracle = KnowsTheAnswer(prediction, target)
    cond = Cond(torch.zeros(1, 77, 8))
    out = sample_latents(oracle, cond, cond, steps=6, cfg=5.0, seed=1, width=64, height=64, sampler=sampler)
    torch.testing.assert_close(out, target, rtol=1e-3, atol=1e-3)
    assert oracle.calls == 6  # one guided (batched) call per step


def test_step_grid_and_bad_settings():
    assert timestep_grid(4) == [999, 666, 333, 0]
    assert timestep_grid(1) == [999]
    with pytest.raises(BadInput, match="steps"):
        timestep_grid(0)
    oracle = KnowsTheAnswer("epsilon", torch.zeros(1, 4, 8, 8))
    with pytest.raises(BadInput, match="multiples of 8"):
        sample_latents(oracle, Cond(torch.zeros(1, 77, 8)), None, steps=2, cfg=1, seed=0, width=60, height=64)
