"""The diffusion training loss: noising, targets, min-SNR weighting, offset noise, prior-loss weights.

Pure tensor functions over `alphas_cumprod` (the backend's 1000 values), so they are tested against hand
arithmetic with no model in sight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BadInput


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, 1) to broadcast over latents."""
    out = values.to(device=t.device)[t].float()
    return out.view(-1, *([1] * (like.dim() - 1))).to(like.device)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (DDPM forward process, Ho et al. 2020 eq. 4)."""
    a = _gather(alphas_cumprod, t, latents)
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def target_for(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the model should output: eps for `epsilon`; v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 for `v_prediction`
    (Salimans & Ho 2022, "Progressive Distillation", section 4)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _gather(alphas_cumprod, t, latents)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()).to(noise.dtype)
    raise BadInput(f"prediction type {prediction_type!r} is not epsilon or v_prediction")


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) of each timestep."""
    a = alphas_cumprod.to(t.device)[t].float()
    return a / (1 - a)


def min_snr_weight(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weight of Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", eq. 6 / table 1): min(SNR, gamma) / SNR for an epsilon target, and
    min(SNR, gamma) / (SNR + 1) for a v target (whose loss already carries a factor SNR + 1)."""
    s = snr(t, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if prediction_type == "v_prediction" else clipped / s


def offset_noise(latents: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The per-(sample, channel) constant added to the noise: strength * N(0, 1) of shape (B, C, 1, 1)
    (Lin, "Diffusion with Offset Noise", crosslabs.org 2023), which lets a model learn very dark or bright images."""
    b, c = latents.shape[:2]
    extra = torch.randn((b, c, *([1] * (latents.dim() - 2))), generator=generator, device=generator.device if generator else "cpu")
    return (strength * extra).to(latents.device, torch.float32)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample (B,), in float32 whatever the compute dtype."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.dim())))


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    sample_weights: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-sample loss) in sd-scripts' order: per-sample MSE x prior-loss weight x min-SNR weight.
    `sample_weights` holds `prior_loss_weight` for regularization images and 1 for training images."""
    loss = per_sample_mse(pred, target)
    if sample_weights is not None:
        loss = loss * sample_weights.to(loss.device, torch.float32)
    if min_snr_gamma:
        loss = loss * min_snr_weight(t, alphas_cumprod, min_snr_gamma, prediction_type).to(loss.device)
    return loss.mean(), loss.detach()
