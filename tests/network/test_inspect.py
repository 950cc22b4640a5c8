"""`python -m lib_lora inspect`: what a user sees for our files, foreign files and broken files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lib_lora.cli import main
from lib_lora.network import LoraNetwork, NetworkConfig, build_metadata, find_targets, save_lora

LOCON = NetworkConfig.from_args(4, 2.0, ["conv_dim=2", "conv_alpha=1"])


@pytest.fixture(scope="module")
def our_file(tmp_path_factory):
    from tests.fixtures.ldm_models import clip_embedder, ldm_unet

    net = LoraNetwork(find_targets(ldm_unet("sd1"), {"lora_te": clip_embedder()}, "sd1", LOCON), LOCON)
    meta = build_metadata(
        arch="sd1", output_name="mylora", network=LOCON, resolution=(512, 512), epoch=3, steps=360,
        base_model="v1-5.safetensors", tag_frequency={"10_mychar": {"mychar": 12, "smile": 3, "1girl": 9}},
        training={"num_epochs": 10},
    )
    return save_lora(tmp_path_factory.mktemp("inspect") / "mylora-03.safetensors", net, meta, "fp16")


def run_cli(capsys, *args):
    code = main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_text_output_of_our_file(capsys, our_file):
    code, out, err = run_cli(capsys, our_file)
    assert code == 0 and err == ""
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    lines = {k.strip(): v.strip() for k, v in lines.items()}
    assert lines["architecture"].startswith("SD1")
    assert lines["network"].startswith("LoCon")
    assert lines["dim / alpha"] == "linear 4 / 2 (scale 0.5), conv 2 / 1 (scale 0.5)"  # the scale kohya users reason in
    assert lines["modules"] == "UNet 79, TE 12"
    assert lines["output name"] == "mylora-03"
    assert lines["base model"] == "v1-5.safetensors"
    assert (lines["epoch"], lines["epochs"], lines["steps"], lines["resolution"]) == ("3", "10", "360", "(512, 512)")
    assert lines["top tags"] == "mychar (12), 1girl (9), smile (3)"
    assert "= sshs_model_hash" in lines["model hash"]


def test_json_output(capsys, our_file):
    code, out, _ = run_cli(capsys, our_file, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["architecture"] == "SD1" and info["network_type"] == "LoCon"
    assert info["modules"] == {"unet": 79, "te": 12}
    assert info["dim_alpha"] == {"linear": {"dim": 4, "alpha": 2.0}, "conv": {"dim": 2, "alpha": 1.0}}
    assert info["per_module"] is None
    assert info["hashes"]["stored_matches"] is True and len(info["hashes"]["short_hash"]) == 12


def test_foreign_file_without_metadata_and_varying_ranks(tmp_path, capsys):
    path = tmp_path / "foreign.safetensors"
    save_file({
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_A.weight": torch.zeros(8, 768),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_B.weight": torch.zeros(3072, 8),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(16, 1280),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 16),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(8.0),
    }, str(path))
    code, out, _ = run_cli(capsys, path, "--json")
    info = json.loads(out)
    assert info["architecture"] == "SDXL" and "keys" in info["architecture_source"]
    assert info["modules"] == {"unet": 0, "te1": 1, "te2": 1}
    assert info["dim_alpha"]["linear"] == {"dim": [8, 16], "alpha": [8.0, None]}
    assert info["per_module"]["lora_te1_text_model_encoder_layers_0_mlp_fc1"] == {"dim": 8, "alpha": None}
    assert info["hashes"]["stored_matches"] is None
    code, out, _ = run_cli(capsys, path)
    assert "per module:" in out and "none (the webui will list it as 'Unknown'" in out


def test_loha_is_named(tmp_path, capsys):
    path = tmp_path / "loha.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(320, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b": torch.zeros(4, 320)}, str(path))
    code, out, _ = run_cli(capsys, path, "--json")
    assert code == 0 and json.loads(out)["network_type"] == "LoHa"


def test_a_checkpoint_is_not_described_as_a_lora(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4)}, str(path))
    code, out, err = run_cli(capsys, path)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "model.safetensors is not a kohya LoRA file" in err and "checkpoint" in err


@pytest.mark.parametrize("content,reason", [
    (None, "no such file"),
    (b"\x00" * 3, "empty or truncated"),
    (b"\xff" * 64, "not a safetensors file"),
])
def test_bad_files_get_a_one_line_error(tmp_path, capsys, content, reason):
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run_cli(capsys, path)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and reason in err


def test_a_broken_alpha_is_flagged_and_json_stays_standard(tmp_path, capsys):
    """`--json` is for machines: NaN is not JSON (jq and strict parsers reject it); the text names the module."""
    path = tmp_path / "diverged.safetensors"
    save_file({
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(float("nan")),
        "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_down.weight": torch.zeros(4, 3072),
        "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_up.weight": torch.zeros(768, 4),
        "lora_te_text_model_encoder_layers_0_mlp_fc2.alpha": torch.tensor(2.0),
    }, str(path))

    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    code, out, _ = run_cli(capsys, path, "--json")
    info = json.loads(out, parse_constant=strict)
    assert code == 0
    assert info["per_module"]["lora_te_text_model_encoder_layers_0_mlp_fc1"]["alpha"] == "nan"
    assert any("lora_te_text_model_encoder_layers_0_mlp_fc1" in p and "not a finite number" in p
               for p in info["problems"])
    code, out, _ = run_cli(capsys, path)
    lines = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    assert code == 0 and "lora_te_text_model_encoder_layers_0_mlp_fc1" in lines["problems"]
    assert lines["dim / alpha"] == "linear 4 / varies (2, nan)"


def _peft_file(path, prefix_unet, prefix_te, te_width=32, context=2048, extra=None):
    """A diffusers/PEFT-named LoRA (lora_A / lora_B, dotted module paths, no alpha), as diffusers or PEFT save it."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    modules = [(f"{prefix_unet}down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", context, 64),
               (f"{prefix_unet}down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 64, 64),
               (f"{prefix_te}text_model.encoder.layers.0.self_attn.q_proj", te_width, te_width)]
    for name, width_in, width_out in modules + list(extra or ()):
        tensors[f"{name}.lora_A.weight"] = torch.randn(8, width_in, generator=gen)
        tensors[f"{name}.lora_B.weight"] = torch.zeros(width_out, 8)
    save_file(tensors, str(path))
    return path


