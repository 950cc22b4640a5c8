"""The loop on the webui's own model objects (ldm / sgm, through LdmBackend): what the tab runs. No diffusers
needed, so this runs on the webui stack too."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from lib_lora.train.config import TrainConfig
from lib_lora.train.events import Done, Failed, Interrupted, TrainControl, Validation
from tests.fixtures.handback import assert_imports_none_of, model_snapshot, same_model
from tests.fixtures.images import make_dataset
from tests.fixtures.training import at_step, run_training

if importlib.util.find_spec("lib_lora.backends.ldm_backend") is None or importlib.util.find_spec("tests.backends.checkpoints") is None:
    pytest.skip("LdmBackend and its webui-shaped test models are not merged yet", allow_module_level=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tests.backends.checkpoints import write_checkpoint

    folder = tmp_path_factory.mktemp("webui-ckpt")
    return {arch: write_checkpoint(arch, folder, parameterization="eps") for arch in ("sd1", "sdxl")}


def _webui_model(arch, checkpoints):
    from safetensors.torch import load_file

    from tests.backends.checkpoints import tiny_config
    from tests.backends.webui_models import build_sd_model, build_sdxl_model

    state = load_file(str(checkpoints[arch]))
    return build_sdxl_model(state) if arch == "sdxl" else build_sd_model(arch, state, tiny_config(arch, "eps"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("webui-data") / "img", {"mychar": 2, "style": 1}, per_concept=2)


def _cfg(tmp_path, data_dir, **kw):
    base = dict(train_data_dir=str(data_dir), output_dir=str(tmp_path / "out"), output_name="webui", resolution="64",
                network_dim=4, network_alpha=4.0, learning_rate=5e-3, train_batch_size=2, max_train_epochs=2, seed=3,
                save_precision="fp32", cache_latents=True, flip_aug=True, network_dropout=0.1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_webui_model_trains_resumes_exactly_and_is_handed_back(tmp_path, data_dir, checkpoints, arch):
    from safetensors.torch import load_file

    from lib_lora.backends import LdmBackend

    model = _webui_model(arch, checkpoints)
    backend = LdmBackend(model, device="cpu")
    before = model_snapshot(model)
    cfg = _cfg(tmp_path / "a", data_dir, validation_split=0.5 if arch == "sd1" else 0.0,
               network_train_unet_only=arch == "sdxl")
    events = run_training(cfg, backend)
    assert isinstance(events[-1], Done)
    assert same_model(before, model_snapshot(model))
    expected = load_file(str(tmp_path / "a" / "out" / "webui.safetensors"))
    if arch == "sd1":
        vals = [e for e in events if isinstance(e, Validation)]
        assert [v.epoch for v in vals] == [0, 1, 2] and all(v.images == 2 for v in vals)
        assert any(k.startswith("lora_te_") for k in expected)

    # as the tab runs it: the state goes to the project's state/ folder (state_dir), never beside the epochs
    control = TrainControl()
    tab_cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "b" / "out"), state_dir=str(tmp_path / "b" / "state"))
    first = run_training(tab_cfg, backend, control, at_step(2, control.stop))
    assert isinstance(first[-1], Interrupted) and same_model(before, model_snapshot(model))
    assert first[-1].state_path == str(tmp_path / "b" / "state" / "webui-state")
    assert not list((tmp_path / "b" / "out").glob("*state*"))
    resumed = run_training(dataclasses.replace(tab_cfg, resume=first[-1].state_path), backend)
    assert isinstance(resumed[-1], Done) and same_model(before, model_snapshot(model))
    got = load_file(str(tmp_path / "b" / "out" / "webui.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_a_file_that_cannot_be_written_fails_the_run_in_one_line_and_keeps_earlier_epochs(tmp_path, data_dir, checkpoints):
    """A full disk or a folder in the way of an epoch file (here: a directory named like epoch 2's file) is an OSError
    in the middle of a run: it must end as Failed with a one-line message, not a traceback, with epoch 1 kept and the
    model handed back."""
    from lib_lora.backends import LdmBackend

    model = _webui_model("sd1", checkpoints)
    backend = LdmBackend(model, device="cpu")
    before = model_snapshot(model)
    cfg = _cfg(tmp_path, data_dir, save_every_n_epochs=1, network_dropout=None, flip_aug=False)
    blocker = tmp_path / "out" / "webui-02.safetensors"
    blocker.mkdir(parents=True)
    events = run_training(cfg, backend)
    failed = events[-1]
    assert isinstance(failed, Failed), failed
    assert "webui-02.safetensors" in failed.message and "\n" not in failed.message, failed.message
    assert failed.files == (str(tmp_path / "out" / "webui-01.safetensors"),)
    assert (tmp_path / "out" / "webui-01.safetensors").is_file() and blocker.is_dir()
    assert same_model(before, model_snapshot(model))


def test_engine_on_the_webui_path_imports_no_diffusers():
    """What the tab runs (LdmBackend, network, dataset, loop, optimizers and schedules, config files) must not pull
    diffusers in: the webui has none. Checked on the current stack, where diffusers is installed. (Adafactor is left
    out: importing transformers.optimization takes seconds; it is transformers' own and imports no diffusers.)"""
    code = (
        "import sys, torch\n"
        "from lib_lora.backends import LdmBackend\n"
        "import lib_lora.network, lib_lora.dataset, lib_lora.train.loop, lib_lora.train.dryrun, lib_lora.train.kohya_ss\n"
        "from lib_lora.train.config import TrainConfig, OPTIMIZERS, SCHEDULERS\n"
        "from lib_lora.train.config_io import dump_toml, loads_toml\n"
        "from lib_lora.train.optim import build_optimizer\n"
        "from lib_lora.train.validate import validate\n"
        "import importlib.util\n"
        "for opt in OPTIMIZERS:\n"
        "    if opt in ('AdamW8bit', 'Adafactor') or (opt == 'Prodigy' and not importlib.util.find_spec('prodigyopt'))"
        " or (opt == 'Lion' and not importlib.util.find_spec('lion_pytorch')):\n"
        "        continue\n"
        "    for sched in SCHEDULERS:\n"
        "        if sched == 'adafactor':\n"
        "            continue\n"
        "        p = torch.nn.Parameter(torch.zeros(2))\n"
        "        build_optimizer(TrainConfig(optimizer_type=opt, lr_scheduler=sched), [{'params': [p], 'lr': 1e-4}], 10)\n"
        "loads_toml(dump_toml(TrainConfig()))\n"
        "validate(TrainConfig(), need_model_path=False)\n"
    )
    assert_imports_none_of(code, ("diffusers",), timeout=180)


def test_stop_while_caching_on_the_webui_model_trains_nothing_and_hands_it_back(tmp_path, checkpoints):
    """The tab's Interrupt during latent caching: ends after the current VAE batch, not after the whole dataset."""
    from lib_lora.backends import LdmBackend

    class StopsAfterFirstEncode(LdmBackend):
        encodes = 0

        def encode_images(self, pixels, *, sample=True, generator=None):
            out = super().encode_images(pixels, sample=sample, generator=generator)
            StopsAfterFirstEncode.encodes += 1
            control.stop()
            return out

    data_dir = make_dataset(tmp_path / "img", {"mychar": 2, "style": 1}, per_concept=2)  # 4 images: 2 VAE batches
    model = _webui_model("sd1", checkpoints)
    before = model_snapshot(model)
    control = TrainControl()
    events = run_training(_cfg(tmp_path, data_dir, cache_latents_to_disk=True, flip_aug=False),
                          StopsAfterFirstEncode(model, device="cpu"), control)
    assert isinstance(events[-1], Interrupted) and "caching latents" in events[-1].message
    assert StopsAfterFirstEncode.encodes == 1 and len(list(data_dir.rglob("*.latents.npz"))) == 2
    assert not list((tmp_path / "out").glob("*.safetensors"))
    assert same_model(before, model_snapshot(model))
