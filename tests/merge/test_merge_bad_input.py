"""Bad input: a one-line message that names the problem, and nothing written."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_lora.cli import main
from lib_lora.errors import BadInput, IncompatibleFile
from lib_lora.merge import merge_loras
from tests.merge.lora_files import make_lora, write_lora
from tests.merge.test_merge_formula import SD1_TEXT, SD_UNET, SDXL_TEXT, SDXL_UNET


def only_inputs_left(folder: Path, *names: str) -> bool:
    return sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.fixture()
def sd1_lora(tmp_path, ckpts):
    modules = make_lora(SD_UNET[:3] + SD1_TEXT[:3], ckpts["sd1"][1])
    return write_lora(tmp_path / "good.safetensors", modules)


def expect_error(exc_type, pattern, *args, **kwargs):
    with pytest.raises(exc_type, match=pattern) as info:
        merge_loras(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_sdxl_lora_into_sd1(tmp_path, ckpts):
    modules = make_lora(SDXL_UNET + SDXL_TEXT, ckpts["sdxl"][1])
    lora = write_lora(tmp_path / "xl.safetensors", modules)
    out = tmp_path / "out.safetensors"
    msg = expect_error(IncompatibleFile, "does not fit this SD1 checkpoint", ckpts["sd1"][0], [(lora, 1.0)], out)
    total = len(SDXL_UNET) + len(SDXL_TEXT)
    assert f"of {total} modules have no matching weight" in msg
    assert "lora_te1_text_model_encoder_layers_0" in msg or "lora_unet_" in msg
    assert "it looks like an SDXL LoRA" in msg
    assert only_inputs_left(tmp_path, "xl.safetensors")


def test_sd1_lora_into_sdxl(tmp_path, ckpts, sd1_lora):
    msg = expect_error(IncompatibleFile, "does not fit this SDXL checkpoint", ckpts["sdxl"][0], [(sd1_lora, 1.0)],
                       tmp_path / "out.safetensors")
    assert "lora_te_text_model" in msg or "lora_unet_down_blocks_0" in msg
    assert only_inputs_left(tmp_path, "good.safetensors")


def test_lora_that_matches_nothing(tmp_path, ckpts):
    gen = torch.Generator().manual_seed(0)
    lora = write_lora(tmp_path / "odd.safetensors", {
        "lora_unet_not_a_layer": (torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen), None),
        "lora_te_text_model_nothing": (torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen), None),
    })
    expect_error(IncompatibleFile, r"none of its 2 modules matches a weight \(e.g. lora_te_text_model_nothing, lora_unet_not_a_layer\)",
                 ckpts["sd1"][0], [(lora, 1.0)], tmp_path / "out.safetensors")
    assert only_inputs_left(tmp_path, "odd.safetensors")


def test_wrong_shape_is_refused(tmp_path, ckpts):
    name, key, _ = SD_UNET[2]  # attn2.to_k, in = context width 32
    gen = torch.Generator().manual_seed(0)
    lora = write_lora(tmp_path / "w.safetensors", {name: (torch.randn(4, 48, generator=gen),
                                                          torch.randn(32, 4, generator=gen), None)})
    expect_error(IncompatibleFile, rf"1 of 1 modules have the wrong shape \(e.g. {name} 32x48 vs 32x32\)",
                 ckpts["sd1"][0], [(lora, 1.0)], tmp_path / "out.safetensors")
    assert only_inputs_left(tmp_path, "w.safetensors")


def test_partly_missing_modules_refused_unless_allowed(tmp_path, ckpts):
    sd = ckpts["sd1"][1]
    modules = make_lora(SD_UNET[:2], sd)
    modules["lora_unet_down_blocks_7_attentions_0_proj_in"] = tuple(t.clone() for t in modules[SD_UNET[0][0]])
    lora = write_lora(tmp_path / "p.safetensors", modules)
    out = tmp_path / "out.safetensors"
    expect_error(IncompatibleFile, r"1 of 3 modules have no matching weight \(e.g. lora_unet_down_blocks_7",
                 ckpts["sd1"][0], [(lora, 1.0)], out)
    assert not out.exists()
    report = merge_loras(ckpts["sd1"][0], [(lora, 1.0)], out, allow_missing=True)
    assert report.not_found == ["lora_unet_down_blocks_7_attentions_0_proj_in"]
    assert report.modules_merged == {"unet": 2}


def test_corrupt_and_truncated_files(tmp_path, ckpts, sd1_lora):
    model = ckpts["sd1"][0]
    out = tmp_path / "out.safetensors"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    expect_error(IncompatibleFile, "junk.safetensors is not a safetensors file", model, [(junk, 1.0)], out)

    cut_lora = tmp_path / "cut.safetensors"
    cut_lora.write_bytes(sd1_lora.read_bytes()[:-100])
    expect_error(IncompatibleFile, "cut.safetensors is truncated", model, [(cut_lora, 1.0)], out)

    cut_model = tmp_path / "cutmodel.safetensors"
    cut_model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    expect_error(IncompatibleFile, "cutmodel.safetensors is truncated", cut_model, [(sd1_lora, 1.0)], out)

    bad_json = tmp_path / "badjson.safetensors"
    bad_json.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    expect_error(IncompatibleFile, "header is not JSON", bad_json, [(sd1_lora, 1.0)], out)

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    expect_error(IncompatibleFile, "empty.safetensors is not a safetensors file", model, [(empty, 1.0)], out)
    assert not out.exists()


def test_missing_files(tmp_path, ckpts, sd1_lora):
    out = tmp_path / "out.safetensors"
    expect_error(BadInput, "model file not found: .*nope.safetensors", tmp_path / "nope.safetensors",
                 [(sd1_lora, 1.0)], out)
    expect_error(BadInput, "LoRA file not found: .*gone.safetensors", ckpts["sd1"][0],
                 [(tmp_path / "gone.safetensors", 1.0)], out)
    expect_error(BadInput, "no LoRA file given", ckpts["sd1"][0], [], out)
    assert not out.exists()


@pytest.mark.parametrize("name,pattern", [
    ("bad..name.safetensors", r"may not contain '\.\.'"),
    ("a\\b.safetensors", "may not contain"),
    ("x:y.safetensors", "may not contain ':'"),
    ("model.ckpt", "must end in .safetensors"),
])
def test_bad_output_names(tmp_path, ckpts, sd1_lora, name, pattern):
    expect_error(BadInput, pattern, ckpts["sd1"][0], [(sd1_lora, 1.0)], tmp_path / "sub" / name)
    assert not (tmp_path / "sub").exists()


def test_output_path_with_folders_is_fine(tmp_path, ckpts, sd1_lora):
    out = tmp_path / "a" / "b" / ".." / "c" / "merged.safetensors"
    merge_loras(ckpts["sd1"][0], [(sd1_lora, 1.0)], out)
    assert (tmp_path / "a" / "c" / "merged.safetensors").is_file()


def test_same_file_as_input_or_lora(tmp_path, ckpts, sd1_lora):
    model = tmp_path / "model.safetensors"
    model.write_bytes(ckpts["sd1"][0].read_bytes())
    before = model.read_bytes()
    expect_error(BadInput, "same file as input model.safetensors", model, [(sd1_lora, 1.0)], model, overwrite=True)
    expect_error(BadInput, "same file as input good.safetensors", model, [(sd1_lora, 1.0)], sd1_lora, overwrite=True)
    link = tmp_path / "link.safetensors"
    os.symlink(model, link)
    expect_error(BadInput, "same file as input", model, [(sd1_lora, 1.0)], link, overwrite=True)
    assert model.read_bytes() == before


class _Payload:
    """Unpickling this would create a file: the merge must never do it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_ckpt_needing_code_is_refused_without_running_it(tmp_path, ckpts, sd1_lora):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    with open(ckpt, "wb") as fh:
        pickle.dump({"state_dict": {"x": 1}, "payload": _Payload(str(marker))}, fh, protocol=2)
    assert not marker.exists()
    expect_error(IncompatibleFile, r"evil.ckpt holds Python objects besides tensors \(\S+\) .*weights_only", ckpt, [(sd1_lora, 1.0)], tmp_path / "o.safetensors")
    assert not marker.exists()

    torch.save({"state_dict": ckpts["sd1"][1], "cfg": _Payload(str(marker))}, tmp_path / "evil2.ckpt")
    expect_error(IncompatibleFile, "evil2.ckpt .*weights_only", tmp_path / "evil2.ckpt", [(sd1_lora, 1.0)],
                 tmp_path / "o.safetensors")
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(bytes(range(256)) * 4)
    expect_error(IncompatibleFile, "broken.ckpt is not a readable checkpoint", broken, [(sd1_lora, 1.0)],
                 tmp_path / "o.safetensors")


