"""The training run: `train(cfg, backend, dataset, control)` yields events until done, stopped or failed.

Exactness is designed in: every random draw of a batch (noise, timesteps, offset noise, dropout, VAE
sampling) comes from a seed made of (seed, epoch, batch index), and the dataset's batch plan is a pure function
of (seed, epoch). So a run that is paused, stopped and resumed (any number of times) computes the same numbers
as one that never stopped. The model handed in is restored in `finally`: hooks removed, the backend's
training changes undone, the global RNG as it was.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import random
import time
from typing import Any, Iterator

import torch

from ..errors import BadInput
from . import dist as dist_mod
from .checkpoints import StepOutputs
from .compiling import CompiledForward, bucket_count, compile_notes, is_oom
from .config import TrainConfig, effective_lrs, sample_prompt_lines
from .events import (
    Continued, Done, EpochEnd, Event, Failed, Interrupted, Note, Paused, Sample, Saved, Started, StepEnd,
    TrainControl, Validation,
)
from .metadata import activation_text, training_metadata
from .netglue import build_network, load_weights, save_network
from .optim import build_optimizer, current_lrs, make_grad_scaler
from .outputs import LossLog, WriteFailed, epoch_file, save_samples, state_dir
from .prompts import parse_prompt
from .state import TrainState, load_state, save_state, settings_digest
from .textcond import TextConditioner
from .steps import plan_from_dataset
from .trainstep import NonFiniteLoss, TrainStep, step_seed
from .validate import errors_of, raise_for_problems, validate

__all__ = ["train", "Run", "step_seed", "call_with_known", "is_oom", "NonFiniteLoss"]


def call_with_known(fn, **kwargs):
    """Call a backend method with the keyword arguments its signature names (backends differ in extras)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def train(cfg: TrainConfig, backend: Any, dataset: Any, control: TrainControl | None = None) -> Iterator[Event]:
    """Run (or resume, or dry-run) a training; see docs/training.md for the events and the files written."""
    from .dataset_config import apply_dataset_config

    if cfg.dataset_config and not getattr(getattr(dataset, "options", None), "subsets", ()):
        # e.g. a host that builds the dataset from its own folder: the file's settings would apply to other images
        raise BadInput("dataset_config is set but the dataset was not built from it (build it with "
                       "lib_lora.train.state.build_dataset(cfg), or leave dataset_config empty)")
    # a dataset config's resolution / batch size / augmentation are the run's (as build_dataset used them)
    return Run(apply_dataset_config(cfg), backend, dataset, control or TrainControl()).events()


