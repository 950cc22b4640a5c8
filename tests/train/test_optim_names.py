"""sd-scripts' other optimizer names: SGDNesterov, the bitsandbytes 8-bit / paged family (CUDA only), D-Adaptation
(when its package is installed), and any optimizer class by its dotted path with optimizer_args as keywords."""

from __future__ import annotations

import sys

import pytest
import torch

from lib_lora.errors import BadInput
from lib_lora.train.config import OPTIMIZERS, TrainConfig
from lib_lora.train.config_io import coerce
from lib_lora.train.optim import build_optimizer, current_lrs
from lib_lora.train.validate import errors_of, validate

from .test_optim_sched import _train

BNB_NAMES = ["SGDNesterov8bit", "Lion8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "PagedLion8bit"]


def _good(tmp_path, **kw) -> TrainConfig:
    data = tmp_path / "img" / "2_cat"
    data.mkdir(parents=True, exist_ok=True)
    (data / "a.png").write_bytes(b"not read by validate")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    return TrainConfig(pretrained_model_name_or_path=str(model), train_data_dir=str(tmp_path / "img"),
                       output_dir=str(tmp_path / "out"), **kw)


def _opt_problems(cfg: TrainConfig) -> list:
    return [p for p in validate(cfg) if p.field in ("optimizer_type", "learning_rate", "optimizer_args")]


def test_sgd_nesterov_is_torch_sgd_with_nesterov_momentum():
    setup, losses = _train(TrainConfig(optimizer_type="SGDNesterov", learning_rate=5e-2))
    assert type(setup.optimizer) is torch.optim.SGD
    assert setup.optimizer.defaults["nesterov"] is True and setup.optimizer.defaults["momentum"] == 0.9
    assert losses[-1] < 0.7 * losses[0]
    given, _ = _train(TrainConfig(optimizer_type="SGDNesterov", learning_rate=1e-2, optimizer_args=("momentum=0.5", "weight_decay=0.01")), steps=1)
    assert given.optimizer.defaults["momentum"] == 0.5 and given.optimizer.defaults["weight_decay"] == 0.01
    assert given.name == "torch.optim.sgd.SGD(momentum=0.5,weight_decay=0.01)"


def test_names_are_matched_in_any_letter_case():
    assert coerce("optimizer_type", "sgdnesterov") == "SGDNesterov"
    assert coerce("optimizer_type", "pagedadamw8bit") == "PagedAdamW8bit"
    assert coerce("optimizer_type", "dadaptadam") == "DAdaptAdam"
    assert coerce("optimizer_type", "torch.optim.RAdam") == "torch.optim.RAdam"  # a class path keeps its case


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", BNB_NAMES)
def test_bitsandbytes_names_need_an_nvidia_gpu(tmp_path, name):
    with pytest.raises(BadInput, match="needs an NVIDIA GPU") as info:
        _train(TrainConfig(optimizer_type=name), steps=1)
    assert "\n" not in str(info.value) and name in str(info.value)
    probs = _opt_problems(_good(tmp_path, optimizer_type=name))
    assert [p.field for p in errors_of(probs)] == ["optimizer_type"] and "NVIDIA GPU" in probs[0].message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bitsandbytes_class_path_needs_an_nvidia_gpu_too():
    with pytest.raises(BadInput, match="NVIDIA GPU"):
        _train(TrainConfig(optimizer_type="bitsandbytes.optim.PagedAdamW8bit"), steps=1)


def test_a_class_path_builds_that_class_with_optimizer_args_as_keywords(tmp_path):
    cfg = TrainConfig(optimizer_type="torch.optim.RAdam", learning_rate=2e-2, optimizer_args=("weight_decay=0.01", "betas=0.8,0.99"))
    setup, losses = _train(cfg)
    assert type(setup.optimizer) is torch.optim.RAdam
    assert setup.optimizer.defaults["weight_decay"] == 0.01 and setup.optimizer.defaults["betas"] == (0.8, 0.99)
    assert [g["lr"] for g in setup.optimizer.param_groups] == [2e-2, 2e-2]
    assert losses[-1] < 0.9 * losses[0]
    assert setup.name == "torch.optim.radam.RAdam(weight_decay=0.01,betas=(0.8, 0.99))"
    assert not _opt_problems(_good(tmp_path, optimizer_type="torch.optim.RAdam"))
    # a bare torch.optim class name works as in sd-scripts
    bare, _ = _train(TrainConfig(optimizer_type="NAdam", learning_rate=1e-2), steps=1)
    assert type(bare.optimizer) is torch.optim.NAdam


def test_prodigy_by_class_path():
    pytest.importorskip("prodigyopt")
    setup, _ = _train(TrainConfig(optimizer_type="prodigyopt.Prodigy", learning_rate=1.0, optimizer_args=("d0=1e-4",)), steps=3)
    assert type(setup.optimizer).__name__ == "Prodigy" and setup.optimizer.defaults["d0"] == 1e-4
    assert current_lrs(setup)[0] == pytest.approx(setup.optimizer.param_groups[0]["d"] * 1.0)


@pytest.mark.parametrize("name, words", [
    ("no_such_module_xyz.Opt", "no_such_module_xyz"),
    ("torch.optim.NoSuchOptimizer", "has no NoSuchOptimizer"),
    ("torch.nn.Linear", "not a torch.optim.Optimizer"),
    ("torch.optim.lr_scheduler", "not a torch.optim.Optimizer"),
    ("NoSuchName", "SGDNesterov"),  # an unknown bare name lists the names we know
    ("AdamWScheduleFree", "schedule-free optimizers are not supported"),
])
def test_a_bad_class_path_is_one_clear_line(name, words):
    with pytest.raises(BadInput) as info:
        _train(TrainConfig(optimizer_type=name), steps=1)
    msg = str(info.value)
    assert words in msg and name in msg and "\n" not in msg


def test_validate_refuses_a_class_path_whose_package_is_missing(tmp_path):
    probs = _opt_problems(_good(tmp_path, optimizer_type="no_such_module_xyz.Opt"))
    assert len(errors_of(probs)) == 1 and "no_such_module_xyz" in probs[0].message
    probs = _opt_problems(_good(tmp_path, optimizer_type="NoSuchName"))
    assert len(errors_of(probs)) == 1


def test_dadaptation_trains_when_installed():
    pytest.importorskip("dadaptation")
    for name, cls in [("DAdaptAdam", "DAdaptAdam"), ("DAdaptation", "DAdaptAdamPreprint"), ("DAdaptSGD", "DAdaptSGD"),
                      ("DAdaptLion", "DAdaptLion"), ("DAdaptAdaGrad", "DAdaptAdaGrad"), ("DAdaptAdan", "DAdaptAdan"),
                      ("DAdaptAdamPreprint", "DAdaptAdamPreprint"), ("DAdaptAdanIP", "DAdaptAdanIP")]:
        setup, losses = _train(TrainConfig(optimizer_type=name, learning_rate=1.0), steps=20)
        assert type(setup.optimizer).__name__ == cls, name
        assert all(torch.isfinite(torch.tensor(losses))), name
        # the reported rate is D-Adaptation's d * lr, as for Prodigy
        assert current_lrs(setup)[0] == pytest.approx(float(setup.optimizer.param_groups[0]["d"]) * 1.0), name
    setup, losses = _train(TrainConfig(optimizer_type="DAdaptAdam", learning_rate=1.0), steps=60)
    assert losses[-1] < 0.7 * losses[0]


def test_dadaptation_missing_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dadaptation", None)  # `import dadaptation` now fails as if not installed
    with pytest.raises(BadInput, match="pip install dadaptation"):
        _train(TrainConfig(optimizer_type="DAdaptAdam", learning_rate=1.0), steps=1)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "dadaptation" else real(n, *a))
    probs = errors_of(_opt_problems(_good(tmp_path, optimizer_type="DAdaptLion", learning_rate=1.0)))
    assert len(probs) == 1 and "pip install dadaptation" in probs[0].message


