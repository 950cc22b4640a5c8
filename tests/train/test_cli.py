"""`python -m lib_lora train` end to end on a tiny diffusers folder, and a two-process `accelerate launch` on CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_lora.cli import main
from tests.fixtures.images import make_dataset

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cli-data") / "img", {"mychar": 2}, per_concept=3)


def _args(model, data, out, *extra):
    return ["train", "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--output_name", "cli", "--resolution", "64", "--network_dim", "4", "--network_alpha", "2",
            "--network_args", "conv_dim=2", "conv_alpha=1", "--train_batch_size", "2", "--seed", "1", "--cache_latents",
            *extra]


def test_cli_trains_and_prints_the_plan_first(tmp_path, sd1_diffusers_dir, data_dir, capsys):
    code = main(_args(sd1_diffusers_dir, data_dir, tmp_path / "out", "--max_train_epochs", "2", "--save_every_n_epochs", "1",
                      "--save_state"))
    out = capsys.readouterr().out
    assert code == 0, out
    first = out.splitlines()[0]
    assert first.startswith("steps: 3 images x repeats = 6 per epoch") and "6 steps" in first
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["cli-01.safetensors", "cli-02.safetensors"]
    from lib_lora.network import read_metadata

    md = read_metadata(tmp_path / "out" / "cli-02.safetensors")
    assert md["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "1", "dropout": null}' and md["ss_epoch"] == "2"  # as sd-scripts
    assert "done: 6 steps, 2 file(s)" in out and "resuming" not in out
    # resuming says where it continues (here: the finished run's state, so nothing is left to do)
    code = main(_args(sd1_diffusers_dir, data_dir, tmp_path / "out", "--max_train_epochs", "2", "--save_every_n_epochs", "1",
                      "--resume", str(tmp_path / "out" / "cli-state")))
    out = capsys.readouterr().out
    assert code == 0 and "resuming after step 6 of 6" in out and "done: 6 steps, 2 file(s)" in out


def test_cli_lists_every_problem_before_loading(tmp_path, capsys):
    code = main(["train", "--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--train_data_dir", str(tmp_path / "none"),
                 "--output_dir", str(tmp_path), "--network_dim", "0", "--lr_scheduler", "adafactor"])
    err = capsys.readouterr().err
    assert code == 1
    for field in ("pretrained_model_name_or_path", "train_data_dir", "network_dim", "lr_scheduler"):
        assert f"error: {field}" in err
    assert not list(tmp_path.iterdir())


def test_cli_says_when_images_have_no_caption_file(tmp_path, sd1_diffusers_dir, data_dir, capsys):
    """A caption_extension that matches no file (".caption" for a dataset of .txt files) trains on the folder's concept
    name: sd-scripts warns about it, and so must we, before the run (not only in a dry run)."""
    code = main(_args(sd1_diffusers_dir, data_dir, tmp_path / "out", "--max_train_steps", "1", "--caption_extension", ".caption"))
    out = capsys.readouterr().out
    assert code == 0
    assert "note: 3 images have no .caption caption file and train on their folder's concept name: 2_mychar (3)" in out
    code = main(_args(sd1_diffusers_dir, data_dir, tmp_path / "out2", "--max_train_steps", "1"))
    assert code == 0 and "no .txt caption file" not in capsys.readouterr().out


def test_cli_progress_into_a_file_is_plain_lines(tmp_path, sd1_diffusers_dir, data_dir, capsys):
    """Output that is not a terminal (a log file, nohup, CI) gets plain progress lines, not a bar's carriage returns."""
    code = main(_args(sd1_diffusers_dir, data_dir, tmp_path / "out", "--max_train_steps", "2"))
    captured = capsys.readouterr()
    assert code == 0
    assert "\r" not in captured.out  # (stderr may hold the model loader's own bars)
    assert any(line.startswith("step 2/2 epoch 1 loss ") and " it/s eta " in line for line in captured.out.splitlines())


def test_cli_dry_run_writes_nothing(tmp_path, sd1_diffusers_dir, data_dir, capsys):
    code = main(_args(sd1_diffusers_dir, data_dir, tmp_path / "out", "--max_train_epochs", "5", "--dry_run"))
    out = capsys.readouterr().out
    assert code == 0
    assert "train      2_mychar: 3 images x 2 repeats = 6" in out and "measured 3 steps" in out and "peak memory" in out
    assert not (tmp_path / "out").exists()


