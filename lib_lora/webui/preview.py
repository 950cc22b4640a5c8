"""Preview samples during training rendered by the webui's own sampler, with the training LoRA active.

Why: a preview should look like what the user will get in txt2img. The training LoRA is attached to the loaded
model's layers, so the webui's `process_images` renders through it. The run already holds the queue lock (this
runs inside the training job), so `process_images` is called directly, never through anything that takes the lock.
Live previews are off for these generations: the tab shows the finished preview anyway, and with the webui's
default "Approx NN" method an SDXL generation first loads `vaeapprox-sdxl.pt`, downloading it when missing; offline
(or behind a proxy) that failed the whole training run at its first preview (seen on the real webui with SDXL).
The settings a preview overrides are put back by `settings_restored`, not by the webui (see there).
"""

from __future__ import annotations

import contextlib
from contextlib import closing
from typing import Callable, Iterable, Iterator

# sd-scripts' --sample_sampler names -> the webui's sampler names
SAMPLERS = {
    "ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "k_lms": "LMS", "euler": "Euler", "k_euler": "Euler",
    "euler_a": "Euler a", "k_euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a", "dpmsolver": "DPM++ 2M", "dpmsolver++": "DPM++ 2M",
    "dpmsingle": "DPM++ SDE",
}


def _text_and_vae(sd_model) -> list:
    parts = [getattr(sd_model, "first_stage_model", None)]
    parts.append(getattr(sd_model, "conditioner", None) or getattr(sd_model, "cond_stage_model", None))
    return [p for p in parts if p is not None]


@contextlib.contextmanager
def settings_restored(opts, keys: Iterable[str]) -> Iterator[None]:
    """Put the webui settings `keys` back exactly as they were, absent ones absent again.

    Why: `process_images` restores `override_settings` only for keys already in `opts.data`, which holds just what
    config.json holds; a setting never saved (a fresh install, or one where Settings was never applied) kept the
    preview's value for the rest of the session: after a run with clip skip 2 every txt2img used clip skip 2, and
    live previews stayed off (seen on the real webui)."""
    data = opts.data
    saved = {key: (key in data, data.get(key)) for key in keys}
    try:
        yield
    finally:
        for key, (present, value) in saved.items():
            if present:
                data[key] = value
            else:
                data.pop(key, None)


def webui_sampler(sd_model, checkpoint_name: str) -> Callable:
    """A `Backend.sample`-compatible function that renders with `processing.process_images`."""

    def sample(prompt, negative: str = "", steps: int = 20, cfg: float = 7.0, seed: int = 0, width: int = 512,
               height: int = 512, sampler: str = "euler", *, clip_skip: int = 1, max_tokens: int = 75) -> list:
        import torch
        from modules import devices, processing, shared

        state = shared.state
        kept = (state.job_no, state.job_count, state.sampling_step, state.sampling_steps, state.textinfo)
        # the trainer's caches may have moved the VAE / text encoders off the GPU: bring them for the preview
        placed = []
        for part in _text_and_vae(sd_model):
            param = next(part.parameters(), None)
            if param is not None and param.device != devices.device:
                placed.append((part, param.device))
                part.to(devices.device)
        images = []
        overrides = {"sd_model_checkpoint": checkpoint_name, "CLIP_stop_at_last_layers": int(clip_skip or 1),
                     "live_previews_enable": False}
        try:
            with settings_restored(shared.opts, overrides):
                for text in [prompt] if isinstance(prompt, str) else list(prompt):
                    p = processing.StableDiffusionProcessingTxt2Img(
                        sd_model=sd_model, prompt=text, negative_prompt=negative or "", steps=int(steps),
                        cfg_scale=float(cfg), seed=int(seed), width=int(width), height=int(height),
                        sampler_name=SAMPLERS.get(str(sampler).lower(), "Euler a"), do_not_save_grid=True,
                        do_not_save_samples=True, do_not_reload_embeddings=True,
                        override_settings=dict(overrides), override_settings_restore_afterwards=True,
                    )
                    with torch.no_grad(), closing(p):
                        processed = processing.process_images(p)
                    images.append(processed.images[0])
                    state.assign_current_image(processed.images[0])
        finally:
            for part, device in placed:
                part.to(device)
            state.job_no, state.job_count, state.sampling_step, state.sampling_steps, state.textinfo = kept
        return images

    return sample
