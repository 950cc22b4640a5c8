"""`python -m lib_lora bench train`: how much a training step costs beyond the UNet's own forward + backward.

An SD1.5-sized UNet (the SD1.5 diffusers config, random weights: nothing downloaded) with a LoRA of `--dim`
on its attention layers. Two timings on the same inputs:
- bare: `unet(x, t, c)` forward and backward of its mean, LoRA attached, no optimizer (the floor);
- step: one optimizer step of the real training loop (`lib_lora.train.train`) on cached latents: data, noise,
  loss, backward, grad clipping, AdamW, schedule, events.
The ratio step / bare is what the loop adds (target <= 1.10 on CPU at dim 16, 32x32 latents).
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

    def encode_prompts(self, texts, clip_skip=None, max_tokens=None, sizes=None):
        return self.cond[: len(texts)]

    def predict(self, noisy, t, cond):
        return self.unet(noisy, t, encoder_hidden_states=cond).sample

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

    from ..network import LoraNetwork, NetworkConfig, unet_targets
    from ..train.config import TrainConfig
    from ..train.events import StepEnd
    from ..train.loop import train

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

    # bare forward + backward with the LoRA attached
    net_cfg = NetworkConfig(dim=args.dim, alpha=float(args.dim), train_text_encoder=False)
    bare_net = LoraNetwork(unet_targets(unet, "sd1", net_cfg), net_cfg).to(device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    bare, bare_cpu = [], []
    with bare_net.inject():
        for i in range(args.warmup + args.steps):
            sync()
            began, began_cpu = time.perf_counter(), time.process_time()
            with torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False):
                out = unet(x, t, encoder_hidden_states=cond).sample
            out.float().mean().backward()
            sync()
            if i >= args.warmup:
                bare.append(time.perf_counter() - began)
                bare_cpu.append(time.process_time() - began_cpu)
            bare_net.zero_grad(set_to_none=True)
    if args.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    modules = len(list(bare_net.loras()))
    del bare_net

    # full training steps through the loop
    backend = _BenchBackend(unet, cond, device)
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = TrainConfig(output_dir=out_dir, output_name="bench", network_dim=args.dim, network_alpha=float(args.dim),
                          network_train_unet_only=True, max_train_steps=args.warmup + args.steps + 1, seed=0,
                          mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                          train_batch_size=args.batch, train_data_dir=out_dir)
        stamps, cpu_stamps = [], []
        for ev in train(cfg, backend, _LatentData(x, args.batch)):
            if isinstance(ev, StepEnd):
                sync()
                stamps.append(time.perf_counter())
                cpu_stamps.append(time.process_time())
    skip = args.warmup - 1 if args.warmup else 0
    steps = [b - a for a, b in zip(stamps, stamps[1:])][skip:][: args.steps]
    steps_cpu = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])][skip:][: args.steps]
    bare_s, step_s = statistics.median(bare), statistics.median(steps)
    bare_c, step_c = statistics.median(bare_cpu), statistics.median(steps_cpu)
    peak, kind = _peak(device)
    print(f"machine: {_machine(device)}")
    print(f"UNet {params / 1e6:.0f}M params, LoRA dim {args.dim} on {modules} modules, batch {args.batch}, "
          f"latents {args.latent}x{args.latent}, mixed_precision {args.mixed_precision}, "
          f"gradient_checkpointing {args.gradient_checkpointing}")
    print(f"bare forward+backward: {bare_s:.3f} s (median of {len(bare)})")
    print(f"training step:         {step_s:.3f} s (median of {len(steps)}), {1 / step_s:.2f} it/s")
    print(f"ratio step / bare:     {step_s / bare_s:.3f} (wall clock); {step_c / bare_c:.3f} (process CPU time: "
          f"{bare_c:.3f} s vs {step_c:.3f} s, less sensitive to other load on the machine)")
    print(f"peak memory:           {peak:.2f} GiB ({kind})")
    return 0