def test_not_a_checkpoint_and_not_a_lora(tmp_path, ckpts, sd1_lora):
    out = tmp_path / "o.safetensors"
    # a LoRA given as the model
    expect_error(IncompatibleFile, "good.safetensors is not a Stable Diffusion checkpoint", sd1_lora,
                 [(sd1_lora, 1.0)], out)
    # a checkpoint given as the LoRA
    expect_error(IncompatibleFile, "sd1.safetensors is not a LoRA file", ckpts["sd1"][0],
                 [(ckpts["sd1"][0], 1.0)], out)
    # LoHa / DoRA are refused by name, never half-applied
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)},
              str(tmp_path / "loha.safetensors"))
    expect_error(IncompatibleFile, "is a LoHa file", ckpts["sd1"][0], [(tmp_path / "loha.safetensors", 1.0)], out)
    others = {
        "DoRA": {"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 2),
                 "lora_unet_x.dora_scale": torch.ones(1, 2)},
        "LoKr": {"lora_unet_x.lokr_w1": torch.zeros(2, 2), "lora_unet_x.lokr_w2": torch.zeros(2, 2)},
        "IA3": {"lora_unet_x.weight": torch.zeros(2), "lora_unet_x.on_input": torch.zeros(())},
        "OFT": {"lora_unet_x.oft_blocks": torch.zeros(1, 2, 2), "lora_unet_x.alpha": torch.tensor(1.0)},
        "GLoRA": {f"lora_unet_x.{p}.weight": torch.zeros(2, 2) for p in ("a1", "a2", "b1", "b2")},
        "full diff": {"lora_unet_x.diff": torch.zeros(2, 2)},
    }
    for kind, tensors in others.items():
        save_file(tensors, str(tmp_path / "other.safetensors"))
        expect_error(IncompatibleFile, f"is a {kind} file", ckpts["sd1"][0], [(tmp_path / "other.safetensors", 1.0)], out)
    assert not out.exists()


