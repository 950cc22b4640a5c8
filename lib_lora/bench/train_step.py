"""`python -m lib_lora bench train`: how much a training step costs beyond the UNet's own forward + backward.

An SD1.5-sized UNet (the SD1.5 diffusers config, random weights: nothing downloaded). Three timings, taken in turns:
- step: one optimizer step of the real training loop (`lib_lora.train.train`) with a LoRA of `--dim` on the
  UNet's attention layers, on cached latents: data, noise, LoRA forward, loss, backward, grad clipping, AdamW,
  schedule, events;
- bare: the UNet alone, forward and backward to its input, run while the loop is paused (pause hands the UNet
  back without LoRA), so both see the same machine conditions;
- with the LoRA: the bare pass with the LoRA attached, which splits the LoRA's cost from the loop's.
The ratio step / bare is what LoRA and the loop add (target <= 1.10 on CPU at dim 16, 32x32 latents).

Under fp16/bf16 mixed precision on a GPU the base UNet is held in that dtype, as the CLI loads it (an fp32 base
under autocast re-casts every frozen weight on every forward, which no real run does).

On a GPU at batch 1 an SD1.5 step is bound by the CPU launching kernels, not by the GPU computing them, so the
number of aten operator calls per pass (counted with torch.profiler after the timed steps) predicts the GPU's
time better than a CPU timing does; it is the same on any machine. `--proxy` runs the SD1.5 layout (same blocks,
attention layers and LoRA modules) with tiny channel counts, so compute is negligible and the per-operator
overhead dominates on the CPU as it does on a GPU. On a GPU the profiler also counts the work the host hands the
GPU (CUDA runtime kernel launches, async copies and memsets; a replayed CUDA graph is one `cudaGraphLaunch`).

`--compile` runs all three through torch.compile (the loop's `torch_compile`, with `--dynamo_backend` and
`--compile_mode`; the bare and LoRA passes compile the same UNet call). The loop then runs its steps back to back
and the passes follow after the run: a pause moves the LoRA to the CPU and back, and with CUDA graphs
(`--compile_mode reduce-overhead`) every step after one would record its graphs again. The first step, and the first
of each pass, include the compile; their times are printed apart.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext

# the SD1.5 UNet (runwayml/stable-diffusion-v1-5 unet/config.json)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
# the same layout (blocks, resnets, transformers, the 192 LoRA targets) with tiny channels: per-op overhead only
PROXY_UNET = dict(SD15_UNET, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, norm_num_groups=8)
# operators that launch no kernel of their own: views, empty tensors, no-op conversions (a kernel below them, as in
# aten::_to_copy -> aten::copy_, is counted there)
_NO_KERNEL = frozenset(f"aten::{n}" for n in (
    "view", "_unsafe_view", "as_strided", "as_strided_", "t", "transpose", "permute", "expand", "expand_as",
    "unsqueeze", "squeeze", "select", "slice", "narrow", "split", "split_with_sizes", "chunk", "unbind", "reshape",
    "_reshape_alias", "view_as", "flatten", "unflatten", "detach", "detach_", "alias", "lift_fresh", "empty",
    "empty_strided", "empty_like", "resize_", "resize_as_", "contiguous", "to", "_to_copy", "type_as", "result_type",
    "broadcast_tensors", "resolve_conj", "resolve_neg", "conj", "_nnpack_available", "is_same_size", "dropout",
    "item", "matmul", "linear",
))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dim", type=int, default=16, help="LoRA rank")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 32 = 256 px images; 8 with --proxy)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--base_dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="dtype of the frozen UNet; auto = as the CLI loads it (the mixed precision dtype on a GPU, "
                             "else fp32)")
    parser.add_argument("--proxy", action="store_true",
                        help="the SD1.5 layout with tiny channels (32/32/64/64, context 32): per-operator overhead only, "
                             "a CPU stand-in for a launch-bound GPU step")
    parser.add_argument("--no_op_count", action="store_true", help="skip counting aten calls (torch.profiler)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 gives steadier CPU times on a busy machine)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet forward (the loop's torch_compile) and the bare / LoRA passes")
    parser.add_argument("--dynamo_backend", default="inductor", help="torch.compile backend with --compile")
    parser.add_argument("--compile_mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile mode with --compile (reduce-overhead = CUDA graphs on a GPU)")


class _BenchBackend:
    """The loop's Backend over a bare UNet with fixed text conditioning (the text encoder is not what is measured)."""

    def __init__(self, unet, cond, device):
        import torch

        self.unet, self.cond, self.device = unet, cond, device  # cond: float32, as a backend hands it to the UNet
        self.arch, self.prediction_type = "sd1", "epsilon"
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()

    def encode_images(self, pixels):
        raise RuntimeError("the benchmark trains on cached latents")

    def encode_prompts(self, texts, clip_skip=1, max_tokens=75, sizes=None, *, pad_chunks=False):
        from ..backends.base import Cond

        return Cond(self.cond[: len(texts)])

    def predict(self, noisy, t, cond):
        # as the real backends do: float32 inputs (autocast casts them), a float32 prediction
        return self.unet(noisy, t, encoder_hidden_states=cond.crossattn).sample.float()

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


