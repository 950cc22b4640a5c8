"""The output file: precision, metadata the webui reads, .yaml beside it, overwrite and atomic-write semantics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_lora.cli.merge import parse_lora_spec
from lib_lora.errors import BadInput
from lib_lora.merge import merge_loras
from tests.merge.lora_files import expected_checkpoint, make_lora, raw_tensors, write_lora
from tests.merge.test_merge_formula import SD1_TEXT, SD_UNET

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def sd1_lora(tmp_path, ckpts):
    _, sd = ckpts["sd1"]
    targets = SD_UNET[:6] + SD1_TEXT[:4]
    modules = make_lora(targets, sd)
    path = write_lora(tmp_path / "mylora.safetensors", modules, metadata={"ss_output_name": "my-lora"})
    return path, modules, targets


@pytest.mark.parametrize("precision,dtype,name", [("fp16", torch.float16, "F16"), ("bf16", torch.bfloat16, "BF16")])
def test_half_precision_output(tmp_path, ckpts, sd1_lora, precision, dtype, name):
    path, sd = ckpts["sd1"]
    lora, modules, targets = sd1_lora
    out = tmp_path / "half.safetensors"
    merge_loras(path, [(lora, 0.7)], out, precision=precision)
    _, raw = raw_tensors(out)
    merged = load_file(str(out))
    expected = expected_checkpoint(sd, [(modules, targets, 0.7)])
    for key, tensor in sd.items():
        if key == "alphas_cumprod":  # the noise schedule keeps its precision
            assert raw[key][0] == "F32" and merged[key].equal(tensor)
        elif not tensor.is_floating_point():
            assert merged[key].dtype == tensor.dtype and merged[key].equal(tensor)
        elif key in expected:
            assert raw[key][0] == name
            torch.testing.assert_close(merged[key], expected[key].to(dtype), msg=key)  # fp32 sum, rounded once
        else:
            assert raw[key][0] == name
            assert merged[key].equal(tensor.to(dtype)), key
    assert out.stat().st_size < 0.6 * path.stat().st_size


def test_fp32_precision_upcasts_fp16_weights(tmp_path, ckpts, sd1_lora):
    _, sd = ckpts["sd1"]
    half = tmp_path / "half.safetensors"
    merge_loras(ckpts["sd1"][0], [(sd1_lora[0], 0.0)], half, precision="fp16")
    out = tmp_path / "full.safetensors"
    merge_loras(half, [(sd1_lora[0], 1.0)], out, precision="fp32")
    merged, halves = load_file(str(out)), load_file(str(half))
    key = "first_stage_model.decoder.conv_out.weight"
    assert merged[key].dtype == torch.float32 and merged[key].equal(halves[key].float())


def test_metadata_header_and_readers(tmp_path, ckpts, sd1_lora):
    path, sd = ckpts["sd1"]
    out = tmp_path / "merged-model.safetensors"
    merge_loras(path, [(sd1_lora[0], 1.0)], out)
    data = out.read_bytes()
    assert data[8:10] == b'{"'  # the webui's metadata reader requires this
    meta, _ = raw_tensors(out)
    assert meta["format"] == "pt"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "merged-model"
    assert meta["modelspec.merged_from"] == "base-sd1, my-lora"
    assert '"multiplier": 1.0' in meta["lora_train_merge"]
    assert all(isinstance(v, str) for v in meta.values())
    with safe_open(str(out), framework="pt") as f:  # the safetensors library accepts our writer's layout
        assert f.metadata()["format"] == "pt"
        assert set(f.keys()) == set(sd)
    assert (int.from_bytes(data[:8], "little") + 8) % 8 == 0


def test_input_metadata_is_kept_and_lora_architecture_used(tmp_path, ckpts):
    _, sd = ckpts["sd2"]
    from tests.merge.lora_files import save_checkpoint
    from tests.merge.test_merge_formula import SD2_TEXT

    base = save_checkpoint(tmp_path / "base.safetensors", sd, {"my_note": "keep me", "sshs_model_hash": "stale"})
    modules = make_lora(SD2_TEXT[:3], sd)
    lora = write_lora(tmp_path / "l.safetensors", modules,
                      metadata={"modelspec.architecture": "stable-diffusion-v2-768-v/lora", "modelspec.title": "Vlora"})
    out = tmp_path / "o.safetensors"
    merge_loras(base, [(lora, 1.0)], out)
    meta, _ = raw_tensors(out)
    assert meta["my_note"] == "keep me" and "sshs_model_hash" not in meta
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.merged_from"] == "base, Vlora"


def test_yaml_copied_beside_output(tmp_path, ckpts, sd1_lora):
    path, _ = ckpts["sd1"]
    base = tmp_path / "base.safetensors"
    base.write_bytes(path.read_bytes())
    (tmp_path / "base.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    out_dir = tmp_path / "models"
    report = merge_loras(base, [(sd1_lora[0], 1.0)], out_dir / "merged.safetensors")
    assert report.yaml_copied
    assert (out_dir / "merged.yaml").read_bytes() == (tmp_path / "base.yaml").read_bytes()
    # no yaml beside the input: none written
    merge_loras(path, [(sd1_lora[0], 1.0)], out_dir / "plain.safetensors")
    assert not (out_dir / "plain.yaml").exists()


def test_overwrite_semantics(tmp_path, ckpts, sd1_lora):
    path, _ = ckpts["sd1"]
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(BadInput, match="already exists.*--overwrite"):
        merge_loras(path, [(sd1_lora[0], 1.0)], out)
    assert out.read_bytes() == b"precious"
    merge_loras(path, [(sd1_lora[0], 1.0)], out, overwrite=True)
    assert load_file(str(out)).keys() == load_file(str(path)).keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mylora.safetensors", "out.safetensors"]


def test_interrupt_leaves_nothing_and_keeps_old_file(tmp_path, ckpts, sd1_lora):
    path, _ = ckpts["sd1"]
    calls = []

    def stop_halfway(done, total):
        calls.append((done, total))
        if len(calls) == 50:
            raise KeyboardInterrupt

    out = tmp_path / "out.safetensors"
    with pytest.raises(KeyboardInterrupt):
        merge_loras(path, [(sd1_lora[0], 1.0)], out, progress=stop_halfway)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mylora.safetensors"]  # no temp file, no output
    out.write_bytes(b"old")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        merge_loras(path, [(sd1_lora[0], 1.0)], out, overwrite=True, progress=stop_halfway)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mylora.safetensors", "out.safetensors"]


def test_progress_reaches_file_size(tmp_path, ckpts, sd1_lora):
    path, _ = ckpts["sd1"]
    seen = []
    out = tmp_path / "out.safetensors"
    report = merge_loras(path, [(sd1_lora[0], 1.0)], out, progress=lambda d, t: seen.append((d, t)))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (out.stat().st_size, out.stat().st_size) == (report.bytes_written,) * 2


def test_lora_spec_parsing():
    assert parse_lora_spec("a.safetensors:0.8") == ("a.safetensors", 0.8)
    assert parse_lora_spec("dir/a.safetensors") == ("dir/a.safetensors", 1.0)
    assert parse_lora_spec(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert parse_lora_spec(r"C:\loras\a.safetensors:-0.5") == (r"C:\loras\a.safetensors", -0.5)
    with pytest.raises(BadInput, match="multiplier '0,8' in 'a.safetensors:0,8' is not a number"):
        parse_lora_spec("a.safetensors:0,8")


def test_cli_end_to_end(tmp_path, ckpts, sd1_lora):
    path, _ = ckpts["sd1"]
    out = tmp_path / "cli.safetensors"
    cmd = [sys.executable, "-m", "lib_lora", "merge", "--model", str(path), "--lora", f"{sd1_lora[0]}:0.8",
           "--out", str(out), "--precision", "fp16"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "mylora.safetensors x 0.8: modules merged: te 4, unet 6" in done.stdout
    assert raw_tensors(out)[1][SD_UNET[0][1]][0] == "F16"
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert again.returncode == 1
    assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr


def test_output_file_mode_like_a_plain_open(tmp_path, ckpts, sd1_lora):
    """Readable by whoever could read a file the user created normally (the webui may run as another user)."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    out = tmp_path / "o.safetensors"
    merge_loras(ckpts["sd1"][0], [(sd1_lora[0], 1.0)], out)
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    os.chmod(out, 0o640)
    merge_loras(ckpts["sd1"][0], [(sd1_lora[0], 1.0)], out, overwrite=True)
    assert out.stat().st_mode & 0o777 == 0o640


def test_ckpt_to_safetensors_with_the_same_stem_shares_the_yaml(tmp_path, ckpts, sd1_lora):
    torch.save({"state_dict": ckpts["sd1"][1]}, tmp_path / "model.ckpt")
    (tmp_path / "model.yaml").write_text("model: {}\n")
    report = merge_loras(tmp_path / "model.ckpt", [(sd1_lora[0], 1.0)], tmp_path / "model.safetensors")
    assert not report.yaml_copied and (tmp_path / "model.yaml").read_text() == "model: {}\n"
    assert load_file(str(tmp_path / "model.safetensors")).keys() == ckpts["sd1"][1].keys()