@pytest.mark.parametrize("name", ["Prodigy", "DAdaptAdam", "DAdaptation"])
def test_adaptive_optimizers_warn_about_a_small_learning_rate(tmp_path, name):
    low = [p for p in _opt_problems(_good(tmp_path, optimizer_type=name, learning_rate=1e-4)) if p.field == "learning_rate"]
    assert len(low) == 1 and low[0].severity == "warning" and "1.0" in low[0].message
    low_unet = [p for p in _opt_problems(_good(tmp_path, optimizer_type=name, learning_rate=1.0, unet_lr=1e-4))
                if p.field == "learning_rate"]
    assert len(low_unet) == 1
    assert not [p for p in _opt_problems(_good(tmp_path, optimizer_type=name, learning_rate=1.0)) if p.field == "learning_rate"]
    assert not [p for p in _opt_problems(_good(tmp_path, optimizer_type="AdamW", learning_rate=1e-4)) if p.field == "learning_rate"]


def test_the_tabs_optimizer_choices_all_validate_and_build(tmp_path):
    from lib_lora.ui import fields

    listed = fields.choices(fields.BY_NAME["optimizer_type"])
    assert listed == list(OPTIMIZERS)
    for name in listed:
        probs = errors_of(_opt_problems(_good(tmp_path, optimizer_type=name, learning_rate=1.0)))
        # only a missing GPU / package may stop one of them, never an unknown name
        assert all("NVIDIA GPU" in p.message or "pip install" in p.message for p in probs), (name, probs)


def test_cli_takes_the_new_names_and_refuses_a_bad_class_path_before_loading(tmp_path, capsys):
    from lib_lora.cli import main
    from lib_lora.train.config_io import load_config_file

    cfg = _good(tmp_path)
    base = ["train", "--pretrained_model_name_or_path", cfg.pretrained_model_name_or_path, "--train_data_dir",
            cfg.train_data_dir, "--output_dir", cfg.output_dir]
    assert main([*base, "--optimizer_type", "sgdnesterov", "--output_config", str(tmp_path / "a.toml")]) == 0
    assert load_config_file(str(tmp_path / "a.toml")).optimizer_type == "SGDNesterov"
    assert main([*base, "--optimizer_type", "torch.optim.RAdam", "--optimizer_args", "weight_decay=0.01",
                 "--output_config", str(tmp_path / "b.toml")]) == 0
    assert load_config_file(str(tmp_path / "b.toml")).optimizer_type == "torch.optim.RAdam"
    capsys.readouterr()
    assert main([*base, "--optimizer_type", "torch.optim.NoSuchOptimizer"]) == 1
    err = capsys.readouterr().err
    assert "error: optimizer_type: torch.optim.NoSuchOptimizer: torch.optim has no NoSuchOptimizer" in err
    assert not (tmp_path / "out").exists()
