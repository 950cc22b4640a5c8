"""TrainConfig: TOML round trip, sd-scripts files, migrations, kohya_ss GUI presets, validation, steps."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from lib_lora.errors import BadInput
from lib_lora.train.config import TrainConfig, field_names, field_types, resolution_wh
from lib_lora.train.config_io import (
    MIGRATIONS, dump_toml, from_dict, load_config_file, load_toml, loads_toml, save_toml,
)
from lib_lora.train.kohya_ss import from_kohya_ss
from lib_lora.train.steps import plan_from_folders, plan_steps
from lib_lora.train.validate import errors_of, validate
from tests.fixtures.images import make_dataset


def _every_field_changed() -> TrainConfig:
    """A config where no field holds its default, with awkward strings (quotes, backslashes, unicode)."""
    special = {
        "resolution": "768,512", "optimizer_type": "Prodigy", "lr_scheduler": "cosine_with_restarts",
        "mixed_precision": "bf16", "save_precision": "bf16", "network_module": "networks.lora",
        "max_token_length": 225, "log_with": "tensorboard", "sample_sampler": "euler_a", "lr_warmup_steps": 0.25,
        "sample_prompts": ("a 'cat' --w 512 --h 768", 'a "dog" --s 20'), "config_version": 1,
        "caption_extension": ".caption", "output_dir": "C:\\Users\\me\\LoRA 'out'", "training_comment": "tab\tand ü \\ \"q\"",
    }
    values = {}
    for name, tp in field_types().items():
        if name in special:
            values[name] = special[name]
            continue
        if typing.get_origin(tp) is tuple:
            values[name] = ("x=1", "y=2.5")
            continue
        kind = ([a for a in typing.get_args(tp) if a is not type(None)] or [tp])[0]
        values[name] = {bool: True, int: 7, float: 0.375, str: f"{name}-value"}.get(kind, ("x=1", "y=2.5"))
    cfg = TrainConfig(**values)
    default = TrainConfig()
    same = [n for n in field_names() if n not in ("config_version", "network_module") and getattr(cfg, n) == getattr(default, n)]
    assert same == [], same
    return cfg


def test_toml_round_trip_every_field():
    cfg = _every_field_changed()
    assert loads_toml(dump_toml(cfg)) == cfg
    assert loads_toml(dump_toml(TrainConfig())) == TrainConfig()


def test_toml_file_round_trip_and_only_changed(tmp_path):
    cfg = TrainConfig(network_dim=16, network_alpha=8.0, max_train_epochs=3, lr_warmup_steps=50)
    path = save_toml(cfg, tmp_path / "project.toml")
    assert load_toml(path) == cfg
    short = dump_toml(cfg, only_changed=True)
    assert "network_dim = 16" in short and "caption_extension" not in short
    assert loads_toml(short) == cfg
    # our own folder settings (no sd-scripts equivalent) are written only when set
    assert "state_dir" not in path.read_text() and "sample_dir" not in path.read_text()
    own = dataclasses.replace(cfg, state_dir="/p/state", sample_dir="/p/samples")
    assert "state_dir = '/p/state'" in dump_toml(own) and load_toml(save_toml(own, tmp_path / "own.toml")) == own


def test_sd_scripts_layout_flat_or_sectioned():
    flat = "network_dim = 32\noptimizer_type = 'adamw8bit'\nlr_warmup_steps = 0.1\nresolution = 768\n"
    sectioned = "[model_arguments]\nresolution = '768'\n[optimizer_arguments]\noptimizer_type = 'AdamW8bit'\nlr_warmup_steps = 0.1\n[a]\nnetwork_dim = 32\n"
    a, b = loads_toml(flat), loads_toml(sectioned)
    assert a == b
    assert a.optimizer_type == "AdamW8bit" and a.resolution == "768" and a.lr_warmup_steps == 0.1
    assert loads_toml("lr_warmup_steps = 100.0").lr_warmup_steps == 100
    assert isinstance(loads_toml("lr_warmup_steps = 100.0").lr_warmup_steps, int)


def test_unknown_key_is_an_error_naming_valid_ones():
    with pytest.raises(BadInput) as exc:
        loads_toml("network_dimm = 8\n")
    msg = str(exc.value)
    assert "network_dimm" in msg and "did you mean network_dim" in msg and "valid names:" in msg
    assert "\n" not in msg


def test_key_given_twice_is_an_error():
    with pytest.raises(BadInput, match="given twice"):
        loads_toml("network_dim = 8\n[n]\nnetwork_dim = 16\n")


def test_sd_scripts_only_options_become_notes():
    notes: list[str] = []
    cfg = loads_toml("xformers = true\nmax_data_loader_n_workers = 2\nnetwork_dim = 8\n", notes)
    assert cfg.network_dim == 8
    assert notes and "xformers" in notes[0] and "max_data_loader_n_workers" in notes[0]
    with pytest.raises(BadInput, match="safetensors"):
        loads_toml("save_model_as = 'ckpt'\n")


# the sd-scripts config that popular trainer notebooks write (sectioned like sd-scripts' own --output_config); they
# set sd-scripts' debug/metadata switches to their defaults
NOTEBOOK_TOML = """
[model_arguments]
v2 = false
v_parameterization = false

