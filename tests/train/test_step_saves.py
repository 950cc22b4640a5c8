"""sd-scripts' step schedules: `save_every_n_steps` (+ `save_last_n_steps`, `save_last_n_steps_state`, state with
`save_state`) and `sample_every_n_steps`, on tiny real models. A step file is a full LoRA file (same keys and metadata
as an epoch file, its own `.json` card); a state saved at a step resumes to the uninterrupted run's weights, mid-epoch
or at an epoch's last step."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lib_lora.train.config import TrainConfig
from lib_lora.train.events import Done, Note, Sample, Saved, Started
from lib_lora.train.validate import errors_of, validate
from tests.fixtures.images import make_dataset
from tests.fixtures.training import run_training


@pytest.fixture(scope="module")
def components(clip_tokenizer):
    pytest.importorskip("diffusers")
    from tests.fixtures.diffusers_models import build_components

    return build_components("sd1", clip_tokenizer, seed=3)


@pytest.fixture()
def backend(components):
    from lib_lora.backends import DiffusersBackend

    c = components
    return DiffusersBackend(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], scheduler=c["scheduler"], device="cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # 2 x 3 + 1 x 3 = 9 images per epoch, batch 2: 5 batches per epoch
    return make_dataset(tmp_path_factory.mktemp("data") / "img", {"mychar": 2, "style": 1}, per_concept=3)


def _cfg(out, data_dir, **kw) -> TrainConfig:
    base = dict(train_data_dir=str(data_dir), output_dir=str(out), output_name="tiny", resolution="64", network_dim=4,
                network_alpha=4.0, learning_rate=2e-3, train_batch_size=2, max_train_epochs=2, seed=7,
                save_precision="fp32", cache_latents=True)
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _name(path) -> str:
    return str(path).replace("\\", "/").rsplit("/", 1)[-1]


def test_step_files_samples_states_and_last_n(tmp_path, data_dir, backend):
    from lib_lora.network import read_metadata

    out, states, previews = tmp_path / "out", tmp_path / "state", tmp_path / "previews"
    cfg = _cfg(out, data_dir, save_every_n_steps=2, save_last_n_steps=3, save_every_n_epochs=1, save_state=True,
               save_last_n_steps_state=2, state_dir=str(states), sample_every_n_steps=4, sample_dir=str(previews),
               sample_prompts=("mychar --w 64 --h 64 --s 2 --d 5",))
    events = run_training(cfg, backend)
    assert isinstance(events[-1], Done)

    # 10 steps: step files at 2, 4, 6, 8, 10; save_last_n_steps = 3 keeps those of the last 3 steps (sd-scripts' rule)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "tiny-01.safetensors", "tiny-02.safetensors", "tiny-step00000008.safetensors", "tiny-step00000010.safetensors"]
    assert sorted(p.name for p in out.glob("*.json")) == ["tiny-01.json", "tiny-02.json", "tiny-step00000008.json",
                                                         "tiny-step00000010.json"]
    lora = [e for e in events if isinstance(e, Saved) and e.kind == "lora"]
    assert [(_name(e.path), e.step) for e in lora] == [
        ("tiny-step00000002.safetensors", 2), ("tiny-step00000004.safetensors", 4), ("tiny-01.safetensors", None),
        ("tiny-step00000006.safetensors", 6), ("tiny-step00000008.safetensors", 8),
        ("tiny-step00000010.safetensors", 10), ("tiny-02.safetensors", None)]
    assert [e.epoch for e in lora] == [0, 0, 1, 1, 1, 1, 2]  # epochs finished when written (sd-scripts' ss_epoch)
    removed = [e.message for e in events if isinstance(e, Note) and "(save_last_n_steps =" in e.message]
    assert len(removed) == 3 and "tiny-step00000002.safetensors" in removed[0]
    assert [_name(f) for f in events[-1].files] == ["tiny-01.safetensors", "tiny-step00000008.safetensors",
                                                     "tiny-step00000010.safetensors", "tiny-02.safetensors"]

    # a step file is a full LoRA file: the epoch file's keys and metadata, its own step and epoch count
    step_md, epoch_md = read_metadata(out / "tiny-step00000008.safetensors"), read_metadata(out / "tiny-02.safetensors")
    assert step_md["ss_steps"] == "8" and step_md["ss_epoch"] == "1" and step_md["ss_output_name"] == "tiny-step00000008"
    assert epoch_md["ss_steps"] == "10" and epoch_md["ss_epoch"] == "2"
    assert step_md.keys() == epoch_md.keys()
    same = {k for k in epoch_md if k not in ("ss_steps", "ss_epoch", "ss_output_name", "ss_training_finished_at")
            and not k.startswith(("sshs_", "modelspec."))}
    assert {k: step_md[k] for k in same} == {k: epoch_md[k] for k in same}
    last_step, last_epoch = _weights(out / "tiny-step00000010.safetensors"), _weights(out / "tiny-02.safetensors")
    assert last_step.keys() == last_epoch.keys() and all(torch.equal(last_step[k], last_epoch[k]) for k in last_step)
    assert json.loads((out / "tiny-step00000008.json").read_text()) == json.loads((out / "tiny-02.json").read_text())

    # state at each step save (save_last_n_steps_state = 2 keeps those of the last 2 steps), plus the epoch states
    assert sorted(p.name for p in states.iterdir()) == ["tiny-01-state", "tiny-state", "tiny-step00000008-state",
                                                        "tiny-step00000010-state"]
    assert json.loads((states / "tiny-step00000008-state" / "state.json").read_text())["global_step"] == 8

    # previews at steps 4 and 8, named like the epoch previews with the step: <name>_NNNNNN_II.png
    samples = [e for e in events if isinstance(e, Sample)]
    assert [(e.step, e.epoch) for e in samples] == [(4, 0), (8, 1)]
    assert sorted(p.name for p in previews.iterdir()) == ["tiny_000004_00.png", "tiny_000008_00.png"]


EXACT = dict(max_train_epochs=3, network_dropout=0.1, noise_offset=0.05, min_snr_gamma=5.0, flip_aug=True,
             shuffle_caption=True, gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=2,
             cache_latents=False)


def test_resume_from_a_step_state_gives_the_uninterrupted_weights(tmp_path, data_dir, backend):
    # 3 optimizer steps per epoch (5 batches, 2 per step): step 4 is mid-epoch 2, step 6 ends epoch 2
    run_training(_cfg(tmp_path / "plain", data_dir, **EXACT), backend)
    expected = _weights(tmp_path / "plain" / "tiny.safetensors")

    stepped = _cfg(tmp_path / "a", data_dir, save_every_n_steps=2, save_last_n_steps=2, save_last_n_steps_state=8, save_state=True,
                   sample_every_n_steps=3, sample_prompts=("mychar --w 64 --h 64 --s 2",), **EXACT)
    run_training(stepped, backend)
    got = _weights(tmp_path / "a" / "tiny.safetensors")  # saving and sampling at steps leave the numbers alone
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

    for step in (4, 6):
        state = tmp_path / "a" / f"tiny-step{step:08d}-state"
        assert json.loads((state / "state.json").read_text())["global_step"] == step
        out = tmp_path / f"resumed{step}"
        events = run_training(dataclasses.replace(stepped, output_dir=str(out), resume=str(state)), backend)
        assert next(e for e in events if isinstance(e, Started)).start_step == step and isinstance(events[-1], Done)
        got = _weights(out / "tiny.safetensors")
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"resumed from step {step}"
        # the resumed run saves the later steps only; its list of files names none that save_last_n_steps removed
        assert sorted(p.name for p in out.glob("tiny-step*.safetensors")) == [
            f"tiny-step{s:08d}.safetensors" for s in range(step + 2, 10, 2)]
        assert [_name(f) for f in events[-1].files] == ["tiny-step00000006.safetensors", "tiny-step00000008.safetensors",
                                                         "tiny.safetensors"]
        assert all(Path(f).is_file() for f in events[-1].files)


def _good(tmp_path, **kw) -> TrainConfig:
    data = make_dataset(tmp_path / "img", {"mychar": 1}, per_concept=1)
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    return TrainConfig(pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(tmp_path / "out"), **kw)


@pytest.mark.parametrize("name", ["save_every_n_steps", "sample_every_n_steps", "save_last_n_steps",
                                  "save_last_n_steps_state"])
def test_a_negative_step_count_is_refused_with_its_name(tmp_path, name):
    extra = {"save_every_n_steps": 10} if name.startswith("save_last") else {}
    problems = [p for p in errors_of(validate(_good(tmp_path, **{name: -5, **extra}, sample_prompts=("x",))))
                if p.field == name]
    assert problems and "-5" in problems[0].message and "at least 1" in problems[0].message


def test_step_schedule_warnings_and_missing_prompts(tmp_path):
    # sample_every_n_steps without prompts is an error, as for epochs
    assert [p.field for p in errors_of(validate(_good(tmp_path, sample_every_n_steps=5)))] == ["sample_prompts"]
    # 0 is off (the kohya_ss GUI's value for unset)
    assert errors_of(validate(_good(tmp_path, save_every_n_steps=0, sample_every_n_steps=0))) == []
    # sd-scripts samples by epochs only when both are set; save_last_n_steps needs save_every_n_steps
    warnings = {p.field: p.message for p in validate(_good(tmp_path, sample_every_n_steps=5, sample_every_n_epochs=1,
                                                           sample_prompts=("x",), save_last_n_steps=10))
                if p.severity == "warning"}
    assert "sample_every_n_epochs" in warnings["sample_every_n_steps"]
    assert "save_every_n_steps" in warnings["save_last_n_steps"]


def test_step_options_from_toml_kohya_ss_and_the_cli(tmp_path):
    from lib_lora.train.config_io import load_config_file
    from lib_lora.train.kohya_ss import from_kohya_ss
    from lib_lora.train.state import settings_digest

    toml = tmp_path / "c.toml"
    toml.write_text("save_every_n_steps = 100\nsample_every_n_steps = 50\nsave_last_n_steps = 300\n")
    cfg = load_config_file(toml)
    assert (cfg.save_every_n_steps, cfg.sample_every_n_steps, cfg.save_last_n_steps) == (100, 50, 300)
    gui = from_kohya_ss({"save_every_n_steps": 0, "sample_every_n_steps": "0", "save_last_n_steps": 0})
    assert (gui.save_every_n_steps, gui.sample_every_n_steps, gui.save_last_n_steps) == (None, None, None)
    assert from_kohya_ss({"save_every_n_steps": 200}).save_every_n_steps == 200
    # where and how often files are written is not a changed run: a resume with other step settings is exact
    assert settings_digest(cfg) == settings_digest(TrainConfig())

    import argparse

    from lib_lora.cli.train import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--save_every_n_steps", "200", "--save_last_n_steps", "600", "--save_last_n_steps_state",
                              "400", "--sample_every_n_steps", "100"])
    notes: list[str] = []
    cli = config_from_args(args, notes)
    assert (cli.save_every_n_steps, cli.save_last_n_steps, cli.save_last_n_steps_state, cli.sample_every_n_steps) == (
        200, 600, 400, 100)
    assert not [n for n in notes if "every_n_steps" in n or "last_n_steps" in n]  # used, not "ignored"