def test_nan_lora_and_bad_settings(tmp_path, ckpts):
    sd = ckpts["sd1"][1]
    modules = make_lora(SD_UNET[:2], sd)
    down, up, alpha = modules[SD_UNET[1][0]]
    up = up.clone()
    up[0, 0] = float("nan")
    modules[SD_UNET[1][0]] = (down, up, alpha)
    lora = write_lora(tmp_path / "nan.safetensors", modules)
    out = tmp_path / "o.safetensors"
    expect_error(IncompatibleFile, "holds NaN", ckpts["sd1"][0], [(lora, 1.0)], out)
    assert only_inputs_left(tmp_path, "nan.safetensors")
    expect_error(BadInput, "precision must be one of", ckpts["sd1"][0], [(lora, 1.0)], out, precision="fp8")
    expect_error(BadInput, "must be a finite number", ckpts["sd1"][0], [(lora, float("inf"))], out)


def test_alpha_without_weights_is_ignored_and_reported(tmp_path, ckpts, sd1_lora):
    """An `.alpha` with no down / up beside it changes nothing (sd-scripts ignores it): merged, and said so."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(sd1_lora))
    state["lora_unet_conv_in.alpha"] = torch.tensor(4.0)
    lora = tmp_path / "extra-alpha.safetensors"
    save_file(state, str(lora))
    report = merge_loras(ckpts["sd1"][0], [(lora, 1.0)], tmp_path / "o.safetensors")
    plain = merge_loras(ckpts["sd1"][0], [(sd1_lora, 1.0)], tmp_path / "p.safetensors")
    merged, reference = load_file(str(tmp_path / "o.safetensors")), load_file(str(tmp_path / "p.safetensors"))
    assert merged.keys() == reference.keys() and all(torch.equal(merged[k], reference[k]) for k in reference)
    assert report.tensors_changed == plain.tensors_changed
    assert report.loras[0].ignored_keys == ["lora_unet_conv_in.alpha"]
    assert "1 key ignored (alpha without lora_down / lora_up)" in report.summary()


@pytest.mark.parametrize("multiplier", [1e40, -1e39])
def test_multiplier_beyond_float32_is_a_one_line_error(tmp_path, ckpts, sd1_lora, multiplier):
    """`--lora a.safetensors:1e40` is finite in Python but not in float32: it ended in a RuntimeError traceback."""
    expect_error(BadInput, "too large", ckpts["sd1"][0], [(sd1_lora, multiplier)], tmp_path / "o.safetensors")
    assert only_inputs_left(tmp_path, "good.safetensors")


def test_disk_full(tmp_path, ckpts, sd1_lora, monkeypatch):
    import shutil

    from lib_lora.merge import safetensors_io

    out = tmp_path / "o.safetensors"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    expect_error(BadInput, "not enough disk space for o.safetensors", ckpts["sd1"][0], [(sd1_lora, 1.0)], out)
    monkeypatch.undo()

    real_copy = safetensors_io.SafetensorsFile.copy_raw
    calls = []

    def fill_up(self, key, fh):  # the disk fills while the output is being written
        calls.append(key)
        if len(calls) > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(self, key, fh)

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "copy_raw", fill_up)
    expect_error(BadInput, "disk full while writing o.safetensors", ckpts["sd1"][0], [(sd1_lora, 1.0)], out)
    assert only_inputs_left(tmp_path, "good.safetensors")


def test_too_little_space_names_sizes_a_user_can_compare(tmp_path, ckpts, sd1_lora, monkeypatch):
    """Free space above the file's size but below the safety margin: the message must not read 'needs 0.01 GiB,
    0.01 GiB free' (sizes rounded to GiB, margin unsaid), which looks like enough."""
    import shutil

    size = merge_loras(ckpts["sd1"][0], [(sd1_lora, 1.0)], tmp_path / "probe.safetensors").bytes_written
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=size + 2**20))
    message = expect_error(BadInput, "not enough disk space", ckpts["sd1"][0], [(sd1_lora, 1.0)], tmp_path / "o.safetensors")
    assert f"needs {size / 2**20:.1f} MiB + 16 MiB headroom, {(size + 2**20) / 2**20:.1f} MiB free" in message
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("case", ["wrong-arch", "missing", "exists", "bad-name"])
def test_cli_messages_are_one_line(tmp_path, ckpts, sd1_lora, capsys, case):
    out = tmp_path / "o.safetensors"
    model, lora = str(ckpts["sd1"][0]), f"{sd1_lora}:0.5"
    if case == "wrong-arch":
        model = str(ckpts["sdxl"][0])
    elif case == "missing":
        lora = str(tmp_path / "missing.safetensors")
    elif case == "exists":
        out.write_bytes(b"x")
    else:
        out = tmp_path / "..o.safetensors"
    code = main(["merge", "--model", model, "--lora", lora, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["good.safetensors"] + (["o.safetensors"] if case == "exists" else []))

