"""Every optimizer steps and lowers a loss; every schedule gives its hand-computed values and resumes."""

from __future__ import annotations

import math

import pytest
import torch

from lib_lora.errors import BadInput
from lib_lora.train.config import TrainConfig
from lib_lora.train.optim import build_optimizer, current_lrs, make_grad_scaler, parse_kv_args
from lib_lora.train.sched import build_scheduler, warmup_steps


def _lr_at(name: str, step: int, total=100, warmup=10, base=1.0, **kw) -> float:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = build_scheduler(name, opt, total, warmup, **kw)
    for _ in range(step):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "name, step, expected",
    [
        ("constant", 0, 1.0), ("constant", 77, 1.0),
        ("constant_with_warmup", 0, 0.0), ("constant_with_warmup", 5, 0.5), ("constant_with_warmup", 60, 1.0),
        ("linear", 5, 0.5), ("linear", 10, 1.0), ("linear", 55, 0.5), ("linear", 100, 0.0),
        ("cosine", 5, 0.5), ("cosine", 10, 1.0), ("cosine", 55, 0.5), ("cosine", 100, 0.0),
        ("cosine", 40, 0.5 * (1 + math.cos(math.pi * 30 / 90))),
        ("polynomial", 55, 0.5 * (1 - 1e-7) + 1e-7),
    ],
)
def test_schedule_values(name, step, expected):
    assert _lr_at(name, step) == pytest.approx(expected, abs=1e-9)


def test_cosine_with_restarts_and_polynomial_power():
    kw = dict(total=100, warmup=0, num_cycles=2)
    assert _lr_at("cosine_with_restarts", 25, **kw) == pytest.approx(0.5)
    assert _lr_at("cosine_with_restarts", 49, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.98)))
    assert _lr_at("cosine_with_restarts", 50, **kw) == pytest.approx(1.0)  # the restart
    assert _lr_at("cosine_with_restarts", 75, **kw) == pytest.approx(0.5)
    assert _lr_at("cosine_with_restarts", 100, **kw) == 0.0
    assert _lr_at("polynomial", 50, total=100, warmup=0, power=2.0, base=0.01) == pytest.approx((0.01 - 1e-7) * 0.25 + 1e-7)
    assert _lr_at("polynomial", 100, total=100, warmup=0, power=2.0, base=0.01) == pytest.approx(1e-7)


def test_warmup_count_or_ratio():
    assert warmup_steps(0.1, 200) == 20 and warmup_steps(30, 200) == 30 and warmup_steps(0, 200) == 0
    assert _lr_at("constant_with_warmup", 10, total=200, warmup=0.1) == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_schedule_resumes_from_state_dict(name):
    def make():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([{"params": [p], "lr": 0.5}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}], lr=0.5)
        return opt, build_scheduler(name, opt, 50, 5, num_cycles=3, power=1.5)

    opt, sched = make()
    seen = []
    for _ in range(40):
        opt.step()
        sched.step()
        seen.append([g["lr"] for g in opt.param_groups])
    opt2, sched2 = make()
    for _ in range(20):
        opt2.step()
        sched2.step()
    state = sched2.state_dict()
    opt3, sched3 = make()
    sched3.load_state_dict(state)
    resumed = []
    for _ in range(20):
        opt3.step()
        sched3.step()
        resumed.append([g["lr"] for g in opt3.param_groups])
    assert resumed == seen[20:]


def test_parse_kv_args_types():
    got = parse_kv_args(["weight_decay=0.01", "betas=0.9,0.99", "decouple=True", "use_bias_correction=false", "name=abc", "d0=1e-6"])
    assert got == {"weight_decay": 0.01, "betas": (0.9, 0.99), "decouple": True, "use_bias_correction": False, "name": "abc", "d0": 1e-6}
    with pytest.raises(BadInput, match="key=value"):
        parse_kv_args(["weight_decay"])


def _regression_groups(seed=0):
    torch.manual_seed(seed)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
    return a, b, [{"params": list(a.parameters()), "lr": None}, {"params": list(b.parameters()), "lr": None}]


def _train(cfg: TrainConfig, steps=60, lrs=(None, None)):
    a, b, groups = _regression_groups()
    for g, lr in zip(groups, lrs):
        g["lr"] = lr if lr is not None else cfg.learning_rate
    setup = build_optimizer(cfg, groups, total_steps=2 * steps)
    torch.manual_seed(1)
    x, y = torch.randn(64, 8), torch.randn(64, 4)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(b(torch.tanh(a(x))), y)
        loss.backward()
        setup.optimizer.step()
        setup.scheduler.step()
        setup.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return setup, losses


