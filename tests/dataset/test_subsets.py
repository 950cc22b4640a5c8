"""Dataset-config subsets (sd-scripts' [[datasets.subsets]]): one folder each, its own repeats / class tokens / reg
flag / caption extension, images directly in it."""

from __future__ import annotations

import pytest

from lib_lora.dataset.loader import Dataset
from lib_lora.dataset.scan import Subset
from lib_lora.errors import BadInput

from .conftest import add_image, small_options


def _build(tmp_path, *subsets, **kw):
    return Dataset.build(small_options(tmp_path, train_data_dir=None, subsets=tuple(subsets), **kw))


def test_subsets_repeats_class_tokens_caption_extension_and_reg(tmp_path):
    a, b, reg = tmp_path / "a" / "chars", tmp_path / "b" / "chars", tmp_path / "reg"
    add_image(a, "1.png", caption="from txt")
    add_image(a, "2.png")
    (a / "2.caption").write_text("from caption file", encoding="utf-8")
    add_image(b, "1.png", seed=1)
    add_image(reg, "r.png", seed=2)
    ds = _build(tmp_path, Subset(str(a), 3, "tok", caption_extension=".caption"), Subset(str(b), 2),
                Subset(str(reg), 1, "person", is_reg=True))
    by_key = {p.entry.key: p for p in ds.images}
    # a's .txt is not its caption file (.caption is): class tokens; b has neither: empty caption (sd-scripts' rule)
    assert {k: (p.entry.caption, p.entry.repeats) for k, p in by_key.items()} == {
        "train/chars/1.png": ("tok", 3), "train/chars/2.png": ("from caption file", 3),
        "train2/chars/1.png": ("", 2), "reg/reg/r.png": ("person", 1)}
    assert ds.num_train_images == 3 * 2 + 2 and ds.num_reg_images == 1
    assert by_key["reg/reg/r.png"].role == "reg" and by_key["reg/reg/r.png"].repeats == 8  # balanced to the train uses
    assert ds.dataset_dirs() == {"chars": {"n_repeats": 3, "img_count": 3}}  # two folders named chars: one key


def test_missing_or_empty_subset_folders(tmp_path):
    with pytest.raises(BadInput, match="subset 2 of .*image_dir does not exist"):
        add_image(tmp_path / "ok", "1.png")
        _build(tmp_path, Subset(str(tmp_path / "ok")), Subset(str(tmp_path / "gone"), name="subset 2 of [[datasets]] 1"))
    (tmp_path / "empty").mkdir()
    ds = _build(tmp_path, Subset(str(tmp_path / "ok")), Subset(str(tmp_path / "empty"), name="subset 2"))
    assert [s.reason for s in ds.ignored] == ["subset 2 holds no readable image directly in image_dir"]
    with pytest.raises(BadInput, match="no training image in the dataset config's subsets"):
        _build(tmp_path, Subset(str(tmp_path / "empty")), Subset(str(tmp_path / "ok"), is_reg=True))