def test_a_peft_named_file_is_described_like_the_merge_reads_it(tmp_path, capsys):
    path = _peft_file(tmp_path / "pytorch_lora_weights.safetensors", "unet.", "text_encoder.",
                      extra=[("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", 32, 128)])
    code, out, err = run_cli(capsys, path, "--json")
    assert code == 0 and err == "", err
    info = json.loads(out)
    assert info["architecture"] == "SDXL" and info["network_type"] == "LoRA"
    assert info["modules"] == {"unet": 2, "te1": 1, "te2": 1}
    assert info["dim_alpha"] == {"linear": {"dim": 8, "alpha": None}}
    assert info["naming"].startswith("PEFT/diffusers")
    assert "lib_lora merge" in info["naming"] and "A1111" in info["naming"]
    code, out, _ = run_cli(capsys, path)
    assert code == 0 and "naming:" in out and "PEFT/diffusers" in out and "not a kohya" not in out
    # a raw PEFT state dict (base_model.model.<diffusers UNet path>), SD1 by its cross-attention width
    raw = _peft_file(tmp_path / "adapter_model.safetensors", "base_model.model.", "base_model.model.", te_width=768,
                     context=768)
    code, out, _ = run_cli(capsys, raw, "--json")
    info = json.loads(out)
    assert code == 0 and info["architecture"] == "SD1" and info["modules"] == {"unet": 2, "te": 1}


def test_our_file_is_kohya_named(capsys, our_file):
    info = json.loads(run_cli(capsys, our_file, "--json")[1])
    assert info["naming"] == "kohya"
