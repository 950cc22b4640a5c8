"""Caption files: encodings read, batches journaled, undo byte-exact, nothing half-written."""

from pathlib import Path

import pytest

from lib_lora.captions import read_caption, split_tags, undo_history, undo_last, write_captions
from lib_lora.errors import BadInput


def test_read_caption_encodings(tmp_path):
    (tmp_path / "a.txt").write_bytes("1girl, café\n".encode("utf-8"))
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbf" + "smile, blush".encode("utf-8"))
    (tmp_path / "c.txt").write_bytes("naïve, tag".encode("cp1252"))
    (tmp_path / "d.txt").write_bytes("solo, hat".encode("utf-16"))
    assert read_caption(tmp_path / "a.txt") == "1girl, café"
    assert read_caption(tmp_path / "b.txt") == "smile, blush"
    assert read_caption(tmp_path / "c.txt") == "naïve, tag"
    assert read_caption(tmp_path / "d.txt") == "solo, hat"


def test_split_tags_keeps_weights_and_sentences():
    assert split_tags(" a,(b:1.2) ,, long_hair ") == ["a", "(b:1.2)", "long_hair"]
    assert split_tags("a photo of a cat on a sofa") == ["a photo of a cat on a sofa"]


def test_write_then_undo_restores_bytes(tmp_path):
    original = "naïve, tag".encode("cp1252")  # not UTF-8: undo must give back these exact bytes
    (tmp_path / "1.txt").write_bytes(original)
    entry = write_captions(tmp_path, {tmp_path / "1.txt": "new, caption", tmp_path / "2.txt": "created"}, "edit")
    assert entry is not None and entry.files == 2
    assert read_caption(tmp_path / "1.txt") == "new, caption"
    assert (tmp_path / "2.txt").read_text(encoding="utf-8") == "created\n"
    assert [e.label for e in undo_history(tmp_path)] == ["edit"]
    undone = undo_last(tmp_path)
    assert undone is not None and undone.label == "edit"
    assert (tmp_path / "1.txt").read_bytes() == original
    assert not (tmp_path / "2.txt").exists()
    assert undo_last(tmp_path) is None


def test_unchanged_captions_are_not_written(tmp_path):
    (tmp_path / "1.txt").write_text("same", encoding="utf-8")
    assert write_captions(tmp_path, {tmp_path / "1.txt": "same"}, "noop") is None
    assert undo_history(tmp_path) == []


def test_missing_folder_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        write_captions(tmp_path / "nope", {}, "x")
