"""State folders, seeds, file names, the loss log, metadata, sample prompts, control flags, CLI option merging."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from lib_lora.errors import BadInput, IncompatibleFile
from lib_lora.train.config import TrainConfig
from lib_lora.train.config_io import save_toml
from lib_lora.train.dist import Dist
from lib_lora.train.events import TrainControl
from lib_lora.train.loop import step_seed
from lib_lora.train.metadata import activation_text, base_model_version, training_metadata
from lib_lora.train.outputs import LossLog, epoch_file, samples_dir, state_dir, step_file
from lib_lora.train.prompts import parse_prompt
from lib_lora.train.sched import build_scheduler
from lib_lora.train.state import TrainState, load_state, resolve_seed, save_state, settings_digest


def _optimizer_with_state():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler("cosine", opt, 10, 2)
    for _ in range(3):
        p.sum().backward()
        opt.step()
        sched.step()
    return p, opt, sched


def test_state_folder_round_trip_and_replace(tmp_path):
    p, opt, sched = _optimizer_with_state()
    st = TrainState(seed=5, total_steps=10, epochs_done=1, batches_done=3, global_step=7, val_losses={"0": 0.5, "1": 0.25},
                    saved_files=["a-01.safetensors"], settings="abc")
    net = {"lora_unet_x.lora_down.weight": p.detach().clone(), "lora_unet_x.alpha": torch.tensor(4.0)}
    folder = save_state(tmp_path / "run-state", st, net, opt.state_dict(), sched.state_dict(), None, TrainConfig(network_dim=3))
    got = load_state(folder)
    assert got.state == st
    assert torch.equal(got.network["lora_unet_x.lora_down.weight"], p.detach())
    assert torch.equal(got.optimizer["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert got.scheduler["last_epoch"] == 3 and got.scaler is None
    assert (folder / "settings.toml").read_text().count("network_dim = 3") == 1
    # saving again replaces the folder whole, leaving no temporary folders behind
    st2 = dataclasses.replace(st, global_step=9)
    save_state(folder, st2, net, opt.state_dict(), sched.state_dict(), {"scale": 2.0}, TrainConfig())
    assert load_state(folder).state.global_step == 9 and load_state(folder).scaler == {"scale": 2.0}
    assert sorted(os.listdir(tmp_path)) == ["run-state"]


def test_damaged_or_missing_state(tmp_path):
    with pytest.raises(BadInput, match="not a saved state"):
        load_state(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps({"seed": 1, "total_steps": 3}))
    with pytest.raises(IncompatibleFile, match="damaged"):
        load_state(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps({"seed": 1, "total_steps": 3, "version": 99}))
    with pytest.raises(IncompatibleFile, match="newer"):
        load_state(tmp_path)


def test_resolve_seed(tmp_path):
    assert resolve_seed(TrainConfig(seed=11)).seed == 11
    a, b = resolve_seed(TrainConfig()), resolve_seed(TrainConfig())
    assert isinstance(a.seed, int) and isinstance(b.seed, int) and 0 <= a.seed < 2**31
    (tmp_path / "state.json").write_text(TrainState(seed=77, total_steps=3).to_json())
    assert resolve_seed(TrainConfig(seed=1, resume=str(tmp_path))).seed == 77


def test_settings_digest_sees_what_changes_the_numbers():
    base = TrainConfig(output_dir="/a", seed=1)
    same = dataclasses.replace(base, output_dir="/b", output_name="x", save_every_n_epochs=2, sample_every_n_epochs=1,
                               seed=None, gradient_checkpointing=True, logging_dir="/l", save_precision="fp32",
                               state_dir="/s", sample_dir="/p")
    assert settings_digest(same) == settings_digest(base)
    for change in (dict(clip_skip=2), dict(max_token_length=150), dict(keep_tokens_separator="|||"),
                   dict(mixed_precision="bf16"), dict(network_dropout=0.1), dict(lr_scheduler_num_cycles=3),
                   dict(max_grad_norm=0.5), dict(prior_loss_weight=0.5), dict(caption_dropout_every_n_epochs=2),
                   dict(network_dim=8), dict(learning_rate=3e-4), dict(cache_latents=True), dict(train_batch_size=2)):
        assert settings_digest(dataclasses.replace(base, **change)) != settings_digest(base), change


def test_step_seed_is_stable_and_distinct():
    assert step_seed(1, 2, 3) == step_seed(1, 2, 3)
    seeds = {step_seed(1, e, i) for e in range(1, 4) for i in range(50)}
    assert len(seeds) == 150 and all(0 <= s < 2**63 for s in seeds)


def test_file_names():
    cfg = TrainConfig(output_dir="/out", output_name="mychar")
    assert epoch_file(cfg, 1).name == "mychar-01.safetensors"
    assert epoch_file(cfg, 12).name == "mychar-12.safetensors"
    assert epoch_file(cfg, 123).name == "mychar-123.safetensors"
    assert epoch_file(cfg, None).name == "mychar.safetensors"
    assert step_file(cfg, 42).name == "mychar-step00000042.safetensors"
    assert state_dir(cfg).name == "mychar-state" and state_dir(cfg, 3).name == "mychar-03-state"
    assert state_dir(cfg).parent == Path("/out") and samples_dir(cfg) == Path("/out/sample")  # sd-scripts' places
    own = dataclasses.replace(cfg, state_dir="/project/state", sample_dir="/project/samples")
    assert state_dir(own) == Path("/project/state/mychar-state") and state_dir(own, 3).parent == Path("/project/state")
    assert samples_dir(own) == Path("/project/samples") and epoch_file(own, 1).parent == Path("/out")


def test_loss_log_rewrites_and_truncates_on_resume(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), output_name="n")
    log = LossLog(cfg)
    for s in range(1, 6):
        log.step(s, 1, 0.5 / s, 0.4, 1e-4)
    log.validation(5, 1, 0.3)
    log.flush()
    lines = (tmp_path / "logs" / "n_loss.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,loss,avg_loss,lr,val_loss,time" and len(lines) == 7
    resumed = LossLog(cfg, resume_step=3)
    assert [int(r["step"]) for r in resumed.rows] == [1, 2, 3]
    resumed.step(4, 1, 0.1, 0.1, 1e-4)
    resumed.flush()
    assert len((tmp_path / "logs" / "n_loss.csv").read_text().splitlines()) == 5
    off = LossLog(dataclasses.replace(cfg, output_name="m"), enabled=False)
    off.step(1, 1, 1, 1, 1)
    off.flush()
    assert not (tmp_path / "logs" / "m_loss.csv").exists()


class _Data:
    num_train_images, num_validation_images, num_reg_images = 30, 2, 0

    def dataset_dirs(self, reg=False):
        return {} if reg else {"10_mychar": {"n_repeats": 10, "img_count": 3}, "5_other thing": {"n_repeats": 5, "img_count": 2}}

    def tag_frequency(self):
        return {"10_mychar": {"mychar": 3}}

    def bucket_info(self):
        return {"buckets": {"0": {"resolution": [512, 512], "count": 30}}, "mean_img_ar_error": 0.0}


def test_training_metadata_values():
    cfg = TrainConfig(output_name="mychar", network_dim=16, network_alpha=8, network_args=("conv_dim=4", "conv_alpha=1"),
                      resolution="768,512", clip_skip=2, pretrained_model_name_or_path="/m/model.safetensors", unet_lr=2e-4)
    md = training_metadata(cfg, arch="sd1", prediction_type="epsilon", dataset=_Data(), session_id=1, started_at=100.0, epoch=2,
                           num_epochs=4, step=20, total_steps=40, batches_per_epoch=10, optimizer_name="torch.optim.adamw.AdamW", seed=3)
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_network_dim"] == "16" and md["ss_network_alpha"] == "8.0" and md["ss_output_name"] == "mychar"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1"}
    assert md["ss_resolution"] == "(768, 512)" and md["ss_clip_skip"] == "2" and md["ss_v2"] == "False"
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_sd_model_name"] == "model.safetensors"
    assert md["ss_unet_lr"] == "0.0002" and md["ss_text_encoder_lr"] == "0.0001" and md["ss_network_dropout"] == "None"
    assert json.loads(md["ss_reg_dataset_dirs"]) == {} and md["ss_num_train_images"] == "30"
    assert md["ss_total_batch_size"] == "1" and md["ss_seed"] == "3" and md["ss_steps"] == "20"
    assert base_model_version("sd2", "v_prediction") == "sd_v2_v" and base_model_version("sdxl", "epsilon") == "sdxl_base_v1-0"
    assert activation_text(_Data()) == "mychar, other thing"


def test_sample_prompt_syntax():
    p = parse_prompt("a photo of mychar, smiling --n blurry, lowres --w 640 --h 768 --s 20 --l 6.5 --d 42 --ss euler_a")
    assert (p.prompt, p.negative_prompt, p.width, p.height, p.steps, p.scale, p.seed, p.sampler) == (
        "a photo of mychar, smiling", "blurry, lowres", 640, 768, 20, 6.5, 42, "euler_a")
    q = parse_prompt("just text", default_size=(768, 768))
    assert (q.width, q.height, q.seed, q.steps) == (768, 768, None, 30)
    assert parse_prompt("x --w 500 --s 5000").width == 496 and parse_prompt("x --s 5000").steps == 1000
    with pytest.raises(BadInput, match="--q"):
        parse_prompt("x --q 3")
    with pytest.raises(BadInput, match="--w"):
        parse_prompt("x --w wide")


def test_sample_prompt_files_in_sd_scripts_toml_and_json_forms(tmp_path):
    """sd-scripts reads --sample_prompts as .txt lines, a .toml ([prompt] defaults + [[prompt.subset]]) or a .json list
    (dicts or lines); the last two once came through as text lines ('[prompt]', '{"prompt": ...') and were rendered."""
    from lib_lora.train.config import sample_prompt_lines
    from lib_lora.train.validate import validate

    toml = tmp_path / "prompts.toml"
    toml.write_text('[prompt]\nnegative_prompt = "lowres"\nwidth = 640\nheight = 768\nscale = 6.5\nsample_steps = 20\n\n'
                    '[[prompt.subset]]\nprompt = "mychar, smiling"\nseed = 42\n\n'
                    '[[prompt.subset]]\nprompt = "mychar, running"\nwidth = 512\nsample_sampler = "euler_a"\n', encoding="utf-8")
    got = [parse_prompt(line) for line in sample_prompt_lines(TrainConfig(sample_prompts=str(toml)))]
    assert [(p.prompt, p.negative_prompt, p.width, p.height, p.steps, p.scale, p.seed, p.sampler) for p in got] == [
        ("mychar, smiling", "lowres", 640, 768, 20, 6.5, 42, None), ("mychar, running", "lowres", 512, 768, 20, 6.5, None, "euler_a")]
    js = tmp_path / "prompts.json"
    js.write_text(json.dumps([{"prompt": "mychar", "negative_prompt": "blurry", "sample_steps": 12},
                              "style --w 512 --h 640"]), encoding="utf-8")
    got = [parse_prompt(line) for line in sample_prompt_lines(TrainConfig(sample_prompts=str(js)))]
    assert [(p.prompt, p.negative_prompt, p.steps, p.width, p.height) for p in got] == [
        ("mychar", "blurry", 12, 512, 512), ("style", "", 30, 512, 640)]
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": ', encoding="utf-8")
    problems = [str(p) for p in validate(TrainConfig(sample_prompts=str(bad), sample_every_n_epochs=1), need_model_path=False)]
    assert any(p.startswith("error: sample_prompts: ") and "bad.json" in p for p in problems), problems


def test_control_flags():
    c = TrainControl()
    c.pause()
    assert c.pause_requested and not c.stop_requested
    c.stop()
    assert c.stop_requested and not c.pause_requested  # stopping ends a pause
    c.wait_while_paused()  # returns at once
    c.save_now()
    assert c.take_save_request() and not c.take_save_request()


def test_dist_shard_pads_to_equal_shares():
    items = list(range(5))
    a, b = Dist(0, 2).shard(items), Dist(1, 2).shard(items)
    assert a == [0, 2, 4] and b == [1, 3, 0] and Dist().shard(items) == items


def test_cli_config_file_then_command_line(tmp_path):
    from lib_lora.cli.train import add_arguments, config_from_args

    save_toml(TrainConfig(network_dim=32, learning_rate=5e-4, flip_aug=True), tmp_path / "base.toml")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    notes: list[str] = []
    args = parser.parse_args(["--config_file", str(tmp_path / "base"), "--network_dim", "8", "--network_args", "conv_dim=4",
                              "conv_alpha=1", "--no-flip_aug", "--lr_warmup_steps", "0.1", "--xformers", "--optimizer_type", "adamw",
                              "--use_8bit_adam", "--save_model_as", "safetensors"])
    cfg = config_from_args(args, notes)
    assert cfg.network_dim == 8 and cfg.learning_rate == 5e-4 and cfg.flip_aug is False
    assert cfg.network_args == ("conv_dim=4", "conv_alpha=1") and cfg.lr_warmup_steps == 0.1
    assert cfg.optimizer_type == "AdamW"  # an explicit optimizer_type wins over the deprecated switch
    assert any("xformers" in n for n in notes)
    old = config_from_args(parser.parse_args(["--use_8bit_adam"]), [])
    assert old.optimizer_type == "AdamW8bit"
    with pytest.raises(BadInput, match="safetensors"):
        config_from_args(parser.parse_args(["--save_model_as", "ckpt"]), [])
