"""Optimizers under sd-scripts' names, and their `optimizer_args`.

AdamW is torch's (the fused kernel when the torch build has it for the device: one launch instead of one per
LoRA tensor, which matters with ~1,000 small tensors); AdamW8bit and the other 8-bit / paged names are bitsandbytes'
(CUDA only); Adafactor is transformers' with sd-scripts' handling of `relative_step`; SGDNesterov is torch's SGD with
Nesterov momentum (0.9 unless given); Prodigy, Lion and D-Adaptation come from prodigyopt, lion-pytorch and
dadaptation. Any other optimizer by its class path (`torch.optim.RAdam`), with optimizer_args as its keywords.
Which names exist: optim_names.py (no torch there).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from ..errors import BadInput
from .config import TrainConfig
from .optim_names import NAMED_OPTIMIZERS, canonical_optimizer, cuda_message, is_class_path, needs_cuda, pip_hint, unknown_message
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
        raise BadInput(f"optimizer_type {optimizer} needs the '{package}' package ({pip_hint(package)})") from None


def resolve_optimizer_class(name: str) -> type:
    """The class behind a class path (`torch.optim.RAdam`, `prodigyopt.Prodigy`) or a bare torch.optim name (`NAdam`),
    as sd-scripts resolves names it does not know. BadInput with one line when it is missing or not an optimizer."""
    import importlib

    if is_class_path(name):
        module_name, _, class_name = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            top = module_name.split(".")[0]
            hint = f" ({pip_hint(top)}?)" if getattr(exc, "name", None) == top else ""
            raise BadInput(f"optimizer_type {name}: cannot import {module_name}: {str(exc).splitlines()[0]}{hint}") from None
        except Exception as exc:  # a module that fails while importing
            raise BadInput(f"optimizer_type {name}: importing {module_name} failed: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        if not hasattr(module, class_name):
            raise BadInput(f"optimizer_type {name}: {module_name} has no {class_name}")
        cls = getattr(module, class_name)
    else:
        cls = getattr(torch.optim, name, None)
        if cls is None:
            raise BadInput(unknown_message(name))
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise BadInput(f"optimizer_type {name} is not a torch.optim.Optimizer subclass")
    return cls


_BNB_CLASSES = {"AdamW8bit": "AdamW8bit", "SGDNesterov8bit": "SGD8bit", "Lion8bit": "Lion8bit", "PagedAdamW": "PagedAdamW",
                "PagedAdamW8bit": "PagedAdamW8bit", "PagedAdamW32bit": "PagedAdamW32bit", "PagedLion8bit": "PagedLion8bit",
                "AdEMAMix8bit": "AdEMAMix8bit", "PagedAdEMAMix8bit": "PagedAdEMAMix8bit"}
# sd-scripts' DAdaptation = the experimental DAdaptAdamPreprint
_DADAPT_CLASSES = {"DAdaptation": "experimental.DAdaptAdamPreprint", "DAdaptAdamPreprint": "experimental.DAdaptAdamPreprint",
                   "DAdaptAdanIP": "experimental.DAdaptAdanIP", "DAdaptAdam": "DAdaptAdam", "DAdaptAdaGrad": "DAdaptAdaGrad",
                   "DAdaptAdan": "DAdaptAdan", "DAdaptLion": "DAdaptLion", "DAdaptSGD": "DAdaptSGD"}


def _named_class(name: str):
    """The class of one of sd-scripts' names, its package imported (BadInput naming pip when it is missing)."""
    import importlib

    if needs_cuda(name) and not torch.cuda.is_available():
        raise BadInput(cuda_message(name))
    if name in _BNB_CLASSES:
        bnb = _needs("bitsandbytes", name)
        cls = getattr(bnb.optim, _BNB_CLASSES[name], None)
        if cls is None:
            raise BadInput(f"optimizer_type {name}: this bitsandbytes has no {_BNB_CLASSES[name]} (pip install -U bitsandbytes)")
        return cls
    if name in _DADAPT_CLASSES:
        _needs("dadaptation", name)
        where, _, cls_name = ("dadaptation." + _DADAPT_CLASSES[name]).rpartition(".")
        return getattr(importlib.import_module(where), cls_name)
    if name == "Prodigy":
        return _needs("prodigyopt", name).Prodigy
    if name == "Lion":
        return _needs("lion_pytorch", name).Lion
    return None


