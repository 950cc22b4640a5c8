"""`python -m lib_lora train --vae FILE`: the latents the run trains on are the given VAE's (the same as a model
folder with that VAE built in), not the model's own; cached latents of the other VAE are not reused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from lib_lora.cli import main
from tests.fixtures.images import make_dataset
from tests.fixtures.vae_files import tiny_ldm_shaped_vae, write_vae_file

needs_diffusers = pytest.mark.skipif(__import__("importlib").util.find_spec("diffusers") is None, reason="needs diffusers")


def _args(model, data, out, *extra):
    return ["train", "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--output_name", "v", "--resolution", "64", "--network_dim", "4", "--train_batch_size", "2", "--seed", "3",
            "--max_train_steps", "1", "--cache_latents_to_disk", *extra]


def _latents(data) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(data.rglob("*.latents.npz")):
        with np.load(f) as z:
            out[f.name] = z["latents"].copy()
    return out


@needs_diffusers
def test_cli_trains_on_the_given_vaes_latents(tmp_path, sd1_diffusers_dir, capsys):
    vae = tiny_ldm_shaped_vae(seed=11)
    vae_file = write_vae_file(vae, tmp_path / "my-vae.safetensors")
    # the reference: the same model with that VAE built in
    baked = tmp_path / "baked"
    shutil.copytree(sd1_diffusers_dir, baked)
    shutil.rmtree(baked / "vae")
    vae.save_pretrained(str(baked / "vae"))

    shared = make_dataset(tmp_path / "data" / "img", {"cat": 1}, per_concept=2)
    other = make_dataset(tmp_path / "data2" / "img", {"cat": 1}, per_concept=2)

    assert main(_args(sd1_diffusers_dir, shared, tmp_path / "own")) == 0
    own = _latents(shared)
    assert len(own) == 2
    assert main(_args(sd1_diffusers_dir, shared, tmp_path / "given", "--vae", str(vae_file))) == 0
    given = _latents(shared)  # the same folder: the own VAE's cached latents must not be reused
    assert main(_args(baked, other, tmp_path / "ref")) == 0
    ref = _latents(other)
    capsys.readouterr()
    assert set(given) == set(ref) == set(own)
    for name in given:
        assert np.allclose(given[name], ref[name], atol=1e-5), name
        assert not np.allclose(given[name], own[name], atol=1e-2), name
    # and the LoRA trained on them is the baked model's LoRA
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "given" / "v.safetensors")), load_file(str(tmp_path / "ref" / "v.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


@needs_diffusers
def test_cli_refuses_a_file_that_is_not_a_vae_with_one_line(tmp_path, sd1_diffusers_dir, capsys):
    from safetensors.torch import save_file

    data = make_dataset(tmp_path / "img", {"cat": 1}, per_concept=1)
    bad = tmp_path / "not-a-vae.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(bad))
    assert main(_args(sd1_diffusers_dir, data, tmp_path / "out", "--vae", str(bad))) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert err == [err[0]] and "not-a-vae.safetensors is not a VAE" in err[0]
    assert not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True


def test_validate_says_a_host_model_ignores_vae(tmp_path):
    from lib_lora.train.config import TrainConfig
    from lib_lora.train.validate import validate

    data = make_dataset(tmp_path / "img", {"cat": 1}, per_concept=1)
    cfg = TrainConfig(train_data_dir=str(data), output_dir=str(tmp_path / "o"), vae=str(tmp_path / "missing.safetensors"))
    cli = [p for p in validate(cfg) if p.field == "vae"]
    assert [(p.severity, "does not exist" in p.message) for p in cli] == [("error", True)]
    host = [p for p in validate(cfg, need_model_path=False) if p.field == "vae"]
    assert [(p.severity, "own VAE" in p.message) for p in host] == [("warning", True)]