def _under_multi_tensor_op(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(("aten::_foreach_", "aten::_fused_")):
            return True
        parent = parent.cpu_parent
    return False


def aten_events(prof) -> list:
    """The aten operator calls of a finished torch.profiler run, less those inside a multi-tensor (`_foreach_*`,
    `_fused_*`) operator: on a CPU those fall back to one call per tensor, on a GPU they are one kernel."""
    return [e for e in prof.events() if e.name.startswith("aten::") and not _under_multi_tensor_op(e)]


def count_ops(prof) -> tuple[int, int]:
    """(aten operator calls, of which kernel launches) in a finished torch.profiler run. Nested calls count as calls
    (aten::linear and the aten::mm inside it are two: both cost CPU time); a kernel launch is a call that is not a
    view / empty tensor / no-op conversion and has no such call below it, or a multi-tensor operator: roughly what
    launches one kernel on a GPU (a CPU build runs some operators differently, so this is an estimate)."""
    events = aten_events(prof)
    kernel: dict[int, bool] = {}
    inside: dict[int, bool] = {}

    def has_kernel_below(e) -> bool:
        key = id(e)
        if key not in inside:
            inside[key] = any(is_kernel(c) or has_kernel_below(c) for c in e.cpu_children if c.name.startswith("aten::"))
        return inside[key]

    def is_kernel(e) -> bool:
        key = id(e)
        if key not in kernel:
            if e.name.startswith(("aten::_foreach_", "aten::_fused_")):
                kernel[key] = True
            else:
                kernel[key] = e.name not in _NO_KERNEL and not has_kernel_below(e)
        return kernel[key]

    return len(events), sum(1 for e in events if is_kernel(e))


_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel",
             "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")


