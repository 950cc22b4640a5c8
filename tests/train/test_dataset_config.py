"""sd-scripts' `--dataset_config` file ([general], [[datasets]], [[datasets.subsets]]) on tiny real models: it trains
as the equivalent N_concept folders do, the file wins over the command line as in sd-scripts, and what this trainer
cannot honour (per-subset augmentation, several resolutions, fine-tuning subsets, unknown keys) is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from lib_lora.errors import BadInput
from lib_lora.train.config import TrainConfig
from lib_lora.train.events import Done, StepEnd
from tests.fixtures.images import make_dataset, pattern_image
from tests.fixtures.training import run_training


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """train: 2_mychar (3 images, captions), 3_style (2 images, no captions); reg: 1_person (2 images, no captions)."""
    root = tmp_path_factory.mktemp("dscfg")
    data = make_dataset(root / "img", {"mychar": 2}, per_concept=3)
    make_dataset(data, {"style": 3}, per_concept=2, captions=False)
    reg = make_dataset(root / "reg", {"person": 1}, per_concept=2, captions=False)
    return root, data, reg


def _toml(layout, general: str = "", dataset: str = "", style: str = "", extra: str = "") -> str:
    _, data, reg = layout
    return f"""
[general]
caption_extension = ".txt"
{general}

