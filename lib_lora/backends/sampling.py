"""A small sampler of our own over `Backend.predict`, for preview images outside the webui (CLI, standalone app).

Why our own: the webui's samplers need the webui; diffusers' schedulers are not on the webui stack; previews need
only a few good-enough steps. Euler / Euler ancestral work in the k-diffusion sigma space derived from the model's
own `alphas_cumprod`; DDIM works on the DDPM grid. Both take epsilon or v predictions.
Noise comes from a CPU generator seeded with `seed`, so a preview is the same on every device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import BadInput
from .base import Cond

SAMPLERS = ("euler", "euler_a", "ddim")
_ALIASES = {"k_euler": "euler", "euler_ancestral": "euler_a", "k_euler_a": "euler_a", "euler a": "euler_a"}


def timestep_grid(steps: int, train_steps: int = 1000) -> list[int]:
    """`steps` DDPM timesteps from the noisiest (train_steps - 1) down to 0, evenly spaced."""
    if steps < 1:
        raise BadInput(f"sampling steps must be 1 or more; got {steps}")
    if steps == 1:
        return [train_steps - 1]
    return [round((train_steps - 1) * (1 - i / (steps - 1))) for i in range(steps)]


def _eps(backend, x_vp: torch.Tensor, t: int, cond, uncond_cond, cfg: float, alpha: torch.Tensor) -> torch.Tensor:
    """Classifier-free guided noise prediction at VP sample `x_vp` (= sqrt(a) x0 + sqrt(1-a) eps)."""
    batch = x_vp.shape[0]
    both = torch.cat([x_vp, x_vp]) if uncond_cond is not None else x_vp
    ts = torch.full((both.shape[0],), t, dtype=torch.long)
    conds = Cond.cat([uncond_cond, cond]) if uncond_cond is not None else cond
    out = backend.predict(both, ts, conds).to(torch.float32).cpu()
    if uncond_cond is not None:
        out_u, out_c = out[:batch], out[batch:]
        out = out_u + cfg * (out_c - out_u)
    if backend.prediction_type == "v_prediction":
        # v = sqrt(a) eps - sqrt(1-a) x0  and  x = sqrt(a) x0 + sqrt(1-a) eps  =>  eps = sqrt(a) v + sqrt(1-a) x
        out = alpha.sqrt() * out + (1 - alpha).sqrt() * x_vp
    return out


@torch.no_grad()
def sample_latents(backend, cond, uncond_cond, *, steps: int, cfg: float, seed: int, width: int, height: int,
                   sampler: str = "euler") -> torch.Tensor:
    """Latents (CPU, float32) for `cond` (and `uncond_cond` for CFG; None = no guidance)."""
    sampler = _ALIASES.get(sampler.lower(), sampler.lower()) if sampler else "euler"
    if sampler not in SAMPLERS:
        raise BadInput(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    scale = backend.vae_scale
    if width % scale or height % scale or width < scale or height < scale:
        raise BadInput(f"width and height must be positive multiples of {scale}; got {width}x{height}")
    gen = torch.Generator().manual_seed(int(seed))
    shape = (len(cond), backend.latent_channels, height // scale, width // scale)
    alphas = backend.alphas_cumprod.detach().to("cpu", torch.float32)
    grid = timestep_grid(steps, len(alphas))
    noise = torch.randn(shape, generator=gen)
    if sampler == "ddim":
        x = noise
        for i, t in enumerate(grid):
            a = alphas[t]
            a_prev = alphas[grid[i + 1]] if i + 1 < len(grid) else torch.tensor(1.0)
            eps = _eps(backend, x, t, cond, uncond_cond, cfg, a)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x
    sigmas = [((1 - alphas[t]) / alphas[t]).sqrt() for t in grid] + [torch.tensor(0.0)]
    x = noise * sigmas[0]  # k-diffusion convention: x = x0 + sigma * eps; start at sigma_max
    for i, t in enumerate(grid):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        c_in = 1 / (sigma**2 + 1).sqrt()
        eps = _eps(backend, x * c_in, t, cond, uncond_cond, cfg, alphas[t])
        if sampler == "euler":
            x = x + eps * (sigma_next - sigma)
        else:  # ancestral: step down to sigma_down, then add fresh noise up to sigma_next
            sigma_up = torch.minimum(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
            sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
            x = x + eps * (sigma_down - sigma)
            if sigma_next > 0:
                x = x + torch.randn(shape, generator=gen) * sigma_up
    return x


def to_pil(pixels: torch.Tensor) -> list:
    """[-1, 1] NCHW -> PIL images."""
    from PIL import Image

    arr = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


@torch.no_grad()
def generate(backend, prompt: str | Sequence[str], negative: str | Sequence[str] = "", *, steps: int = 20,
             cfg: float = 7.0, seed: int = 0, width: int = 512, height: int = 512, sampler: str = "euler",
             clip_skip: int = 1, max_tokens: int = 75) -> list:
    """PIL images, one per prompt, with classifier-free guidance against `negative` (cfg <= 1: no guidance)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise BadInput("no prompt to sample")
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts):
        raise BadInput(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    sizes = [(height, width, 0, 0, height, width)] * len(prompts)
    guided = cfg > 1.0
    texts = negatives + prompts if guided else prompts
    # one call, so prompt and negative get the same number of chunks
    both = backend.encode_prompts(texts, clip_skip, max_tokens, sizes=sizes * (2 if guided else 1))
    uncond, cond = (both[: len(prompts)], both[len(prompts):]) if guided else (None, both)
    latents = sample_latents(backend, cond, uncond, steps=steps, cfg=cfg, seed=seed, width=width, height=height,
                             sampler=sampler)
    return to_pil(backend.decode_latents(latents))
