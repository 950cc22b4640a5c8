"""The numbers of a run: one optimizer step (batch -> latents, noise and timesteps, text conditioning, prediction,
loss, backward over the batches of a gradient-accumulation chunk, the NaN check, the update) and the validation loss.

Kept apart from the loop (loop.py), which decides when steps happen and what a run writes around them. `TrainStep` is
mixed into `loop.Run`; the attributes annotated below are what it reads from the run (set up by `Run.events`).
Every random draw here comes from `step_seed(seed, epoch, batch index)`, which is what makes resume and pause exact.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from typing import Any

import torch

from .compiling import CompiledForward, CompileFailed
from .config import TrainConfig
from .loss import add_noise, diffusion_loss, offset_noise, per_sample_mse, target_for


class NonFiniteLoss(Exception):
    pass


def step_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one batch's random draws, independent of how the run got there (resume, pause)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class TrainStep:
    """The step's computation, as methods of the run (`loop.Run`)."""

    cfg: TrainConfig
    backend: Any
    data: Any
    device: torch.device
    amp_dtype: torch.dtype | None
    pred_type: str
    ac: torch.Tensor  # alphas_cumprod on the CPU (its length = the number of timesteps)
    ac_device: torch.Tensor  # the same on the run's device
    net: Any  # the LoraNetwork
    text: Any  # the TextConditioner
    setup: Any  # optimizer + scheduler (optim.build_optimizer)
    scaler: Any  # fp16 GradScaler or None
    params: list
    dist: Any
    state: Any  # TrainState: global_step names the step in the NaN message
    seed: int
    forward: CompiledForward | None  # torch_compile; set to None here when compiling fails
    keep_grads: bool
    notes: list[str]  # said during a step, yielded by the loop after it

    def _optimizer_step(self, chunk: list) -> float:
        """Forward + backward of each batch of the chunk (gradient accumulation), then one optimizer step.

        The host waits for the device once per step: the batch losses stay on the device until every backward has
        been queued, then come back together for the NaN check and the step event. A non-finite loss stops the run
        before the optimizer applies anything."""
        if self.forward is not None:
            self.forward.step_begins()
        losses = [self._forward_backward(spec, 1.0 / len(chunk)) for spec in chunk]
        values = [losses[0].item()] if len(losses) == 1 else torch.stack(losses).tolist()
        for spec, value in zip(chunk, values):
            if not math.isfinite(value):
                raise NonFiniteLoss(f"loss became {value} at step {self.state.global_step + 1} (epoch {spec.epoch})")
        opt, sched = self.setup.optimizer, self.setup.scheduler
        self.dist.average_gradients(self.params)
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)  # multi-tensor kernels
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=not self.keep_grads)
        return self.dist.all_mean(sum(values) / len(chunk))

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _draws(self, latents: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, timesteps) for one batch, drawn on the CPU from its own generator (same numbers on any device)."""
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(latents.shape, generator=gen)
        if self.cfg.noise_offset:
            noise = noise + offset_noise(noise, self.cfg.noise_offset, gen)
        t = torch.randint(0, len(self.ac), (latents.shape[0],), generator=gen)
        return noise.to(self.device), t.to(self.device)

    def _latents(self, batch) -> torch.Tensor:
        if batch.latents is not None:
            return batch.latents.to(self.device, torch.float32)
        with torch.no_grad(), self._autocast():
            return self.backend.encode_images(batch.pixels).to(self.device, torch.float32)

    def _cond(self, batch):
        sizes = None
        if self.backend.arch == "sdxl":  # (original h, w, crop top, left, target h, w) per image
            sizes = [(*o, *c, *t) for o, c, t in zip(batch.original_sizes, batch.crop_top_lefts, batch.target_sizes)]
        return self.text(list(batch.captions), sizes)

    def _predict_loss(self, batch, seed: int, weights: bool = True, compiled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss (weighted) or (mean, per-sample MSE). `compiled`: through the torch_compile forward when
        the run has one (training steps; validation runs eagerly rather than compile an eval graph)."""
        forward = self.forward if compiled else None
        torch.manual_seed(seed)  # dropout in the network, VAE sampling
        latents = self._latents(batch)
        noise, t = self._draws(latents, seed)
        ac = self.ac_device
        noisy = add_noise(latents, noise, t, ac)
        # eager: LoRA weights cast once per forward; compiled: the graph casts them itself
        cast = nullcontext() if forward is not None else self.net.cast_weights(self.amp_dtype)
        try:
            with self._autocast(), cast:
                cond = self._cond(batch)
                pred = forward(noisy, t, cond) if forward is not None else self.backend.predict(noisy, t, cond)
        except CompileFailed as exc:
            self.notes.append(f"torch_compile failed, training eagerly from here on: {exc}")
            self.forward = None
            return self._predict_loss(batch, seed, weights, compiled=False)
        target = target_for(self.pred_type, latents, noise, t, ac)
        if not weights:
            per = per_sample_mse(pred, target)
            return per.mean(), per
        return diffusion_loss(pred, target, t, ac, self.pred_type, batch.loss_weights, self.cfg.min_snr_gamma)

    def _forward_backward(self, spec, scale: float) -> torch.Tensor:
        """One batch's forward and backward; returns its loss, detached and still on the device (no host sync)."""
        batch = self.data.load_batch(spec)
        loss, _ = self._predict_loss(batch, step_seed(self.seed, spec.epoch, spec.index))
        scaled = loss if scale == 1.0 else loss * scale
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()

    def _validation_loss(self, specs: list) -> tuple[float, int]:
        """(mean per-image MSE, images) over the validation batches: noise and timesteps fixed per batch by
        validation_seed, the network's dropout off, eager (no compiled eval graph); averaged over processes."""
        val_seed = self.cfg.validation_seed if self.cfg.validation_seed is not None else self.seed
        self.net.train(False)
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for spec in specs:
                    _, per = self._predict_loss(self.data.load_batch(spec), step_seed(val_seed, 0, spec.index), weights=False,
                                                compiled=False)
                    total += float(per.sum())
                    count += per.numel()
        finally:
            self.net.train(True)
        return self.dist.all_mean(total / max(1, count)), count
