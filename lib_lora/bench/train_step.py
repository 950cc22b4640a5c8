"""`python -m lib_lora bench train`: how much a training step costs beyond the UNet's own forward + backward.

An SD1.5-sized UNet (the SD1.5 diffusers config, random weights: nothing downloaded). Two timings, taken in turns:
- step: one optimizer step of the real training loop (`lib_lora.train.train`) with a LoRA of `--dim` on the
  UNet's attention layers, on cached latents: data, noise, LoRA forward, loss, backward, grad clipping, AdamW,
  schedule, events;
- bare: the UNet alone, forward and backward to its input, run while the loop is paused (pause hands the UNet
  back without LoRA), so both see the same machine conditions.
The ratio step / bare is what LoRA and the loop add (target <= 1.10 on CPU at dim 16, 32x32 latents).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

# the SD1.5 UNet (runwayml/stable-diffusion-v1-5 unet/config.json)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dim", type=int, default=16, help="LoRA rank")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient_checkpointing", action="store_true")


class _BenchBackend:
    """The loop's Backend over a bare UNet with fixed text conditioning (the text encoder is not what is measured)."""

    def __init__(self, unet, cond, device):
        import torch

        self.unet, self.cond, self.device = unet, cond, device
        self.arch, self.prediction_type = "sd1", "epsilon"
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()

    def encode_images(self, pixels):
        raise RuntimeError("the benchmark trains on cached latents")

    def encode_prompts(self, texts, clip_skip=1, max_tokens=75, sizes=None, *, pad_chunks=False):
        from ..backends.base import Cond

        return Cond(self.cond[: len(texts)])

    def predict(self, noisy, t, cond):
        return self.unet(noisy, t, encoder_hidden_states=cond.crossattn).sample

    def lora_targets(self, cfg):
        from ..network import unet_targets

        return unet_targets(self.unet, "sd1", cfg)

    def prepare_for_training(self, gradient_checkpointing=False, **_):
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def restore(self):
        if self.unet.is_gradient_checkpointing:
            self.unet.disable_gradient_checkpointing()


class _LatentData:
    """Cached latents as the dataset would hand them over: one bucket, fixed captions."""

    def __init__(self, latents, batch: int):
        self.latents, self.batch = latents, batch
        self.num_train_images, self.num_reg_images, self.batches_per_epoch, self.seed = 10_000, 0, 10_000, 0

    def epoch_batches(self, epoch):
        from ..dataset.loader import BatchSpec

        return [BatchSpec(epoch, i, (8 * self.latents.shape[-1],) * 2, ()) for i in range(self.batches_per_epoch)]

    def load_batch(self, spec):
        import torch

        from ..dataset.loader import Batch

        n, side = self.batch, self.latents.shape[-1] * 8
        return Batch(pixels=None, latents=self.latents, captions=["a photo"] * n, loss_weights=torch.ones(n),
                     original_sizes=[(side, side)] * n, crop_top_lefts=[(0, 0)] * n, target_sizes=[(side, side)] * n,
                     keys=[str(spec.index)] * n, flipped=[False] * n, is_reg=[False] * n)

    def caption_variants(self):
        return frozenset({"a photo"})


def _machine(device) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


def _peak(device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU allocated"
    from ..train.dryrun import _rss_peak_bytes

    return _rss_peak_bytes() / 2**30, "process RSS"


def run(args: argparse.Namespace) -> int:
    import torch
    from diffusers import UNet2DConditionModel

    from ..train.config import TrainConfig
    from ..train.events import Continued, Paused, Started, StepEnd, TrainControl
    from ..train.loop import train
    from ..train.netglue import network_config

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(0)
    print(f"building an SD1.5-sized UNet (random weights) on {device} ...", flush=True)
    unet = UNet2DConditionModel(**SD15_UNET).to(device).eval().requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=device)
    cond = torch.randn(args.batch, 77, 768, device=device)
    t = torch.full((args.batch,), 500, device=device)
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def bare_pass() -> tuple[float, float]:
        """The UNet alone (no LoRA): forward, and backward to its input (there is no weight to train)."""
        x_in = x.clone().requires_grad_(True)
        sync()
        began, began_cpu = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False):
            out = unet(x_in, t, encoder_hidden_states=cond).sample
        torch.autograd.grad(out.float().mean(), x_in)
        sync()
        return time.perf_counter() - began, time.process_time() - began_cpu

    # Training steps of the real loop, each followed by a pause (which hands the UNet back without LoRA) in which
    # one bare pass runs: both are measured in turns, under the same conditions (other load on the machine, caches).
    backend = _BenchBackend(unet, cond, device)
    control = TrainControl()
    bare, bare_cpu, steps, steps_cpu = [], [], [], []
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = TrainConfig(output_dir=out_dir, output_name="bench", network_dim=args.dim, network_alpha=float(args.dim),
                          network_train_unet_only=True, max_train_steps=args.warmup + args.steps, seed=0,
                          mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                          train_batch_size=args.batch, train_data_dir=out_dir)
        resumed = resumed_cpu = None
        for ev in train(cfg, backend, _LatentData(x, args.batch), control):
            if isinstance(ev, (Started, Continued)):
                sync()
                resumed, resumed_cpu = time.perf_counter(), time.process_time()
            elif isinstance(ev, StepEnd):
                sync()
                if ev.step > args.warmup:
                    steps.append(time.perf_counter() - resumed)
                    steps_cpu.append(time.process_time() - resumed_cpu)
                control.pause()
            elif isinstance(ev, Paused):
                wall, cpu = bare_pass()
                if ev.step > args.warmup:
                    bare.append(wall)
                    bare_cpu.append(cpu)
                control.unpause()
    modules = sum(1 for name, _ in backend.lora_targets(network_config(cfg)))
    bare_s, step_s = statistics.median(bare), statistics.median(steps)
    bare_c, step_c = statistics.median(bare_cpu), statistics.median(steps_cpu)
    peak, kind = _peak(device)
    print(f"machine: {_machine(device)}")
    print(f"UNet {params / 1e6:.0f}M params, LoRA dim {args.dim} on {modules} modules, batch {args.batch}, "
          f"latents {args.latent}x{args.latent}, mixed_precision {args.mixed_precision}, "
          f"gradient_checkpointing {args.gradient_checkpointing}")
    print(f"bare forward+backward: {bare_s:.3f} s (median of {len(bare)}; the UNet alone, no LoRA)")
    print(f"training step:         {step_s:.3f} s (median of {len(steps)}), {1 / step_s:.2f} it/s")
    print(f"ratio step / bare:     {step_s / bare_s:.3f} (wall clock); {step_c / bare_c:.3f} (process CPU time: "
          f"{bare_c:.3f} s vs {step_c:.3f} s, less sensitive to other load on the machine)")
    print(f"peak memory:           {peak:.2f} GiB ({kind})")
    return 0