def test_cli_config_file_and_output_config(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    assert main(["train", "--network_dim", "12", "--flip_aug", "--output_config", str(cfg)]) == 0
    assert main(["train", "--config_file", str(tmp_path / "run"), "--network_alpha", "6", "--output_config", str(tmp_path / "b.toml")]) == 0
    text = (tmp_path / "b.toml").read_text()
    assert "network_dim = 12" in text and "network_alpha = 6.0" in text and "flip_aug = true" in text
    capsys.readouterr()
    preset = tmp_path / "preset.json"  # a kohya_ss GUI preset: what it holds that we do not use is said
    preset.write_text('{"LoRA_type": "Standard", "network_dim": 16, "block_dims": "2,2,2", "noise_offset_type": "Original"}')
    assert main(["train", "--config_file", str(preset), "--output_config", str(tmp_path / "c.toml")]) == 0
    out = capsys.readouterr().out
    assert "note: kohya_ss settings not used here: block_dims" in out
    assert "network_dim = 16" in (tmp_path / "c.toml").read_text()
    # a setting that would change the training is refused, as the same key in a TOML file is
    preset.write_text('{"LoRA_type": "Standard", "network_dim": 16, "scale_weight_norms": 1}')
    assert main(["train", "--config_file", str(preset), "--output_config", str(tmp_path / "d.toml")]) == 1
    assert "does not have: scale_weight_norms = 1" in capsys.readouterr().err and not (tmp_path / "d.toml").exists()


@pytest.mark.slow
def test_two_process_accelerate_launch_on_cpu(tmp_path, sd1_diffusers_dir, capsys):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    data = make_dataset(tmp_path / "img", {"mychar": 2}, per_concept=4)  # 8 items, batch 2: 4 batches per epoch
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    common = ["--max_train_epochs", "2", "--save_every_n_epochs", "1", "--save_precision", "fp32"]
    # accelerate's --cpu runs one process unless MPI is set up; --multi_gpu starts torchrun's processes, which use
    # gloo on a machine without CUDA (what this test runs on)
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "lib_lora",
           *_args(sd1_diffusers_dir, data, tmp_path / "out", *common, "--save_state")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["cli-01.safetensors", "cli-02.safetensors"]
    assert sorted(p.name for p in out.glob("*-state")) == ["cli-01-state", "cli-state"]
    assert len(list((out / "logs").glob("*.csv"))) == 1
    # 4 batches per epoch shared by 2 processes -> 2 steps per epoch
    assert "2 steps per epoch x 2 epochs = 4 steps" in proc.stdout and proc.stdout.count("done: 4 steps") == 1
    from safetensors.torch import load_file

    from lib_lora.network import read_metadata

    assert read_metadata(out / "cli-02.safetensors")["ss_total_batch_size"] == "4"
    # data parallel = the averaged gradient of both processes' batches: one process accumulating the same two
    # batches per step (batch i on process i % 2) computes the same weights
    assert main(_args(sd1_diffusers_dir, data, tmp_path / "one", *common, "--gradient_accumulation_steps", "2")) == 0
    capsys.readouterr()
    two, one = load_file(str(out / "cli-02.safetensors")), load_file(str(tmp_path / "one" / "cli-02.safetensors"))
    assert two.keys() == one.keys()
    assert all(torch.allclose(two[k], one[k], rtol=1e-5, atol=1e-7) for k in two)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in two.items() if "lora_up" in k)


def test_ctrl_c_once_stops_after_the_step_twice_at_once():
    import signal

    from lib_lora.cli.train import _install_interrupt
    from lib_lora.train.events import TrainControl

    control = TrainControl()
    before = signal.getsignal(signal.SIGINT)
    previous = _install_interrupt(control)
    try:
        signal.raise_signal(signal.SIGINT)
        assert control.stop_requested  # the loop finishes its step, saves <name>-state and exits 130
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_while_caching_latents_stops_after_the_vae_batch(tmp_path, sd1_diffusers_dir, data_dir, capsys, monkeypatch):
    """A real SIGINT (the CLI's own handler) during the first VAE batch: caching ends there, nothing is trained."""
    import signal

    from lib_lora.backends import DiffusersBackend

    real = DiffusersBackend.encode_images
    calls = []

    def encode_then_ctrl_c(self, pixels, **kw):
        calls.append(pixels.shape[0])
        out = real(self, pixels, **kw)
        signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(DiffusersBackend, "encode_images", encode_then_ctrl_c)
    code = main(_args(sd1_diffusers_dir, data_dir, tmp_path / "out", "--max_train_epochs", "1"))
    out = capsys.readouterr().out
    assert code == 130, out
    assert calls == [2]  # 3 images in batches of 2: the second batch never ran
    assert "stopped while caching latents (2 of 3 images cached, held in memory only, so not kept); nothing was " \
           "trained in this run; start again to train" in out
    assert not list((tmp_path / "out").glob("*.safetensors"))
