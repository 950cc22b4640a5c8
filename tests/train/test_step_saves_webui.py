"""Step saves on the webui's own model object (LdmBackend), as the tab / API runs them with the state in the project's
state/ folder: a state saved at a step inside an epoch resumes to the uninterrupted run's weights and the model is
handed back. No diffusers: runs on the webui stack too."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from lib_lora.train.config import TrainConfig
from lib_lora.train.events import Done, Saved
from tests.fixtures.handback import model_snapshot, same_model
from tests.fixtures.images import make_dataset
from tests.fixtures.training import run_training

if importlib.util.find_spec("lib_lora.backends.ldm_backend") is None or importlib.util.find_spec("tests.backends.checkpoints") is None:
    pytest.skip("LdmBackend and its webui-shaped test models are not merged yet", allow_module_level=True)


def test_step_state_on_the_webui_model_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from lib_lora.backends import LdmBackend
    from tests.backends.checkpoints import tiny_config, write_checkpoint
    from tests.backends.webui_models import build_sd_model

    (tmp_path / "ckpt").mkdir()
    state = load_file(str(write_checkpoint("sd1", tmp_path / "ckpt", parameterization="eps")))
    model = build_sd_model("sd1", state, tiny_config("sd1", "eps"))
    backend = LdmBackend(model, device="cpu")
    before = model_snapshot(model)
    # 2 x 2 + 1 x 2 = 6 images, batch 2: 3 steps per epoch; steps 2 and 4 fall inside epochs 1 and 2
    data = make_dataset(tmp_path / "img", {"mychar": 2, "style": 1}, per_concept=2)
    cfg = TrainConfig(train_data_dir=str(data), output_dir=str(tmp_path / "a" / "out"), state_dir=str(tmp_path / "a" / "state"),
                      output_name="webui", resolution="64", network_dim=4, network_alpha=4.0, learning_rate=5e-3,
                      train_batch_size=2, max_train_epochs=2, seed=3, save_precision="fp32", cache_latents=True,
                      flip_aug=True, network_dropout=0.1, save_every_n_steps=2, save_state=True)
    events = run_training(cfg, backend)
    assert isinstance(events[-1], Done) and same_model(before, model_snapshot(model))
    assert [(e.kind, e.step) for e in events if isinstance(e, Saved) and e.step] == [
        ("lora", 2), ("state", 2), ("lora", 4), ("state", 4), ("lora", 6), ("state", 6)]
    assert not list((tmp_path / "a" / "out").glob("*state*"))  # states in state_dir, as the tab keeps them
    expected = load_file(str(tmp_path / "a" / "out" / "webui.safetensors"))

    resumed = dataclasses.replace(cfg, output_dir=str(tmp_path / "b" / "out"), state_dir=str(tmp_path / "b" / "state"),
                                  resume=str(tmp_path / "a" / "state" / "webui-step00000004-state"))
    events = run_training(resumed, backend)
    assert isinstance(events[-1], Done) and same_model(before, model_snapshot(model))
    got = load_file(str(tmp_path / "b" / "out" / "webui.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
