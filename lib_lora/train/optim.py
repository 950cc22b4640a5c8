"""Optimizers under sd-scripts' names, and their `optimizer_args`.

AdamW is torch's (fused kernel when every parameter is on CUDA: one launch instead of one per LoRA tensor,
which matters with ~1,000 small tensors); AdamW8bit is bitsandbytes' (CUDA only); Adafactor is transformers'
with sd-scripts' handling of `relative_step`; Prodigy and Lion come from prodigyopt and lion-pytorch.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from ..errors import BadInput
from .config import TrainConfig
from .sched import build_scheduler


def parse_kv_args(items: Iterable[str], what: str = "optimizer_args") -> dict[str, Any]:
    """["weight_decay=0.01", "betas=0.9,0.99", "decouple=True"] -> {"weight_decay": 0.01, "betas": (0.9, 0.99),
    "decouple": True}. Values are Python literals as sd-scripts reads them; true/false in any case are booleans;
    anything else stays a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise BadInput(f"{what}: {item!r} is not 'key=value'")
        if raw.lower() in ("true", "false"):
            value: Any = raw.lower() == "true"
        elif raw.lower() in ("none", "null"):
            value = None
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        out[key] = value
    return out


@dataclass
class OptimizerSetup:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    name: str  # for `ss_optimizer`: "torch.optim.adamw.AdamW(weight_decay=0.01)"


def _needs(package: str, optimizer: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise BadInput(f"optimizer_type {optimizer} needs the '{package}' package (pip install {package.replace('_', '-')})") from None


def _all_cuda(groups: list[dict]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)


def _make(cls, groups: list[dict], name: str, **kwargs) -> torch.optim.Optimizer:
    try:
        return cls(groups, **kwargs)
    except TypeError as exc:
        raise BadInput(f"optimizer_args do not fit {name}: {exc}") from None
    except ValueError as exc:
        raise BadInput(f"{name}: {exc}") from None


def build_optimizer(cfg: TrainConfig, groups: list[dict], total_steps: int) -> OptimizerSetup:
    """Optimizer and lr schedule for the parameter groups (each {'params': [...], 'lr': float})."""
    name = cfg.optimizer_type
    kwargs = parse_kv_args(cfg.optimizer_args)
    lr = cfg.learning_rate
    groups = [dict(g) for g in groups if g["params"]]
    if not groups:
        raise BadInput("nothing to train: no LoRA parameters (check network_train_unet_only / text_encoder_only and the learning rates)")
    scheduler_name, initial_lr = cfg.lr_scheduler, None

    if name == "AdamW":
        if "fused" not in kwargs and "foreach" not in kwargs and _all_cuda(groups):
            kwargs["fused"] = True
        optimizer = _make(torch.optim.AdamW, groups, name, lr=lr, **kwargs)
    elif name == "AdamW8bit":
        if not torch.cuda.is_available():
            raise BadInput("optimizer_type AdamW8bit needs an NVIDIA GPU (bitsandbytes runs on CUDA only); use AdamW")
        bnb = _needs("bitsandbytes", name)
        optimizer = _make(bnb.optim.AdamW8bit, groups, name, lr=lr, **kwargs)
    elif name == "Adafactor":
        from transformers.optimization import Adafactor

        kwargs.setdefault("relative_step", True)
        if kwargs.get("warmup_init") and not kwargs["relative_step"]:
            kwargs["relative_step"] = True  # transformers: warmup_init only works with relative steps
        if kwargs["relative_step"]:
            # Adafactor finds its own step size; the given lr only seeds the adafactor schedule (sd-scripts' rule)
            for g in groups:
                g.pop("lr", None)
            scheduler_name, initial_lr = "adafactor", lr
            optimizer = _make(Adafactor, groups, name, lr=None, **kwargs)
        else:
            if cfg.lr_scheduler == "adafactor":
                raise BadInput("lr_scheduler adafactor needs Adafactor's relative_step=True (remove relative_step=False)")
            optimizer = _make(Adafactor, groups, name, lr=lr, **kwargs)
    elif name == "Prodigy":
        prodigyopt = _needs("prodigyopt", name)
        optimizer = _make(prodigyopt.Prodigy, groups, name, lr=lr, **kwargs)
    elif name == "Lion":
        lion = _needs("lion_pytorch", name)
        optimizer = _make(lion.Lion, groups, name, lr=lr, **kwargs)
    else:
        raise BadInput(f"optimizer_type {name!r} is not one of AdamW, AdamW8bit, Adafactor, Prodigy, Lion")

    scheduler = build_scheduler(
        scheduler_name, optimizer, total_steps, cfg.lr_warmup_steps, cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power,
        initial_lr=initial_lr,
    )
    cls = type(optimizer)
    args = ",".join(f"{k}={v}" for k, v in parse_kv_args(cfg.optimizer_args).items())
    return OptimizerSetup(optimizer, scheduler, f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else ""))


def current_lrs(setup: OptimizerSetup) -> list[float]:
    """The lr of each group as the schedule reports it (Adafactor's computed step size, Prodigy's d * lr)."""
    lrs = [float(x) for x in setup.scheduler.get_last_lr()]
    opt = setup.optimizer
    if type(opt).__name__ == "Prodigy":
        return [float(g.get("d", 1.0)) * float(g["lr"]) for g in opt.param_groups]
    if type(opt).__name__ == "Adafactor" and opt.param_groups[0].get("relative_step"):
        got = []
        for g in opt.param_groups:
            state = opt.state.get(g["params"][0], {})
            got.append(float(opt._get_lr(g, state)) if state else 0.0)
        return got
    return lrs