class Run(StepOutputs, TrainStep):
    """One run: setup and hand-back, the epochs, control (stop, pause), and what it writes at epoch ends; the
    numbers of each optimizer step come from `TrainStep` (trainstep.py), step saves / previews and "save now" from
    `StepOutputs` (checkpoints.py)."""

    def __init__(self, cfg: TrainConfig, backend: Any, dataset: Any, control: TrainControl):
        self.cfg, self.backend, self.data, self.control = cfg, backend, dataset, control
        self.dist = dist_mod.current()
        self.device = torch.device(backend.device)
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        self.pred_type = "v_prediction" if cfg.v_parameterization else backend.prediction_type
        self.ac = backend.alphas_cumprod.detach().float().cpu()
        self.ac_device = self.ac.to(self.device)  # the loss gathers from it each step: no host-to-device copy there
        self.net = self.setup = self.scaler = None
        self.forward: CompiledForward | None = None  # torch_compile: the compiled UNet forward (None = eager)
        self.keep_grads = False  # CUDA graphs + gradient accumulation: .grad buffers stay allocated between steps
        self.notes: list[str] = []  # said during a step, yielded after it
        self.compile_time_in_times = False  # the first step's time (torch.compile) is dropped once a second comes
        self.applied = self.prepared = False
        self.text = None
        self.latents_cached = False
        self.files: list[str] = []
        self.times: collections.deque = collections.deque(maxlen=20)
        self.log = LossLog(cfg, enabled=False)

    # ------------------------------------------------------------------ setup and teardown
    def events(self) -> Iterator[Event]:
        cfg = self.cfg
        raise_for_problems([p for p in errors_of(validate(cfg, need_model_path=False)) if p.field not in ("train_data_dir", "output_dir")])
        loaded = load_state(cfg.resume) if cfg.resume else None
        data_seed = getattr(self.data, "seed", None)
        seed = loaded.state.seed if loaded else cfg.seed if cfg.seed is not None else data_seed if data_seed is not None else random.randrange(2**31)
        self.seed = seed
        self.plan = plan_from_dataset(cfg, self.data, self.dist.world)
        if self.plan.total_steps < 1:
            raise BadInput("the dataset gives no training step (check repeats and train_batch_size)")
        self.state = loaded.state if loaded else TrainState(seed=seed, total_steps=self.plan.total_steps, started_at=time.time(),
                                                           session_id=random.randrange(2**31), settings=settings_digest(cfg))
        self.state.total_steps = self.plan.total_steps
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            if loaded and loaded.state.settings != settings_digest(cfg):
                yield Note("settings changed since the state was saved: the resumed run will not match an uninterrupted one")
            if data_seed is not None and data_seed != seed:
                yield Note(f"the dataset was built with seed {data_seed}, the run uses {seed}: build it with resolve_seed(cfg)")
            unet_lr, te_lr = effective_lrs(cfg)
            self._prepare()
            self.train_te = te_lr > 0
            if (cfg.cache_latents or cfg.cache_latents_to_disk) and not cfg.dry_run:
                yield Note("encoding every image once (cache_latents)" + (" to .npz files beside the images" if cfg.cache_latents_to_disk else ""))
                encoder_id = str(getattr(self.backend, "vae_id", self.backend.arch))
                # several processes cache their own shares: a stop waits for the first step, where they agree
                stop = None if self.dist.active else (lambda: self.control.stop_requested)
                cache = self.data.cache_latents(self._seeded_encoder(seed), encoder_id, should_stop=stop)
                if getattr(cache, "stopped", False):  # no step ran: nothing to save; the model goes back in finally
                    yield Interrupted.while_caching(self.state.global_step, cfg.resume, cache)
                    return
                self.latents_cached = True
                self._offload()
            self.text = TextConditioner(self.backend, self.data, cfg.clip_skip, cfg.max_token_length, self.train_te)
            torch.manual_seed(seed)  # the LoRA's initial down weights
            self.net = build_network(cfg, self.backend)
            if cfg.network_weights:
                load_weights(self.net, cfg.network_weights)
            self.net.to(self.device)
            self.net.apply()
            self.applied = True
            self.params = [p for p in self.net.parameters() if p.requires_grad]
            self.dist.broadcast_parameters(self.params)
            self.setup = build_optimizer(cfg, self.net.param_groups(unet_lr, te_lr), self.plan.total_steps)
            if cfg.torch_compile and cfg.dynamo_backend.strip().lower() != "no":
                yield from self._compile()
            if self.amp_dtype is torch.float16:
                self.scaler = make_grad_scaler(self.device.type)
            if loaded:
                self.net.load_kohya({k: v.to(self.device) for k, v in loaded.network.items()})
                self.setup.optimizer.load_state_dict(loaded.optimizer)
                self.setup.scheduler.load_state_dict(loaded.scheduler)
                if self.scaler is not None and loaded.scaler:
                    self.scaler.load_state_dict(loaded.scaler)
            self.files = list(self.state.saved_files)
            yield Started(self.plan.total_steps, self.plan.epochs, self.plan.steps_per_epoch, self.state.global_step, seed,
                          self.plan.describe(cfg))
            if cfg.dry_run:
                from .dryrun import measure

                yield measure(self)
                return
            self.log = LossLog(cfg, resume_step=self.state.global_step if loaded else None, enabled=self.dist.is_main)
            yield from self._epochs()
        except NonFiniteLoss as exc:
            self.log.flush()
            yield Failed(f"{exc}: overcooked: lower the learning rate (finished epochs are kept)", self.state.global_step, tuple(self.files))
        except (WriteFailed, OSError) as exc:
            with contextlib.suppress(OSError):
                self.log.flush()
            what = f"{exc}: free space or clear the way" if isinstance(exc, WriteFailed) else f"a file operation failed: {exc}"
            yield Failed(f"{what} (at step {self.state.global_step}; the files saved before are kept)", self.state.global_step,
                         tuple(self.files))
        except (RuntimeError, MemoryError) as exc:
            if not is_oom(exc):
                raise
            self.log.flush()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            yield Failed(
                f"out of memory at step {self.state.global_step + 1}: try train_batch_size 1, gradient_checkpointing, "
                "cache_latents, a lower resolution, or mixed_precision bf16/fp16", self.state.global_step, tuple(self.files))
        finally:
            if self.forward is not None:
                self.forward.release()
                self.forward = None
            self._hand_back()
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            self.log.close()

    def _prepare(self) -> None:
        unet_lr, te_lr = effective_lrs(self.cfg)
        call_with_known(self.backend.prepare_for_training, train_unet=unet_lr > 0, train_text_encoder=te_lr > 0,
                        gradient_checkpointing=self.cfg.gradient_checkpointing, mixed_precision=self.cfg.mixed_precision)
        self.prepared = True

    def _compile(self) -> Iterator[Event]:
        """Set up the compiled UNet forward (after the LoRA is attached: the compiled code must see it)."""
        cfg = self.cfg
        shapes = bucket_count(self.data)
        forward = CompiledForward(self.backend, dynamo_backend=cfg.dynamo_backend, mode=cfg.dynamo_mode, shapes=shapes)
        if not forward.enabled:
            yield Note(f"torch_compile is off for this run, training eagerly: {forward.failure}")
            return
        for line in compile_notes(cfg, self.net, self.device, shapes):
            yield Note(line)
        self.forward = forward
        self.compile_time_in_times = True
        if forward.uses_cudagraphs and cfg.gradient_accumulation_steps > 1:
            # CUDA graphs reuse their output memory on the next replay: gradients accumulated over several
            # backwards must live in buffers of their own, allocated here (outside any graph) and zeroed, not freed
            self.keep_grads = True
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    def _seeded_encoder(self, seed: int):
        """The VAE for latent caching, sampling from a generator seeded with the run's seed: the same latents in
        every run with this seed, in every process of a multi-GPU run, and in a resumed run (which caches again)."""
        encode = self.backend.encode_images
        if "generator" not in inspect.signature(encode).parameters:
            return encode
        gen = torch.Generator().manual_seed(seed)
        return lambda pixels: encode(pixels, generator=gen)

    def _offload(self) -> None:
        """With every latent cached the VAE leaves the GPU (restore() brings it back)."""
        if self.latents_cached and hasattr(self.backend, "offload_vae"):
            self.backend.offload_vae()

    def _hand_back(self) -> None:
        """Give the model back exactly as it came: hooks off first, then the backend's own changes."""
        try:
            if self.applied:
                self.net.restore()
                self.applied = False
        finally:
            if self.prepared:
                self.backend.restore()
                self.prepared = False

    # ------------------------------------------------------------------ the loop
    def _epochs(self) -> Iterator[Event]:
        cfg, st, total = self.cfg, self.state, self.plan.total_steps
        accum = cfg.gradient_accumulation_steps
        if st.global_step == 0 and st.epochs_done == 0 and not st.val_losses:
            yield from self._validate(0)
        for epoch in range(st.epochs_done + 1, self.plan.epochs + 1):
            specs = self.dist.shard(list(self.data.epoch_batches(epoch)))
            first = st.batches_done
            for start in range(first, len(specs), accum):
                if st.global_step >= total:
                    break
                # every process stops at the same step; after the first pass the check below has just answered
                if start == first and self.dist.any_true(self.control.stop_requested):
                    yield from self._interrupt(epoch)
                    return
                chunk = specs[start : start + accum]
                began = time.perf_counter()
                loss = self._optimizer_step(chunk)
                self.times.append(time.perf_counter() - began)
                if self.compile_time_in_times and len(self.times) > 1:  # the compiling step would skew speed and ETA
                    self.times.popleft()
                    self.compile_time_in_times = False
                st.batches_done += len(chunk)
                st.global_step += 1
                st.epoch_loss_sum += loss
                st.epoch_loss_count += 1
                yield self._step_event(epoch, -(-st.batches_done // accum), loss)
                while self.notes:
                    yield Note(self.notes.pop(0))
                yield from self._after_step(epoch)
                if self.control.pause_requested:
                    yield from self._pause()
                if self.dist.any_true(self.control.stop_requested):
                    yield from self._interrupt(epoch)
                    return
            last = epoch == self.plan.epochs or st.global_step >= total
            yield from self._epoch_end(epoch, last)
            if last:
                break
        yield self._done()

    def _step_event(self, epoch: int, step_in_epoch: int, loss: float) -> StepEnd:
        st = self.state
        avg = st.epoch_loss_sum / max(1, st.epoch_loss_count)
        lrs = current_lrs(self.setup)
        per_step = sum(self.times) / len(self.times) if self.times else 0.0
        its = 1.0 / per_step if per_step else 0.0
        self.log.step(st.global_step, epoch, loss, avg, lrs[0] if lrs else 0.0)
        return StepEnd(st.global_step, self.plan.total_steps, epoch, step_in_epoch, loss, avg, lrs[0] if lrs else 0.0, its,
                       (self.plan.total_steps - st.global_step) * per_step)

    # ------------------------------------------------------------------ epoch ends, files
    def _epoch_end(self, epoch: int, last: bool) -> Iterator[Event]:
        cfg, st = self.cfg, self.state
        avg = st.epoch_loss_sum / max(1, st.epoch_loss_count)
        st.epochs_done, st.batches_done, st.epoch_loss_sum, st.epoch_loss_count = epoch, 0, 0.0, 0
        yield EpochEnd(epoch, avg, st.global_step)
        yield from self._validate(epoch)
        every = cfg.save_every_n_epochs
        if every and (epoch % every == 0 or last):
            yield from self._save_lora(epoch_file(cfg, epoch), epoch)
        elif last:
            yield from self._save_lora(epoch_file(cfg, None), epoch)
        if cfg.sample_every_n_epochs and (epoch % cfg.sample_every_n_epochs == 0 or last):
            yield from self._sample(epoch)
        if cfg.save_state and ((every and epoch % every == 0) or last):
            yield from self._save_state(state_dir(cfg, None if last else epoch), epoch)
        self.log.flush()

    def _validate(self, epoch: int) -> Iterator[Event]:
        specs_fn = getattr(self.data, "validation_batches", None)
        specs = list(specs_fn()) if specs_fn else []
        if not specs:
            return
        loss, count = self._validation_loss(specs)
        self.state.val_losses[str(epoch)] = loss
        self.log.validation(self.state.global_step, epoch, loss)
        yield Validation(epoch, loss, count)

    def _save_lora(self, path, epoch: int, step: int | None = None) -> Iterator[Event]:
        if not self.dist.is_main:
            return
        st = self.state
        training = training_metadata(
            self.cfg, arch=self.backend.arch, prediction_type=self.pred_type, dataset=self.data, session_id=st.session_id,
            started_at=st.started_at, epoch=epoch, num_epochs=self.plan.epochs, step=st.global_step,
            total_steps=self.plan.total_steps, batches_per_epoch=self.plan.batches_per_epoch, optimizer_name=self.setup.name,
            seed=self.seed, world=self.dist.world, model_name=getattr(self.backend, "model_name", None))
        try:
            save_network(self.net, path, self.cfg, training, arch=self.backend.arch, v_prediction=self.pred_type == "v_prediction",
                         dataset=self.data, epoch=epoch, steps=st.global_step, started_at=st.started_at,
                         session_id=st.session_id, base_model=training.get("ss_sd_model_name"),
                         activation_text=activation_text(self.data))
        except (OSError, BadInput) as exc:  # full disk, no permission, something in the way
            raise WriteFailed(path, exc) from exc
        self.files.append(str(path))
        st.saved_files = list(self.files)
        yield Saved(str(path), epoch, step=step)

    def _sample(self, epoch: int, step: int | None = None) -> Iterator[Event]:
        if not self.dist.is_main:
            return
        images, failure = [], None
        self.net.train(False)
        try:
            with torch.no_grad():
                for i, line in enumerate(sample_prompt_lines(self.cfg)):
                    p = parse_prompt(line)
                    out = call_with_known(
                        self.backend.sample, prompt=p.prompt, negative=p.negative_prompt, width=p.width, height=p.height,
                        steps=p.steps, cfg=p.scale, seed=p.seed if p.seed is not None else self.seed + i,
                        sampler=p.sampler or self.cfg.sample_sampler, clip_skip=self.cfg.clip_skip or 1,
                        max_tokens=self.cfg.max_token_length or 75)
                    images += list(out) if isinstance(out, (list, tuple)) else [out]
                    if self.control.stop_requested:  # the stop is taken at the next step boundary (state saved)
                        break
        except Exception as exc:  # a preview is never worth the epochs still to train
            failure = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            self.net.train(True)
        if failure:
            yield Note(f"preview samples of {'epoch %d' % epoch if step is None else 'step %d' % step} failed and were "
                       f"skipped ({failure}); training goes on")
        if images:
            yield Sample(epoch, tuple(str(p) for p in save_samples(self.cfg, epoch, images, step)), step)

    def _save_state(self, folder, epoch: int, step: int | None = None) -> Iterator[Event]:
        if self.dist.is_main:
            try:
                save_state(folder, self.state, self.net.state_dict(), self.setup.optimizer.state_dict(),
                           self.setup.scheduler.state_dict(), self.scaler.state_dict() if self.scaler else None, self.cfg)
            except OSError as exc:
                raise WriteFailed(folder, exc) from exc
            yield Saved(str(folder), epoch, "state", step)
        self.dist.barrier()

    # ------------------------------------------------------------------ control
    def _interrupt(self, epoch: int) -> Iterator[Event]:
        folder = state_dir(self.cfg)
        yield from self._save_state(folder, epoch)
        self.log.flush()
        yield Interrupted(self.state.global_step, str(folder))

    def _move_run_tensors(self, device: torch.device) -> None:
        self.net.to(device)
        for per_param in self.setup.optimizer.state.values():
            for key, value in per_param.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    per_param[key] = value.to(device)

    def _pause(self) -> Iterator[Event]:
        """Hand the model back and move what the run holds to the CPU; continue where it stopped."""
        step = self.state.global_step
        self._hand_back()
        self._move_run_tensors(torch.device("cpu"))
        self.text.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        yield Paused(step)
        self.control.wait_while_paused()
        self._prepare()
        self._offload()
        self._move_run_tensors(self.device)
        self.net.apply()
        self.applied = True
        yield Continued(step)

    def _done(self) -> Done:
        vals = {int(k): v for k, v in self.state.val_losses.items() if int(k) > 0}
        best = min(vals, key=vals.get) if vals else None
        best_file = next((f for f in self.files if f.endswith(f"-{best:02d}.safetensors")), None) if best else None
        msg = f"lowest validation loss at epoch {best}" + (f": {best_file}" if best_file else "") if best else ""
        self.log.flush()
        return Done(self.state.global_step, tuple(self.files), best, best_file, msg)
