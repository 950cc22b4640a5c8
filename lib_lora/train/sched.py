"""Learning-rate schedules under sd-scripts' names, as LambdaLR multipliers of each group's base lr.

Our own small table because the webui stack has no diffusers. The formulas are the ones sd-scripts gets from
transformers / diffusers `get_scheduler` (linear decay to 0; half-cosine; hard-restart cosine with
`num_cycles`; polynomial to lr_end = 1e-7 with `power`), all after a linear warmup from 0. Being LambdaLR,
every schedule resumes from `state_dict()` once rebuilt from the same config.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import BadInput

POLY_LR_END = 1e-7  # transformers' get_polynomial_decay_schedule_with_warmup default


def warmup_steps(value: int | float, total_steps: int) -> int:
    """`lr_warmup_steps` as a count: a float below 1 is a fraction of all steps (sd-scripts' rule)."""
    if isinstance(value, float) and not value.is_integer():
        return int(value * total_steps)
    return int(value)


def _with_warmup(warmup: int, after: Callable[[int], float]) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return after(step)

    return factor


def _progress(step: int, warmup: int, total: int) -> float:
    return (step - warmup) / max(1, total - warmup)


def lr_factor(name: str, warmup: int, total: int, num_cycles: int = 1, power: float = 1.0, base_lr: float = 1.0) -> Callable[[int], float]:
    """The multiplier of the base lr at optimizer step `step` (0-based: the factor used for the first step)."""
    if name == "constant":
        return lambda step: 1.0
    if name == "constant_with_warmup":
        return _with_warmup(warmup, lambda step: 1.0)
    if name == "linear":
        return _with_warmup(warmup, lambda step: max(0.0, (total - step) / max(1, total - warmup)))
    if name == "cosine":
        return _with_warmup(warmup, lambda step: max(0.0, 0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup, total)))))
    if name == "cosine_with_restarts":

        def restarts(step: int) -> float:
            p = _progress(step, warmup, total)
            if p >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * p) % 1.0))))

        return _with_warmup(warmup, restarts)
    if name == "polynomial":
        if not base_lr > POLY_LR_END:
            raise BadInput(f"polynomial schedule: learning rate {base_lr} must be above {POLY_LR_END}")

        def poly(step: int) -> float:
            if step > total:
                return POLY_LR_END / base_lr
            remaining = 1 - _progress(step, warmup, total)
            return ((base_lr - POLY_LR_END) * remaining**power + POLY_LR_END) / base_lr

        return _with_warmup(warmup, poly)
    raise BadInput(f"lr_scheduler {name!r} is not one of constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, adafactor")


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup: int | float = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    initial_lr: float | None = None,
) -> LambdaLR:
    """A LambdaLR for `name`; `adafactor` is transformers' AdafactorSchedule (Adafactor computes its own lr and
    the schedule only reports it), which needs the learning rate the user gave as `initial_lr`."""
    if name == "adafactor":
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise BadInput("lr_scheduler adafactor works with optimizer_type Adafactor only")
        return AdafactorSchedule(optimizer, initial_lr or 0.0)
    n_warm = warmup_steps(warmup, total_steps)
    base = float(optimizer.defaults.get("lr") or optimizer.param_groups[0]["lr"])
    factor = lr_factor(name, n_warm, total_steps, num_cycles, power, base)
    return LambdaLR(optimizer, factor)