def count_launches(prof) -> tuple[int, int]:
    """(work the host hands the GPU: kernel launches, async copies / memsets, graph launches; of which CUDA graph
    launches) in a finished torch.profiler run with CUDA activity. (0, 0) on a CPU."""
    names = [e.name for e in prof.events() if e.name in _LAUNCHES or e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel"))]
    return len(names), sum(1 for n in names if n == "cudaGraphLaunch")


def _profiler(cuda: bool = False):
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def build_unet(args: argparse.Namespace, device):
    """The benchmark's UNet (random weights, frozen, eval) in the dtype `--base_dtype` asks for, and its layout."""
    import torch
    from diffusers import UNet2DConditionModel

    layout = PROXY_UNET if args.proxy else SD15_UNET
    unet = UNet2DConditionModel(**layout).to(device, base_dtype(args, device)).eval().requires_grad_(False)
    return unet, layout


def base_dtype(args: argparse.Namespace, device):
    """The frozen UNet's dtype: what the CLI loads (fp16/bf16 on a GPU under that mixed precision), or as asked."""
    import torch

    named = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if args.base_dtype != "auto":
        return named[args.base_dtype]
    if device.type == "cuda" and args.mixed_precision in ("fp16", "bf16"):
        return named[args.mixed_precision]
    return torch.float32


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..train.config import TrainConfig
    from ..train.events import Continued, Note, Paused, Started, StepEnd, TrainControl
    from ..train.loop import train
    from ..train.netglue import build_network, network_config

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    latent = args.latent or (8 if args.proxy else 32)
    torch.manual_seed(0)
    print(f"building an SD1.5-{'layout proxy' if args.proxy else 'sized'} UNet (random weights) on {device} ...", flush=True)
    unet, layout = build_unet(args, device)
    params = sum(p.numel() for p in unet.parameters())
    x = torch.randn(args.batch, 4, latent, latent, device=device)
    cond = torch.randn(args.batch, 77, layout["cross_attention_dim"], device=device)
    t = torch.full((args.batch,), 500, device=device)
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    count = not args.no_op_count

    def unet_call(x_in, t_in, cond_in):
        return unet(x_in, t_in, encoder_hidden_states=cond_in).sample

    run_unet = unet_call
    mark_step = lambda: None  # noqa: E731
    if args.compile:
        kwargs = {"backend": args.dynamo_backend}
        if args.compile_mode != "default" and args.dynamo_backend == "inductor":
            kwargs["mode"] = args.compile_mode
        run_unet = torch.compile(unet_call, **kwargs)
        if cuda and args.compile_mode in ("reduce-overhead", "max-autotune"):
            mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", mark_step)

    def bare_pass(net=None) -> tuple[float, float]:
        """The UNet alone (or with `net` attached, its weights cast as the eager loop casts them): forward, and
        backward to its input (there is no weight to train)."""
        x_in = x.clone().requires_grad_(True)
        sync()
        began, began_cpu = time.perf_counter(), time.process_time()
        mark_step()
        with torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False):
            with net.cast_weights(amp) if net is not None and not args.compile else nullcontext():
                out = run_unet(x_in, t, cond)
        torch.autograd.grad(out.float().mean(), x_in)
        sync()
        return time.perf_counter() - began, time.process_time() - began_cpu

    def lora_pass() -> tuple[float, float]:
        """The bare pass with a LoRA like the loop's attached: what the LoRA costs without the loop around it."""
        with lora_net.inject():
            return bare_pass(lora_net)

    def counted(fn) -> tuple[int, int, int, int]:
        with _profiler(cuda) as prof:
            fn()
        return (*count_ops(prof), *count_launches(prof))

    # Eager: training steps of the real loop, each followed by a pause (which hands the UNet back without LoRA) in
    # which one bare pass and one pass with an equal LoRA attached run: all three are measured in turns, under the
    # same conditions (other load on the machine, caches). One more step at the end runs under torch.profiler, with a
    # bare and a LoRA pass, to count operator calls. Compiled: the steps back to back, then the passes (see above).
    backend = _BenchBackend(unet, cond, device)
    control = TrainControl()
    bare, bare_cpu, steps, steps_cpu, lora, lora_cpu = [], [], [], [], [], []
    first: dict[str, float] = {}
    timed_end = args.warmup + args.steps
    ops: dict[str, tuple[int, int, int, int]] = {}
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = TrainConfig(output_dir=out_dir, output_name="bench", network_dim=args.dim, network_alpha=float(args.dim),
                          network_train_unet_only=True, max_train_steps=timed_end + int(count), seed=0,
                          mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                          train_batch_size=args.batch, train_data_dir=out_dir, torch_compile=args.compile,
                          dynamo_backend=args.dynamo_backend, dynamo_mode=args.compile_mode)
        lora_net = build_network(cfg, backend).to(device)

        def passes(step: int) -> None:
            """One bare and one LoRA pass after step `step` (under the profiler after the timed steps)."""
            if count and step > timed_end:
                ops["bare"], ops["lora"] = counted(bare_pass), counted(lora_pass)
                return
            (wall, cpu), (lwall, lcpu) = bare_pass(), lora_pass()
            if step == 1:
                first["bare"], first["lora"] = wall, lwall
            if step > args.warmup:
                bare.append(wall)
                bare_cpu.append(cpu)
                lora.append(lwall)
                lora_cpu.append(lcpu)

        prof = None
        clock = (0.0, 0.0)

        def start_step(done: int) -> None:
            """The next step begins (`done` steps so far): the profiler for the one after the timed steps, the clock."""
            nonlocal prof, clock
            if count and done == timed_end:
                prof = _profiler(cuda)
                prof.__enter__()
            sync()
            clock = (time.perf_counter(), time.process_time())

        for ev in train(cfg, backend, _LatentData(x, args.batch), control):
            if isinstance(ev, Note) and args.compile:
                print(f"note: {ev.message}", flush=True)
            elif isinstance(ev, (Started, Continued)):
                start_step(ev.start_step if isinstance(ev, Started) else ev.step)
            elif isinstance(ev, StepEnd):
                sync()
                wall, cpu = time.perf_counter() - clock[0], time.process_time() - clock[1]
                if prof is not None:
                    prof.__exit__(None, None, None)
                    ops["step"], prof = (*count_ops(prof), *count_launches(prof)), None
                elif ev.step == 1:
                    first["step"] = wall
                elif ev.step > args.warmup:
                    steps.append(wall)
                    steps_cpu.append(cpu)
                if args.compile:
                    start_step(ev.step)  # back to back: this step's end is the next one's start
                else:
                    control.pause()
            elif isinstance(ev, Paused):  # the UNet is handed back without the loop's LoRA
                passes(ev.step)
                control.unpause()
        if prof is not None:  # the run ended after the last step (compiled: the profiler was opened for one more)
            prof.__exit__(None, None, None)
        if args.compile:  # the run is over and the UNet handed back: as many passes as steps
            for step in range(1, timed_end + 1 + int(count)):
                passes(step)
    modules = sum(1 for name, _ in backend.lora_targets(network_config(cfg)))
    bare_s, step_s = statistics.median(bare), statistics.median(steps)
    bare_c, step_c = statistics.median(bare_cpu), statistics.median(steps_cpu)
    lora_s, lora_c = statistics.median(lora), statistics.median(lora_cpu)
    peak, kind = _peak(device)
    print(f"machine: {_machine(device)}")
    compiled = (f", torch.compile {args.dynamo_backend}" + (f" {args.compile_mode}" if args.compile_mode != "default" else "")
                if args.compile else "")
    print(f"UNet {params / 1e6:.1f}M params ({'proxy: SD1.5 layout, tiny channels' if args.proxy else 'SD1.5'}, "
          f"{str(base_dtype(args, device)).replace('torch.', '')}), LoRA dim {args.dim} on {modules} modules, "
          f"batch {args.batch}, latents {latent}x{latent}, mixed_precision {args.mixed_precision}, "
          f"gradient_checkpointing {args.gradient_checkpointing}{compiled}")
    if args.compile and first:
        print(f"first (compiling):     step {first.get('step', 0):.1f} s, bare pass {first.get('bare', 0):.1f} s, "
              f"LoRA pass {first.get('lora', 0):.1f} s")
    print(f"bare forward+backward: {bare_s:.3f} s (median of {len(bare)}; the UNet alone, no LoRA)")
    print(f"same with the LoRA:    {lora_s:.3f} s (forward, backward to the input)")
    print(f"training step:         {step_s:.3f} s (median of {len(steps)}), {1 / step_s:.2f} it/s")
    print(f"ratio step / bare:     {step_s / bare_s:.3f} wall clock, {step_c / bare_c:.3f} process CPU time "
          f"({bare_c:.3f} s vs {step_c:.3f} s; CPU time is less sensitive to other load on the machine)")
    print(f"of which the LoRA:     {lora_s / bare_s:.3f} wall, {lora_c / bare_c:.3f} CPU; the loop around it: "
          f"{step_s / lora_s:.3f} wall, {step_c / lora_c:.3f} CPU")
    if ops:
        (b, bk, bl, bg), (w, wk, wl, wg), (st, sk, sl, sg) = ops["bare"], ops["lora"], ops["step"]
        fused = " (compiled: inductor's own fused kernels are not aten calls)" if args.compile else ""
        print(f"aten calls per pass:   bare {b}, with the LoRA {w} (+{w - b}), step {st} (+{st - b}); "
              f"step / bare {st / b:.3f}{fused}")
        print(f"kernel-running leaves: bare {bk}, with the LoRA {wk} (+{wk - bk}), step {sk} (+{sk - bk}); "
              f"step / bare {sk / bk:.3f} (about one GPU launch each{'; aten only' if args.compile else ''})")
        if cuda:
            graphs = f"; CUDA graph launches among them: bare {bg}, LoRA {wg}, step {sg}" if bg or wg or sg else ""
            print(f"GPU launches (host):   bare {bl}, with the LoRA {wl} (+{wl - bl}), step {sl} (+{sl - bl}); "
                  f"step / bare {sl / bl:.3f} (kernels, async copies / memsets{graphs})" if bl else
                  "GPU launches (host):   none seen by the profiler")
    print(f"peak memory:           {peak:.2f} GiB ({kind})")
    return 0