[additional_network_arguments]
no_metadata = false
network_dim = 8
network_alpha = 4

[dataset_arguments]
cache_latents = true
debug_dataset = false
vae_batch_size = 4

[training_arguments]
max_token_length = 225
xformers = true
log_prefix = "mychar"
"""


def test_notebook_sd_scripts_config_loads_with_its_debug_switches_off():
    notes: list[str] = []
    cfg = loads_toml(NOTEBOOK_TOML, notes)
    assert cfg.network_dim == 8 and cfg.max_token_length == 225 and cfg.cache_latents
    assert notes and "debug_dataset" in notes[0] and "no_metadata" in notes[0]
    # switched on, they would change what a run does (dataset preview instead of training; files without metadata)
    for key in ("debug_dataset", "no_metadata"):
        with pytest.raises(BadInput, match=f"does not have: {key} = True"):
            loads_toml(NOTEBOOK_TOML.replace(f"{key} = false", f"{key} = true"))


# the --config_file kohya_ss GUI writes for sd-scripts' train_network.py (key names from bmaltais/kohya_ss
# kohya_gui/lora_gui.py; values are the GUI's defaults): sd-scripts ignores keys it does not know, so this holds some
KOHYA_SS_TOML = """
bucket_reso_steps = 64
cache_latents = true
caption_extension = ".txt"
clip_skip = 2
dynamo_backend = "no"
enable_bucket = true
epoch = 10
gradient_checkpointing = true
huber_c = 0.1
huber_schedule = "snr"
learning_rate = 0.0001
loss_type = "l2"
lr_scheduler = "cosine_with_restarts"
lr_scheduler_args = []
lr_scheduler_num_cycles = 3
lr_scheduler_power = 1
max_bucket_reso = 2048
max_data_loader_n_workers = 0
max_grad_norm = 1
max_timestep = 1000
max_token_length = 225
max_train_epochs = 10
min_bucket_reso = 256
mixed_precision = "fp16"
network_alpha = 8
network_args = [ "conv_dim=4", "conv_alpha=1",]
network_dim = 16
network_module = "networks.lora"
noise_offset_type = "Original"
optimizer_type = "AdamW8bit"
output_name = "mychar"
resolution = "512,512"
sample_sampler = "euler_a"
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "fp16"
text_encoder_lr = 5e-5
train_batch_size = 2
unet_lr = 0.0005
wandb_run_name = "mychar"
xformers = true
"""


def test_kohya_ss_written_config_file_loads_and_says_what_it_ignores():
    notes: list[str] = []
    cfg = loads_toml(KOHYA_SS_TOML, notes)
    assert cfg.network_dim == 16 and cfg.network_args == ("conv_dim=4", "conv_alpha=1") and cfg.max_train_epochs == 10
    assert cfg.unet_lr == 5e-4 and cfg.max_token_length == 225 and cfg.lr_scheduler_num_cycles == 3
    assert notes and all(k in notes[0] for k in ("loss_type", "max_timestep", "wandb_run_name", "epoch", "xformers"))
    # set to something that would change the training, such an option is refused, not silently ignored
    variants = {"loss_type": KOHYA_SS_TOML.replace('loss_type = "l2"', 'loss_type = "huber"'),
                "max_timestep": KOHYA_SS_TOML.replace("max_timestep = 1000", "max_timestep = 900"),
                "multires_noise_iterations": KOHYA_SS_TOML + "multires_noise_iterations = 6\n"}
    for key, text in variants.items():
        with pytest.raises(BadInput, match=f"does not have: {key} = "):
            loads_toml(text)


def test_wrong_types_name_the_setting():
    with pytest.raises(BadInput, match="network_dim"):
        loads_toml("network_dim = 'eight'\n")
    with pytest.raises(BadInput, match="flip_aug"):
        loads_toml("flip_aug = 'maybe'\n")
    with pytest.raises(BadInput, match="network_dim.*whole"):
        loads_toml("network_dim = 2.5\n")
    with pytest.raises(BadInput, match="not valid TOML"):
        loads_toml("network_dim = = 3")


def test_migration_from_unversioned_sd_scripts_file():
    old = loads_toml("use_8bit_adam = true\nlearning_rate = 1e-4\n")
    assert old.optimizer_type == "AdamW8bit" and old.config_version == 1
    assert loads_toml("use_lion_optimizer = true\n").optimizer_type == "Lion"
    # sd-scripts still reads its old misspelling caption_extention (older notebook configs carry it)
    assert loads_toml('caption_extention = ".caption"\n').caption_extension == ".caption"
    # a versioned file does not know the deprecated switch any more
    with pytest.raises(BadInput, match="use_8bit_adam"):
        loads_toml("config_version = 1\nuse_8bit_adam = true\n")
    with pytest.raises(BadInput, match="newer"):
        loads_toml("config_version = 99\n")


def test_migration_table_runs_in_order(monkeypatch):
    import lib_lora.train.config_io as cio

    monkeypatch.setattr(cio, "CONFIG_VERSION", 3)
    calls = []
    monkeypatch.setitem(MIGRATIONS, 1, lambda d: (calls.append(1), {"network_dim": d.pop("rank"), **d})[1])
    monkeypatch.setitem(MIGRATIONS, 2, lambda d: (calls.append(2), d)[1])
    cfg = cio.from_dict({"config_version": 1, "rank": 12})
    assert calls == [1, 2] and cfg.network_dim == 12


def test_config_file_suffix_rule(tmp_path):
    save_toml(TrainConfig(network_dim=12), tmp_path / "run.toml")
    assert load_config_file(tmp_path / "run").network_dim == 12  # sd-scripts appends .toml
    with pytest.raises(BadInput, match="does not exist"):
        load_config_file(tmp_path / "missing")


# a kohya_ss GUI preset as the GUI writes them (key names from bmaltais/kohya_ss presets/lora/*.json):
# numbers as strings, "" for unset, integers as floats, percent warmup, the prompt text inline
KOHYA_PRESET = {
    "LoRA_type": "Kohya LoCon", "additional_parameters": "", "block_alphas": "", "bucket_no_upscale": True,
    "bucket_reso_steps": 64.0, "cache_latents": True, "cache_latents_to_disk": False, "caption_dropout_every_n_epochs": 0.0,
    "caption_dropout_rate": 0, "caption_extension": ".txt", "clip_skip": "2", "color_aug": False, "conv_alpha": 4,
    "conv_dim": 8, "enable_bucket": True, "epoch": 10, "flip_aug": True, "full_fp16": False,
    "gradient_accumulation_steps": 1.0, "gradient_checkpointing": True, "keep_tokens": "1", "learning_rate": "0.0001",
    "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": "3", "lr_scheduler_power": "", "lr_warmup": "10",
    "max_bucket_reso": 2048, "max_resolution": "768,768", "max_token_length": "150", "max_train_epochs": "",
    "max_train_steps": "", "mem_eff_attn": False, "min_bucket_reso": 256, "min_snr_gamma": 5, "mixed_precision": "bf16",
    "network_alpha": 16, "network_dim": 32, "network_dropout": 0, "noise_offset": "0.05", "noise_offset_type": "Original",
    "optimizer": "AdamW8bit", "optimizer_args": "weight_decay=0.01 \"betas=0.9,0.99\"", "prior_loss_weight": 1.0,
    "random_crop": False, "rank_dropout": 0.1, "module_dropout": 0, "save_every_n_epochs": 2, "save_precision": "float",
    "scale_weight_norms": 0, "sdxl": False, "seed": "1234", "shuffle_caption": True, "text_encoder_lr": "5e-05",
    "train_batch_size": 2, "unet_lr": "0.0001", "v2": False, "v_parameterization": False, "xformers": "xformers",
    "sample_prompts": "a photo of mychar --w 512 --h 512\n\nmychar smiling --s 20\n", "sample_every_n_epochs": 0,
    "multires_noise_iterations": 0, "output_name": "mychar", "train_data_dir": "/data/img",
}


def test_kohya_ss_preset_import(tmp_path):
    notes: list[str] = []
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(KOHYA_PRESET), encoding="utf-8")
    cfg = load_config_file(path, notes)
    assert cfg.network_dim == 32 and cfg.network_alpha == 16.0
    assert cfg.network_args == ("conv_dim=8", "conv_alpha=4", "rank_dropout=0.1")
    assert cfg.resolution == "768,768" and cfg.max_train_epochs == 10 and cfg.max_train_steps == 1600
    assert cfg.optimizer_type == "AdamW8bit" and cfg.optimizer_args == ("weight_decay=0.01", "betas=0.9,0.99")
    assert cfg.learning_rate == 1e-4 and cfg.unet_lr == 1e-4 and cfg.text_encoder_lr == 5e-5
    assert cfg.lr_scheduler == "cosine_with_restarts" and cfg.lr_scheduler_num_cycles == 3
    assert cfg.lr_warmup_steps == pytest.approx(0.10)
    assert cfg.clip_skip == 2 and cfg.max_token_length == 150 and cfg.keep_tokens == 1 and cfg.seed == 1234
    assert cfg.bucket_reso_steps == 64 and cfg.enable_bucket and cfg.flip_aug and cfg.shuffle_caption
    assert cfg.save_precision == "fp32" and cfg.mixed_precision == "bf16" and cfg.save_every_n_epochs == 2
    assert cfg.min_snr_gamma == 5.0 and cfg.noise_offset == 0.05 and cfg.network_dropout is None
    assert cfg.sample_prompts == ("a photo of mychar --w 512 --h 512", "mychar smiling --s 20")
    assert cfg.sample_every_n_epochs is None and cfg.output_name == "mychar"
    assert cfg.state_dir is None and cfg.sample_dir is None  # the GUI has no such keys: sd-scripts' places
    # "Original" is the offset noise we do; xformers tunes sd-scripts' own machinery
    assert all("xformers" not in n and "noise_offset_type" not in n and "block_alphas" not in n for n in notes)
    # and it survives our own TOML
    assert loads_toml(dump_toml(cfg)) == cfg


@pytest.mark.parametrize("key, value", [("min_timestep", 100), ("stop_text_encoder_training", 30), ("max_timestep", "900"),
                                        ("scale_weight_norms", 5), ("loss_type", "huber"), ("multires_noise_iterations", 6)])
def test_kohya_ss_preset_refuses_what_the_toml_path_refuses(key, value):
    """A GUI preset and a TOML file with the same sd-scripts option get the same answer: a value that would change
    the training in a way this trainer does not do is refused, never a note."""
    extra = {"noise_offset_type": "Multires"} if key == "multires_noise_iterations" else {}
    with pytest.raises(BadInput, match=f"does not have: {key} = "):
        from_kohya_ss({**KOHYA_PRESET, **extra, key: value})
    with pytest.raises(BadInput, match=f"does not have: {key} = "):
        loads_toml(f"{key} = {json.dumps(value)}\n")
    # their off values (as numbers, strings or empty, as the GUI writes them) load
    for off in {"min_timestep": (0, "0", ""), "stop_text_encoder_training": (0, 0.0, ""), "max_timestep": (1000, "1000"),
                "scale_weight_norms": (0, "0.0"), "loss_type": ("l2",), "multires_noise_iterations": (0, "")}[key]:
        from_kohya_ss({**KOHYA_PRESET, key: off})
    # the GUI passes multires settings to sd-scripts only with noise_offset_type Multires
    assert from_kohya_ss({**KOHYA_PRESET, "multires_noise_iterations": 6, "noise_offset_type": "Original"}).network_dim == 32


def test_kohya_ss_preset_with_a_dataset_config_keeps_it():
    assert from_kohya_ss({**KOHYA_PRESET, "dataset_config": "/data/d.toml"}).dataset_config == "/data/d.toml"
    assert from_kohya_ss({**KOHYA_PRESET, "dataset_config": ""}).dataset_config == ""


def test_kohya_ss_variants():
    standard = from_kohya_ss({"LoRA_type": "Standard", "conv_dim": 8, "conv_alpha": 1, "text_encoder_lr": 0, "unet_lr": "1e-4",
                              "max_train_steps": "160", "epoch": 5, "lr_warmup": 0, "lr_warmup_steps": 20})
    assert standard.network_args == () and standard.network_train_unet_only and standard.text_encoder_lr is None
    assert standard.max_train_steps == 160 and standard.max_train_epochs is None and standard.lr_warmup_steps == 20
    with pytest.raises(BadInput, match="LyCORIS/LoKr"):
        from_kohya_ss({"LoRA_type": "LyCORIS/LoKr"})


def test_resolution_parsing():
    assert resolution_wh(TrainConfig(resolution="512")) == (512, 512)
    assert resolution_wh(TrainConfig(resolution="768,512")) == (768, 512)


def _good(tmp_path, **kw) -> TrainConfig:
    data = make_dataset(tmp_path / "img", {"mychar": 10, "style": 5}, per_concept=3)
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    return TrainConfig(pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(tmp_path / "out"), **kw)


def test_validate_good_config_has_no_errors(tmp_path):
    assert errors_of(validate(_good(tmp_path))) == []


def test_validate_finds_every_problem_at_once(tmp_path):
    cfg = dataclasses.replace(
        _good(tmp_path), pretrained_model_name_or_path=str(tmp_path / "nope.safetensors"), v2=True, sdxl=True,
        network_dim=0, optimizer_type="Adafactor", lr_scheduler="adafactor", lr_warmup_steps=1.5,
        network_train_unet_only=True, network_train_text_encoder_only=True, cache_latents=True, color_aug=True,
        caption_dropout_rate=1.5, output_name="../evil", resolution="500", max_token_length=100,
        sample_every_n_epochs=1, validation_split=1.0, mixed_precision="fp8", network_args=("conv_dim",),
        resume=str(tmp_path), train_batch_size=0,
    )
    fields = {p.field for p in errors_of(validate(cfg))}
    expected = {"pretrained_model_name_or_path", "sdxl", "network_dim", "lr_warmup_steps", "network_train_unet_only",
                "color_aug", "caption_dropout_rate", "output_name", "resolution", "max_token_length", "sample_prompts",
                "validation_split", "mixed_precision", "network_args", "resume", "train_batch_size"}
    assert expected <= fields, expected - fields
    assert "lr_scheduler" not in fields  # adafactor + Adafactor is a valid pair


def test_validate_warns_that_the_webui_ignores_clip_skip_for_sd2(tmp_path):
    """Seen in the real webui: for SD 2.x it always reads OpenCLIP's penultimate layer whatever Clip skip says,
    while training (sd-scripts' meaning) goes clip_skip - 1 layers further back; the run is allowed, with a warning."""
    sd2 = dataclasses.replace(_good(tmp_path), v2=True, v_parameterization=True, clip_skip=2)
    problems = [p for p in validate(sd2) if p.field == "clip_skip"]
    assert [p.severity for p in problems] == ["warning"] and "ignores clip skip for SD 2.x" in problems[0].message
    assert errors_of(validate(sd2)) == []
    for cfg in (dataclasses.replace(sd2, clip_skip=1), dataclasses.replace(sd2, clip_skip=None),
                dataclasses.replace(sd2, v2=False, v_parameterization=False)):
        assert not [p for p in validate(cfg) if p.field == "clip_skip"]


def test_validate_dataset_problems(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = dataclasses.replace(_good(tmp_path), train_data_dir=str(empty))
    assert any("no N_concept" in p.message for p in validate(cfg))
    (empty / "5_thing").mkdir()
    probs = validate(dataclasses.replace(cfg, train_data_dir=str(empty)))
    assert any("empty" in p.message and p.severity == "error" for p in probs)
    missing = dataclasses.replace(cfg, train_data_dir=str(tmp_path / "gone"), reg_data_dir=str(tmp_path / "gone2"))
    msgs = [p for p in validate(missing) if "does not exist" in p.message]
    assert {p.field for p in msgs} >= {"train_data_dir", "reg_data_dir"}


def test_validate_optimizer_needs_its_package(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "prodigyopt" else real(n, *a))
    probs = validate(_good(tmp_path, optimizer_type="Prodigy", learning_rate=1.0))
    assert any(p.field == "optimizer_type" and "pip install prodigyopt" in p.message for p in probs)


def test_steps_calculation():
    cfg = TrainConfig(train_batch_size=2, gradient_accumulation_steps=2, max_train_epochs=3)
    plan = plan_steps(cfg, repeated_images=45)  # 45 items -> 23 batches -> 12 steps per epoch
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.epochs, plan.total_steps) == (23, 12, 3, 36)
    reg = plan_steps(cfg, repeated_images=45, reg_images=4)
    assert reg.items_per_epoch == 90 and reg.steps_per_epoch == 23
    by_steps = plan_steps(TrainConfig(max_train_steps=100, train_batch_size=4), repeated_images=30)
    assert by_steps.steps_per_epoch == 8 and by_steps.epochs == 13 and by_steps.total_steps == 100
    two_gpus = plan_steps(TrainConfig(max_train_epochs=1), repeated_images=45, num_processes=2)
    assert two_gpus.steps_per_epoch == 23
    assert "45 per epoch" in plan.describe(cfg) and "36 steps" in plan.describe(cfg)
    assert plan.describe(cfg).endswith("12 steps per epoch x 3 epochs = 36 steps")
    # max_train_steps cuts the last epoch short: no "8 steps per epoch x 13 epochs = 100 steps" arithmetic that fails
    assert by_steps.describe(TrainConfig(max_train_steps=100, train_batch_size=4)).endswith(
        "8 steps per epoch; max_train_steps 100 -> 13 epochs (the last one partial)")
    one = plan_steps(TrainConfig(max_train_steps=2, train_batch_size=2), repeated_images=12)
    assert one.describe(TrainConfig(max_train_steps=2, train_batch_size=2)).endswith(
        "6 steps per epoch; max_train_steps 2 -> 1 epoch (partial)")


def test_steps_from_folders(tmp_path):
    cfg = _good(tmp_path, max_train_epochs=2, train_batch_size=3)
    plan = plan_from_folders(cfg)  # 3 images x 10 + 3 x 5 = 45
    assert (plan.train_images, plan.repeated_images, plan.steps_per_epoch, plan.total_steps) == (6, 45, 15, 30)


def test_validate_adamw8bit_without_cuda_says_so_before_anything_loads(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    problems = [p for p in validate(_good(tmp_path, optimizer_type="AdamW8bit")) if p.field == "optimizer_type"]
    assert len(problems) == 1 and problems[0].severity == "error"
    assert "NVIDIA GPU" in problems[0].message and "pip install" not in problems[0].message


def test_validate_network_alpha_zero_means_dim_as_in_sd_scripts(tmp_path):
    assert errors_of(validate(_good(tmp_path, network_alpha=0.0))) == []
    assert {p.field for p in errors_of(validate(_good(tmp_path, network_alpha=-1.0)))} == {"network_alpha"}


def test_validate_says_which_two_switches_leave_nothing_to_train(tmp_path):
    problems = errors_of(validate(_good(tmp_path, network_train_unet_only=True, network_train_text_encoder_only=True)))
    assert [str(p) for p in problems] == ["error: network_train_unet_only: network_train_text_encoder_only is set too: "
                                          "nothing would train"]


def test_cli_help_shows_each_setting_truthfully():
    """`python -m lib_lora train --help`: every help line as written (a '%' in a help text once printed argparse's
    internals), the accepted names of the settings matched leniently, and no promise the CLI does not keep."""
    import argparse

    from lib_lora.cli.train import add_arguments
    from lib_lora.train.config import OPTIMIZERS, SAVE_PRECISIONS, SCHEDULERS

    parser = argparse.ArgumentParser(prog="python -m lib_lora train")
    add_arguments(parser)
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    assert "option_strings" not in text and "~30% slower" in text
    for name, choices in (("optimizer_type", OPTIMIZERS), ("lr_scheduler", SCHEDULERS), ("save_precision", SAVE_PRECISIONS)):
        line = text.split(f"--{name} {name.upper()} ", 1)[1].split(" --", 1)[0]
        assert all(c in line for c in choices), (name, line)
    vae = text.split("--vae VAE ", 1)[1].split(" --", 1)[0]
    assert "not supported" not in vae and "ldm names" in vae and "AutoencoderKL folder" in vae, vae
    # what no option line says: how to stop and resume, and how to run on several GPUs
    assert "Ctrl-C once" in text and "--resume" in text and "accelerate launch" in text