def _fusable(groups: list[dict]) -> bool:
    """Every parameter a float tensor on one CUDA or CPU device (torch's fused AdamW kernel; CPU since torch 2.4)."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and len({p.device for p in params}) == 1 and all(
        p.device.type in ("cuda", "cpu") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)


def _make(cls, groups: list[dict], name: str, **kwargs) -> torch.optim.Optimizer:
    try:
        return cls(groups, **kwargs)
    except TypeError as exc:
        raise BadInput(f"optimizer_args do not fit {name}: {exc}") from None
    except ValueError as exc:
        raise BadInput(f"{name}: {exc}") from None


def build_optimizer(cfg: TrainConfig, groups: list[dict], total_steps: int) -> OptimizerSetup:
    """Optimizer and lr schedule for the parameter groups (each {'params': [...], 'lr': float})."""
    name = canonical_optimizer(cfg.optimizer_type)
    kwargs = parse_kv_args(cfg.optimizer_args)
    lr = cfg.learning_rate
    groups = [dict(g) for g in groups if g["params"]]
    if not groups:
        raise BadInput("nothing to train: no LoRA parameters (check network_train_unet_only / text_encoder_only and the learning rates)")
    scheduler_name, initial_lr = cfg.lr_scheduler, None

    if name == "AdamW":
        optimizer = None
        if "fused" not in kwargs and "foreach" not in kwargs and _fusable(groups):
            try:  # one kernel for all ~1,000 LoRA tensors: 3-5x faster than foreach on a CPU, more on a GPU
                optimizer = torch.optim.AdamW(groups, lr=lr, fused=True, **kwargs)
            except (RuntimeError, ValueError, TypeError):
                optimizer = None  # an older torch without this kernel for the device
        if optimizer is None:
            optimizer = _make(torch.optim.AdamW, groups, name, lr=lr, **kwargs)
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
    elif name in ("SGDNesterov", "SGDNesterov8bit"):
        kwargs.setdefault("momentum", 0.9)  # Nesterov needs momentum; sd-scripts' default
        kwargs["nesterov"] = True
        cls = torch.optim.SGD if name == "SGDNesterov" else _named_class(name)
        optimizer = _make(cls, groups, name, lr=lr, **kwargs)
    elif name in NAMED_OPTIMIZERS:
        optimizer = _make(_named_class(name), groups, name, lr=lr, **kwargs)
    else:  # a class path or a bare torch.optim name
        if needs_cuda(name) and not torch.cuda.is_available():
            raise BadInput(cuda_message(name))
        optimizer = _make(resolve_optimizer_class(name), groups, name, lr=lr, **kwargs)

    scheduler = build_scheduler(
        scheduler_name, optimizer, total_steps, cfg.lr_warmup_steps, cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power,
        initial_lr=initial_lr,
    )
    cls = type(optimizer)
    args = ",".join(f"{k}={v}" for k, v in parse_kv_args(cfg.optimizer_args).items())
    return OptimizerSetup(optimizer, scheduler, f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else ""))


def make_grad_scaler(device_type: str):
    """The fp16 loss scaler for `device_type`, or None where this torch has none for it. `torch.amp.GradScaler`
    only exists since torch 2.3; the webui ships torch 2.1, which has `torch.cuda.amp.GradScaler` (CUDA) and no CPU
    scaler (its CPU autocast runs bf16 only, so fp16 there computes in fp32 and needs no scaling)."""
    scaler_cls = getattr(torch.amp, "GradScaler", None)
    if scaler_cls is not None:
        return scaler_cls(device_type)
    if device_type == "cuda":
        return torch.cuda.amp.GradScaler()
    return None


def current_lrs(setup: OptimizerSetup) -> list[float]:
    """The lr of each group as the schedule reports it (Adafactor's computed step size, Prodigy's d * lr)."""
    lrs = [float(x) for x in setup.scheduler.get_last_lr()]
    opt = setup.optimizer
    if type(opt).__name__ == "Prodigy" or type(opt).__name__.startswith("DAdapt"):
        return [float(g.get("d", 1.0)) * float(g["lr"]) for g in opt.param_groups]
    if type(opt).__name__ == "Adafactor" and opt.param_groups[0].get("relative_step"):
        got = []
        for g in opt.param_groups:
            state = opt.state.get(g["params"][0], {})
            got.append(float(opt._get_lr(g, state)) if state else 0.0)
        return got
    return lrs
