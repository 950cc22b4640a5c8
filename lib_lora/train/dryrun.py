"""`--dry_run`: the dataset summary, the step plan, and time / memory measured on a few real steps.

The steps run on a throw-away network (the run's `finally` restores the model as after any run) and nothing is
written: no LoRA, no state, no log, no latent cache on disk.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from .events import DryRun

MEASURED_STEPS = 3


def _rss_peak_bytes() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def measure(run, steps: int = MEASURED_STEPS) -> DryRun:
    """Run up to `steps` optimizer steps of epoch 1 and report the DryRun event."""
    cfg = run.cfg
    lines = list(run.data.summary_lines()) if hasattr(run.data, "summary_lines") else []
    lines.append(run.plan.describe(cfg))
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    specs = run.dist.shard(list(run.data.epoch_batches(1)))
    accum = cfg.gradient_accumulation_steps
    chunks = [specs[i : i + accum] for i in range(0, len(specs), accum)][: max(1, steps)]
    times = []
    for chunk in chunks:
        began = time.perf_counter()
        run._optimizer_step(chunk)
        if cuda:
            torch.cuda.synchronize(run.device)
        times.append(time.perf_counter() - began)
    measured = times[1:] if len(times) > 1 else times
    per_step = statistics.median(measured)
    peak = torch.cuda.max_memory_allocated(run.device) if cuda else _rss_peak_bytes()
    est = per_step * run.plan.total_steps
    lines.append(f"measured {len(times)} steps: {per_step:.3f} s/step -> about {est / 60:.1f} min for {run.plan.total_steps} steps")
    if getattr(run, "forward", None) is not None and times:
        lines.append(f"the first step took {times[0]:.1f} s: it includes torch.compile (torch_compile), once per run")
    lines.append(f"peak memory: {peak / 2**30:.2f} GiB ({'GPU' if cuda else 'process RSS'})")
    return DryRun(tuple(lines), run.plan.total_steps, len(times), per_step, est, int(peak), "cuda" if cuda else "process RSS")
