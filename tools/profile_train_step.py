"""Where a training step's time goes: Python functions (cProfile) and operators (torch.profiler).

Runs the real loop (lib_lora.train.train) on the UNet of `python -m lib_lora bench train` (SD1.5-sized, or the
tiny-channel `--proxy`), so the numbers explain that benchmark's step / bare ratio. Prints cProfile's top functions
over the profiled steps, torch.profiler's operator table, and the aten calls per step by operator for the step,
the LoRA'd forward+backward and the bare one side by side (what the step adds, operator by operator). A developer
tool, not a test:
    python tools/profile_train_step.py --device cuda --latent 64 --mixed_precision bf16 --steps 10
    python tools/profile_train_step.py --device cpu --proxy --mixed_precision bf16 --base_dtype bf16 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _per_op(prof, passes: int) -> collections.Counter:
    from lib_lora.bench.train_step import aten_events

    counts = collections.Counter(e.name for e in aten_events(prof))
    return collections.Counter({k: v / passes for k, v in counts.items()})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--latent", type=int, default=None)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--base_dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--proxy", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()

    import torch

    from lib_lora.bench.train_step import _BenchBackend, _LatentData, build_unet, count_ops
    from lib_lora.train.config import TrainConfig
    from lib_lora.train.events import StepEnd
    from lib_lora.train.loop import train
    from lib_lora.train.netglue import build_network

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    latent = args.latent or (8 if args.proxy else 64)
    torch.manual_seed(0)
    unet, layout = build_unet(args, device)
    x = torch.randn(1, 4, latent, latent, device=device)
    cond = torch.randn(1, 77, layout["cross_attention_dim"], device=device)
    t = torch.full((1,), 500, device=device)
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    backend = _BenchBackend(unet, cond, device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def passes(n: int, net=None):
        """n forward+backward passes to the input, as the bench's bare / with-LoRA figures."""
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                x_in = x.clone().requires_grad_(True)
                with torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False):
                    with net.cast_weights(amp) if net is not None else contextlib.nullcontext():
                        out = unet(x_in, t, encoder_hidden_states=cond).sample
                torch.autograd.grad(out.float().mean(), x_in)
        return prof

    bare = passes(args.steps)
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = TrainConfig(output_dir=out_dir, output_name="prof", network_dim=args.dim, network_alpha=float(args.dim),
                          network_train_unet_only=True, max_train_steps=args.warmup + args.steps, seed=0,
                          mixed_precision=args.mixed_precision, train_batch_size=1, train_data_dir=out_dir)
        lora_net = build_network(cfg, backend).to(device)
        with lora_net.inject():  # the LoRA alone, as the loop attaches it
            lora = passes(args.steps, lora_net)
        torch_prof = None
        for ev in train(cfg, backend, _LatentData(x, 1), None):
            if isinstance(ev, StepEnd) and ev.step == args.warmup:
                torch_prof = torch.profiler.profile(activities=activities)
                torch_prof.__enter__()
                profiler.enable()
            elif isinstance(ev, StepEnd) and ev.step == args.warmup + args.steps:
                profiler.disable()
                torch_prof.__exit__(None, None, None)
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(args.rows)
    print(stream.getvalue())
    averages = torch_prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if device.type == "cuda":
        print(averages.table(sort_by="self_cuda_time_total", row_limit=15))
    ops = {name: _per_op(prof, args.steps) for name, prof in (("bare", bare), ("lora", lora), ("step", torch_prof))}
    names = sorted(set().union(*ops.values()), key=lambda k: -(ops["step"][k] - ops["bare"][k]))
    print(f"{'aten calls per pass':40s} {'bare':>8s} {'+LoRA':>8s} {'step':>8s} {'step-bare':>10s}")
    for name in names[: args.rows]:
        b, w, s = (ops[k][name] for k in ("bare", "lora", "step"))
        print(f"{name:40s} {b:8.0f} {w:8.0f} {s:8.0f} {s - b:10.0f}")
    for name, prof in (("bare", bare), ("with LoRA", lora), ("step", torch_prof)):
        calls, leaves = count_ops(prof)
        print(f"{name:10s} aten calls per pass {calls / args.steps:8.0f}, kernel-running leaves {leaves / args.steps:7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
