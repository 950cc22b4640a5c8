"""Single-file checkpoints (.safetensors / .ckpt + same-name .yaml) load offline as diffusers components."""

from __future__ import annotations

import socket

import pytest
import torch

pytest.importorskip("diffusers")

from lib_lora.backends import DiffusersBackend, load_backend  # noqa: E402
from lib_lora.backends.single_file import detect_arch, read_checkpoint  # noqa: E402
from lib_lora.errors import BadInput, IncompatibleFile  # noqa: E402
from tests.backends.checkpoints import write_checkpoint  # noqa: E402


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_ckpt_with_yaml_loads_offline_like_the_safetensors(tmp_path, checkpoint_files, no_network):
    ckpt = write_checkpoint("sd2", tmp_path, fmt="ckpt", parameterization="v")
    from_ckpt = load_backend(ckpt)
    from_st = DiffusersBackend.from_single_file(checkpoint_files["sd2"])
    assert (from_ckpt.arch, from_ckpt.prediction_type) == ("sd2", "v_prediction")
    for name, tensor in from_st.unet.state_dict().items():
        assert torch.equal(tensor, from_ckpt.unet.state_dict()[name]), name
    cond = from_ckpt.encode_prompts(["a cat"])
    torch.testing.assert_close(cond.crossattn, from_st.encode_prompts(["a cat"]).crossattn)


def test_prediction_type_given_yaml_or_file_marker(tmp_path):
    eps = write_checkpoint("sd1", tmp_path, name="eps")
    assert DiffusersBackend.from_single_file(eps).prediction_type == "epsilon"
    assert DiffusersBackend.from_single_file(eps, prediction_type="v_prediction").prediction_type == "v_prediction"
    v_yaml = write_checkpoint("sd1", tmp_path, name="vyaml", parameterization="v")
    assert DiffusersBackend.from_single_file(v_yaml).prediction_type == "v_prediction"
    # an explicit config path wins over the same-name yaml
    assert DiffusersBackend.from_single_file(eps, config=v_yaml.with_suffix(".yaml")).prediction_type == "v_prediction"


def test_without_yaml_the_standard_config_applies_and_a_tiny_model_says_so(tmp_path):
    path = write_checkpoint("sd1", tmp_path, yaml=False)
    with pytest.raises(IncompatibleFile, match="does not fit its config"):
        DiffusersBackend.from_single_file(path)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        read_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(IncompatibleFile, match="junk.safetensors"):
        read_checkpoint(junk)
    pickled = tmp_path / "code.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": socket.socket}, str(pickled))  # a pickled class
    with pytest.raises(IncompatibleFile, match="safetensors"):
        read_checkpoint(pickled)
    path = write_checkpoint("sd1", tmp_path, name="noyaml", yaml=False)
    with pytest.raises(BadInput, match="model config not found"):
        DiffusersBackend.from_single_file(path, config=tmp_path / "nope.yaml")


def _keys(*names, in_channels=4):
    state = {name: torch.zeros(1) for name in names}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, in_channels, 3, 3)
    return state


def test_architecture_detection_from_keys():
    assert detect_arch(_keys("cond_stage_model.transformer.text_model.final_layer_norm.weight")) == "sd1"
    assert detect_arch(_keys("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")) == "sd2"
    assert detect_arch(_keys("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                             "conditioner.embedders.1.model.ln_final.weight")) == "sdxl"
    with pytest.raises(IncompatibleFile, match="refiner"):
        detect_arch(_keys("conditioner.embedders.0.model.ln_final.weight"))
    with pytest.raises(IncompatibleFile, match="inpainting"):
        detect_arch(_keys("cond_stage_model.transformer.text_model.final_layer_norm.weight", in_channels=9))
    with pytest.raises(IncompatibleFile, match="not a Stable Diffusion"):
        detect_arch({"foo": torch.zeros(1)})


def test_old_sd1_text_keys_without_text_model_are_accepted():
    from lib_lora.backends.convert import hf_clip_keys

    old = {"embeddings.token_embedding.weight": torch.zeros(1), "embeddings.position_ids": torch.zeros(1),
           "text_model.final_layer_norm.weight": torch.zeros(1)}
    assert sorted(hf_clip_keys(old)) == ["text_model.embeddings.token_embedding.weight",
                                         "text_model.final_layer_norm.weight"]


def test_sdxl_diffusers_folder_loads_both_text_encoders(tmp_path, clip_tokenizer):
    from tests.fixtures.diffusers_models import save_pipeline

    folder = save_pipeline("sdxl", clip_tokenizer, tmp_path / "xl")
    backend = load_backend(folder)
    assert (backend.arch, backend.prediction_type, set(backend.text_encoders)) == ("sdxl", "epsilon", {"te1", "te2"})
    assert type(backend.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert DiffusersBackend.from_pretrained(folder, prediction_type="v").prediction_type == "v_prediction"
    cond = backend.encode_prompts(["a cat"])
    assert cond.crossattn.shape == (1, 77, 64) and cond.pooled.shape == (1, 32)