[[datasets]]
resolution = 64
batch_size = 2
{dataset}

  [[datasets.subsets]]
  image_dir = '{data / "2_mychar"}'
  num_repeats = 2

  [[datasets.subsets]]
  image_dir = '{data / "3_style"}'
  num_repeats = 3
  class_tokens = "style"
  {style}

  [[datasets.subsets]]
  image_dir = '{reg / "1_person"}'
  is_reg = true
  class_tokens = "person"
{extra}"""


def _write(tmp_path, text: str, name: str = "dataset.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _apply(cfg: TrainConfig, notes=None) -> TrainConfig:
    from lib_lora.train.dataset_config import apply_dataset_config

    return apply_dataset_config(cfg, notes)


# ------------------------------------------------------------------------------------------- training, same as folders


@pytest.fixture(scope="module")
def components(clip_tokenizer):
    pytest.importorskip("diffusers")
    from tests.fixtures.diffusers_models import build_components

    return build_components("sd1", clip_tokenizer, seed=3)


def _backend(components):
    from lib_lora.backends import DiffusersBackend

    c = components
    return DiffusersBackend(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], scheduler=c["scheduler"], device="cpu")


def _run(cfg, components):
    events = run_training(cfg, _backend(components))
    assert isinstance(events[-1], Done), events[-1]
    return events


def test_dataset_toml_trains_like_the_equivalent_folders(tmp_path, layout, components):
    from safetensors.torch import load_file

    from lib_lora.network import read_metadata

    _, data, reg = layout
    common = dict(output_name="tiny", network_dim=4, network_alpha=4.0, learning_rate=2e-3, max_train_epochs=1, seed=7,
                  save_precision="fp32", cache_latents=True)
    folders = TrainConfig(train_data_dir=str(data), reg_data_dir=str(reg), resolution="64", train_batch_size=2,
                          output_dir=str(tmp_path / "folders"), **common)
    # the command line's resolution and batch size lose against the file's (sd-scripts' precedence)
    toml = _write(tmp_path, _toml(layout))
    from_file = TrainConfig(dataset_config=str(toml), resolution="128", train_batch_size=1,
                            output_dir=str(tmp_path / "toml"), **common)

    a, b = _run(folders, components), _run(from_file, components)
    steps_a = [(e.step, e.loss) for e in a if isinstance(e, StepEnd)]
    steps_b = [(e.step, e.loss) for e in b if isinstance(e, StepEnd)]
    # 3 x 2 + 2 x 3 = 12 training uses, reg balanced to 12: 24 items at batch 2 = 12 steps
    assert len(steps_a) == 12 and steps_a == steps_b
    wa = load_file(str(tmp_path / "folders" / "tiny.safetensors"))
    wb = load_file(str(tmp_path / "toml" / "tiny.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = read_metadata(tmp_path / "folders" / "tiny.safetensors"), read_metadata(tmp_path / "toml" / "tiny.safetensors")
    for key in ("ss_num_train_images", "ss_num_reg_images", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_resolution",
                "ss_tag_frequency", "ss_batch_size_per_device"):
        assert ma.get(key) == mb.get(key), key
    # the webui card's activation text: folder concept names, or the subsets' class_tokens (mychar's has none)
    assert json.loads((tmp_path / "folders" / "tiny.json").read_text())["activation text"] == "mychar, style"
    assert json.loads((tmp_path / "toml" / "tiny.json").read_text())["activation text"] == "style"
    assert json.loads(mb["ss_dataset_dirs"]) == {"2_mychar": {"n_repeats": 2, "img_count": 3},
                                                "3_style": {"n_repeats": 3, "img_count": 2}}


def test_cli_dry_run_shows_concepts_repeats_buckets_and_says_what_it_ignored(tmp_path, layout, sd1_diffusers_dir, capsys):
    from lib_lora.cli import main

    toml = _write(tmp_path, _toml(layout))
    out = tmp_path / "out"
    code = main(["train", "--pretrained_model_name_or_path", str(sd1_diffusers_dir), "--dataset_config", str(toml),
                 "--train_data_dir", str(tmp_path / "not-there"), "--resolution", "128", "--output_dir", str(out),
                 "--max_train_epochs", "1", "--seed", "1", "--dry_run"])
    captured = capsys.readouterr()
    text = captured.out
    assert code == 0, captured.err
    assert "train_data_dir" in text and "ignored" in text  # as sd-scripts: the folders of the file are used
    assert "resolution" in text and "128" in text  # the file's 64 overrides the command line's 128: said
    assert "steps: 5 images x repeats = 12 + 12 regularization per epoch; batch 2" in text
    assert "2_mychar: 3 images x 2 repeats = 6" in text
    assert "3_style: 2 images x 3 repeats = 6; 2 without caption file (caption: 'style')" in text
    assert "1_person: 2 images (repeats 1, balanced to 12 uses per epoch)" in text
    assert "bucket 64x64: 24 uses per epoch" in text
    assert not out.exists() or not any(out.iterdir())


def test_output_config_keeps_the_dataset_config_and_reads_back(tmp_path, layout, capsys):
    from lib_lora.cli import main
    from lib_lora.train.config_io import load_config_file

    toml = _write(tmp_path, _toml(layout))
    written = tmp_path / "run.toml"
    assert main(["train", "--dataset_config", str(toml), "--output_config", str(written)]) == 0
    cfg = load_config_file(written)
    assert cfg.dataset_config == str(toml) and cfg.resolution == "64" and cfg.train_batch_size == 2
    assert _apply(cfg) == cfg  # applying the file again changes nothing


# ------------------------------------------------------------------------------------------- reading the file


def test_general_datasets_subsets_precedence_and_subset_values(tmp_path, layout):
    from lib_lora.train.dataset_config import dataset_subsets

    toml = _write(tmp_path, _toml(layout, general="flip_aug = true\nkeep_tokens = 1\nshuffle_caption = true",
                                  dataset="keep_tokens = 2\nenable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 128"))
    notes: list[str] = []
    cfg = _apply(TrainConfig(dataset_config=str(toml), keep_tokens=5, flip_aug=False, train_data_dir="x"), notes)
    assert cfg.resolution == "64" and cfg.train_batch_size == 2 and cfg.enable_bucket
    assert (cfg.min_bucket_reso, cfg.max_bucket_reso) == (64, 128)
    assert cfg.flip_aug and cfg.shuffle_caption and cfg.keep_tokens == 2  # datasets over general over command line
    assert cfg.train_data_dir == "" and any("train_data_dir" in n for n in notes)
    subsets = dataset_subsets(cfg)
    assert [(s.num_repeats, s.class_tokens, s.is_reg) for s in subsets] == [(2, None, False), (3, "style", False),
                                                                          (1, "person", True)]
    assert all(s.caption_extension == ".txt" for s in subsets)


def test_relative_image_dir_is_relative_to_the_working_directory(tmp_path, layout, monkeypatch):
    """sd-scripts opens image_dir as written, so a relative one is relative to where training starts."""
    from lib_lora.train.dataset_config import dataset_subsets

    root, data, _ = layout
    elsewhere = tmp_path / "configs"
    elsewhere.mkdir()
    toml = _write(elsewhere, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img/2_mychar'\nnum_repeats = 3\n")
    monkeypatch.chdir(root)
    (subset,) = dataset_subsets(TrainConfig(dataset_config=str(toml)))
    assert subset.image_dir == str(data / "2_mychar") and subset.num_repeats == 3
    monkeypatch.chdir(elsewhere)
    with pytest.raises(BadInput, match=r"subset 1 of \[\[datasets\]\] 1.*image_dir.*img/2_mychar"):
        dataset_subsets(TrainConfig(dataset_config=str(toml)))


def test_json_dataset_config_reads_the_same(tmp_path, layout):
    _, data, _ = layout
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"general": {"flip_aug": True}, "datasets": [
        {"resolution": [64, 64], "batch_size": 3, "subsets": [{"image_dir": str(data / "2_mychar"), "num_repeats": 4}]}]}))
    cfg = _apply(TrainConfig(dataset_config=str(path)))
    assert cfg.resolution == "64,64" and cfg.train_batch_size == 3 and cfg.flip_aug


@pytest.mark.parametrize("where, expected", [
    ("style", r"subset 2 of \[\[datasets\]\] 1 \(image_dir .*3_style.*\) sets flip_aug = True.*subset 1.*False"),
    ("general", None),  # the same value for every subset: fine
])
def test_a_per_subset_value_we_apply_dataset_wide_is_refused_naming_the_subset(tmp_path, layout, where, expected):
    kw = {where: "flip_aug = true"}
    toml = _write(tmp_path, _toml(layout, **kw))
    if expected is None:
        assert _apply(TrainConfig(dataset_config=str(toml))).flip_aug
        return
    with pytest.raises(BadInput, match=expected) as info:
        _apply(TrainConfig(dataset_config=str(toml)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("option", ["keep_tokens = 3", "shuffle_caption = true", "caption_dropout_rate = 0.1",
                                    "color_aug = true", "random_crop = true", "caption_tag_dropout_rate = 0.2"])
def test_every_dataset_wide_augmentation_is_checked_per_subset(tmp_path, layout, option):
    toml = _write(tmp_path, _toml(layout, style=option))
    with pytest.raises(BadInput, match=rf"subset 2 .*{option.split(' ')[0]}"):
        _apply(TrainConfig(dataset_config=str(toml)))


def test_per_subset_caption_extension_repeats_class_tokens_and_reg_are_honoured(tmp_path, layout):
    from lib_lora.train.dataset_config import dataset_subsets

    toml = _write(tmp_path, _toml(layout, style='caption_extension = ".caption"'))
    subsets = dataset_subsets(_apply(TrainConfig(dataset_config=str(toml))))
    assert [s.caption_extension for s in subsets] == [".txt", ".caption", ".txt"]
    assert [s.num_repeats for s in subsets] == [2, 3, 1]


def test_datasets_with_different_resolution_or_batch_size_are_refused(tmp_path, layout):
    _, data, _ = layout
    second = f"\n[[datasets]]\nresolution = 128\n  [[datasets.subsets]]\n  image_dir = '{data / '3_style'}'\n"
    toml = _write(tmp_path, _toml(layout, extra=second))
    with pytest.raises(BadInput, match=r"\[\[datasets\]\] 2 .*resolution = 128.*\[\[datasets\]\] 1.*64"):
        _apply(TrainConfig(dataset_config=str(toml)))
    same = f"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = '{data / '3_style'}'\n"
    notes: list[str] = []
    cfg = _apply(TrainConfig(dataset_config=str(_write(tmp_path, _toml(layout, extra=same), "same.toml"))), notes)
    assert cfg.resolution == "64" and any("[[datasets]]" in n for n in notes)


@pytest.mark.parametrize("text, expected", [
    ("[general]\nflip_agu = true\n", r"unknown key flip_agu in \[general\] \(did you mean flip_aug\?\)"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nnum_repepats = 2\n",
     r"unknown key num_repepats in subset 1 of \[\[datasets\]\] 1"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nresolution = 512\n",
     r"resolution .*subset 1 of \[\[datasets\]\] 1.*\[\[datasets\]\] or \[general\]"),
    ("[general]\nimage_dir = 'x'\n", r"image_dir .*\[general\].*subset"),
    ("[training]\nlearning_rate = 1\n", r"unknown table \[training\]"),
    ("[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 'md.json'\nimage_dir = 'x'\n",
     r"subset 1 of \[\[datasets\]\] 1.*metadata_file.*fine-tuning"),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", r"subset 1 of \[\[datasets\]\] 1 has no image_dir"),
    ("[[datasets]]\nresolution = 64\n", r"\[\[datasets\]\] 1 has no \[\[datasets.subsets\]\]"),
    ("[general]\nflip_aug = true\n", r"no \[\[datasets\]\]"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\ncaption_prefix = 'masterpiece, '\n",
     r"caption_prefix .*subset 1 of \[\[datasets\]\] 1.*does not have"),
    ("[general]\nflip_aug = 'yes please'\n", r"flip_aug.*true or false"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nnum_repeats = 0\n", r"num_repeats 0 .*subset 1"),
    ("not = [toml", r"not valid TOML"),
])
def test_bad_files_are_refused_with_one_line_naming_the_key_and_place(tmp_path, text, expected):
    toml = _write(tmp_path, text)
    with pytest.raises(BadInput, match=expected) as info:
        _apply(TrainConfig(dataset_config=str(toml)))
    assert "\n" not in str(info.value) and str(toml) in str(info.value)


def test_missing_file_and_other_suffix(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        _apply(TrainConfig(dataset_config=str(tmp_path / "none.toml")))
    with pytest.raises(BadInput, match=r"\.toml or \.json"):
        _apply(TrainConfig(dataset_config=str(_write(tmp_path, "x", "d.yaml"))))


def test_validate_and_the_step_preview_use_the_file(tmp_path, layout):
    from lib_lora.train.steps import plan_from_folders
    from lib_lora.train.validate import errors_of, validate

    toml = _write(tmp_path, _toml(layout))
    cfg = TrainConfig(dataset_config=str(toml), output_dir=str(tmp_path / "o"), max_train_epochs=1)
    assert not [p for p in errors_of(validate(cfg, need_model_path=False))]
    plan = plan_from_folders(_apply(cfg))
    assert (plan.train_images, plan.repeated_images, plan.steps_per_epoch) == (5, 12, 12)
    bad = TrainConfig(dataset_config=str(_write(tmp_path, "[general]\nflip_agu = 1\n", "bad.toml")),
                      output_dir=str(tmp_path / "o"))
    fields = {p.field for p in errors_of(validate(bad, need_model_path=False))}
    assert fields == {"dataset_config"}


def test_cli_unknown_key_is_one_error_line_before_any_model(tmp_path, capsys):
    from lib_lora.cli import main

    toml = _write(tmp_path, "[general]\nflip_agu = true\n")
    code = main(["train", "--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--dataset_config", str(toml),
                 "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "flip_agu" in err and "did you mean flip_aug" in err


def test_subset_without_class_tokens_or_captions_trains_on_an_empty_caption(tmp_path):
    """sd-scripts' rule: no caption file and no class_tokens -> an empty caption (with a warning)."""
    from lib_lora.train.state import build_dataset

    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(2):
        pattern_image(i).save(folder / f"{i}.png")
    toml = _write(tmp_path, f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{folder}'\n")
    ds = build_dataset(TrainConfig(dataset_config=str(toml), seed=1))
    assert [p.entry.caption for p in ds.images] == ["", ""]
    assert ds.num_train_images == 2 and ds.dataset_dirs() == {"plain": {"n_repeats": 1, "img_count": 2}}


def test_train_refuses_a_dataset_not_built_from_the_dataset_config(tmp_path, layout):
    """A host that builds the dataset from its own folder while dataset_config is set would train other images with
    the file's settings: refused before anything runs."""
    from lib_lora.dataset import Dataset, DatasetOptions
    from lib_lora.train.loop import train

    _, data, _ = layout
    folders = Dataset.build(DatasetOptions(train_data_dir=str(data), resolution=64))
    cfg = TrainConfig(dataset_config=str(_write(tmp_path, _toml(layout))), output_dir=str(tmp_path / "o"))
    with pytest.raises(BadInput, match="dataset_config is set but the dataset was not built from it"):
        train(cfg, None, folders)