@pytest.mark.parametrize(
    "cfg",
    [
        TrainConfig(optimizer_type="AdamW", learning_rate=1e-2),
        TrainConfig(optimizer_type="AdamW", learning_rate=1e-2, optimizer_args=("weight_decay=0.1", "betas=0.9,0.99"), lr_scheduler="cosine"),
        TrainConfig(optimizer_type="Adafactor", learning_rate=1e-2),
        TrainConfig(optimizer_type="Adafactor", learning_rate=1e-2, optimizer_args=("relative_step=False", "scale_parameter=False"),
                    lr_scheduler="constant_with_warmup", lr_warmup_steps=2),
        TrainConfig(optimizer_type="Prodigy", learning_rate=1.0, optimizer_args=("d0=1e-4", "decouple=True")),
        TrainConfig(optimizer_type="Lion", learning_rate=3e-3, lr_scheduler="linear"),
    ],
    ids=["adamw", "adamw-args", "adafactor", "adafactor-manual-lr", "prodigy", "lion"],
)
def test_every_optimizer_steps_and_lowers_the_loss(cfg):
    if cfg.optimizer_type == "Prodigy":
        pytest.importorskip("prodigyopt")
    if cfg.optimizer_type == "Lion":
        pytest.importorskip("lion_pytorch")
    setup, losses = _train(cfg)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(lr > 0 for lr in current_lrs(setup))
    assert type(setup.optimizer).__name__ in setup.name


def test_adafactor_relative_step_uses_its_schedule():
    setup, _ = _train(TrainConfig(optimizer_type="Adafactor", learning_rate=1e-3, lr_scheduler="cosine"))
    assert type(setup.scheduler).__name__ == "AdafactorSchedule"
    computed = current_lrs(setup)  # Adafactor's own relative step size, not the lr we seeded the schedule with
    assert all(0 < lr != 1e-3 for lr in computed)


def test_group_learning_rates_are_kept():
    setup, _ = _train(TrainConfig(optimizer_type="AdamW", learning_rate=1e-3), steps=1, lrs=(1e-3, 5e-5))
    assert [g["lr"] for g in setup.optimizer.param_groups] == [1e-3, 5e-5]
    assert "torch.optim" in setup.name


def test_adamw8bit_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BadInput, match="NVIDIA GPU"):
        _train(TrainConfig(optimizer_type="AdamW8bit"), steps=1)


def test_bad_optimizer_args_name_the_optimizer():
    with pytest.raises(BadInput, match="AdamW"):
        _train(TrainConfig(optimizer_type="AdamW", optimizer_args=("no_such_option=1",)), steps=1)
    with pytest.raises(BadInput, match="adafactor"):
        _train(TrainConfig(optimizer_type="AdamW", lr_scheduler="adafactor"), steps=1)
    with pytest.raises(BadInput, match="nothing to train"):
        build_optimizer(TrainConfig(), [{"params": [], "lr": 1e-4}], 10)


def test_adamw_uses_the_fused_kernel_when_torch_has_it():
    setup, losses = _train(TrainConfig(optimizer_type="AdamW", learning_rate=1e-2), steps=5)
    assert setup.optimizer.defaults.get("fused") is True
    assert losses[-1] < losses[0]
    explicit, _ = _train(TrainConfig(optimizer_type="AdamW", learning_rate=1e-2, optimizer_args=("foreach=True",)), steps=1)
    assert not explicit.optimizer.defaults.get("fused")


def test_grad_scaler_on_this_torch_and_on_the_webuis_torch_2_1(monkeypatch):
    assert type(make_grad_scaler("cpu")).__name__ == "GradScaler"
    # torch 2.1 (the webui's) has no torch.amp.GradScaler: CUDA gets torch.cuda.amp's, the CPU runs without one
    monkeypatch.delattr(torch.amp, "GradScaler", raising=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch warns that torch.cuda.amp.GradScaler is deprecated
        cuda = make_grad_scaler("cuda")
    assert isinstance(cuda, torch.cuda.amp.GradScaler)
    assert make_grad_scaler("cpu") is None
