"""Where a training step's time goes: Python functions (cProfile) and operators / kernels (torch.profiler).

Runs the real loop (lib_lora.train.train) on the SD1.5-sized UNet of `python -m lib_lora bench train`, so the
numbers explain that benchmark's step / bare ratio. A developer tool, not a test:
    python tools/profile_train_step.py --device cuda --latent 64 --mixed_precision bf16 --steps 10
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--mixed_precision", default="bf16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    from lib_lora.bench.train_step import SD15_UNET, _BenchBackend, _LatentData
    from lib_lora.train.config import TrainConfig
    from lib_lora.train.events import StepEnd
    from lib_lora.train.loop import train

    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device).eval().requires_grad_(False)
    x = torch.randn(1, 4, args.latent, args.latent, device=device)
    cond = torch.randn(1, 77, 768, device=device)
    backend = _BenchBackend(unet, cond, device)
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = TrainConfig(output_dir=out_dir, output_name="prof", network_dim=args.dim, network_alpha=float(args.dim),
                          network_train_unet_only=True, max_train_steps=args.warmup + args.steps, seed=0,
                          mixed_precision=args.mixed_precision, train_batch_size=1, train_data_dir=out_dir)
        torch_prof = None
        for ev in train(cfg, backend, _LatentData(x, 1), None):
            if isinstance(ev, StepEnd) and ev.step == args.warmup:
                torch_prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]
                    + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
                )
                torch_prof.__enter__()
                profiler.enable()
        profiler.disable()
        if torch_prof is not None:
            torch_prof.__exit__(None, None, None)
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(30)
    print(stream.getvalue())
    if torch_prof is not None:
        averages = torch_prof.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=30))
        if device.type == "cuda":
            print(averages.table(sort_by="self_cuda_time_total", row_limit=15))
        calls = sum(a.count for a in averages if a.key.startswith("aten::"))
        print(f"aten calls per step: {calls / args.steps:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
