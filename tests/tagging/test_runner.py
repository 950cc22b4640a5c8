"""The tagging runner on real folders with the tiny WD14 model: modes, undo, bad input, batching, interrupts, CLI."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("onnxruntime")

from lib_lora.captions import JOURNAL_DIR, read_caption, undo_history, undo_last  # noqa: E402
from lib_lora.cli import main  # noqa: E402
from lib_lora.errors import BadInput  # noqa: E402
from lib_lora.tagging.runner import iter_tagged, merge_caption, plan_tagging, tag_folder  # noqa: E402
from lib_lora.tagging.wd14 import Wd14Tagger  # noqa: E402
from tests.fixtures.images import pattern_image  # noqa: E402
from tests.fixtures.tiny_wd14 import build_tiny_wd14  # noqa: E402

COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0), "black": (0, 0, 0), "white": (255, 255, 255)}


@pytest.fixture(scope="module")
def wd14_dir(tmp_path_factory) -> Path:
    return build_tiny_wd14(tmp_path_factory.mktemp("wd14"))


@pytest.fixture(scope="module")
def tagger(wd14_dir):
    with Wd14Tagger(wd14_dir) as t:
        yield t


def make_folder(root: Path, names=("red", "blue", "green", "black")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (48, 48), COLORS[name]).save(root / f"{name}.png")
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.txt"))}


def test_overwrite_creates_captions_with_the_images_tags(tagger, tmp_path):
    folder = make_folder(tmp_path / "d")
    result = tag_folder(folder, tagger, mode="overwrite")
    assert len(result.tagged) == 4 and len(result.written) == 4 and not result.failed
    assert read_caption(folder / "red.txt").startswith("hatsune_miku, red_theme, 1girl")
    assert "blue_theme" in read_caption(folder / "blue.txt") and "red_theme" not in read_caption(folder / "blue.txt")
    assert (folder / "red.txt").read_bytes().endswith(b"\n")
    freq = dict(result.frequency)
    assert freq["1girl"] == 4 and freq["red_theme"] == 1 and result.frequency[0][1] == 4


def test_append_prepend_keep_the_old_text_and_skip_known_tags(tagger, tmp_path):
    folder = make_folder(tmp_path / "d", names=("red",))
    (folder / "red.txt").write_text("my trigger,  red theme, (Long Hair:1.2)", encoding="utf-8")
    tag_folder(folder, tagger, mode="append")
    appended = read_caption(folder / "red.txt")
    assert appended.startswith("my trigger,  red theme, (Long Hair:1.2), hatsune_miku, 1girl")
    assert "red_theme" not in appended and "long_hair" not in appended  # same tags, other spellings
    undo_last(folder)
    tag_folder(folder, tagger, mode="prepend")
    assert read_caption(folder / "red.txt") == "hatsune_miku, 1girl, ^_^, solo, my trigger,  red theme, (Long Hair:1.2)"
    assert merge_caption("a photo of a cat", ["cat", "1girl"], "append") == "a photo of a cat, cat, 1girl"
    assert merge_caption("1girl, cat", ["cat", "1girl"], "append") == "1girl, cat"


def test_skip_leaves_captioned_images_alone(tagger, tmp_path):
    folder = make_folder(tmp_path / "d", names=("red", "blue", "green"))
    (folder / "red.txt").write_bytes(b"hand made, keep me")
    (folder / "blue.txt").write_bytes(b"   \n")  # empty caption: still needs tags
    result = tag_folder(folder, tagger, mode="skip")
    assert result.skipped == [folder / "red.png"]
    assert sorted(p.name for p in result.tagged) == ["blue.png", "green.png"]
    assert (folder / "red.txt").read_bytes() == b"hand made, keep me"
    assert "blue_theme" in read_caption(folder / "blue.txt")


def test_a_run_is_one_undo_that_restores_every_byte(tagger, tmp_path):
    folder = make_folder(tmp_path / "d")
    (folder / "red.txt").write_bytes("caf\xe9, old".encode("cp1252"))  # not UTF-8: read, appended, written as UTF-8
    before = snapshot(folder)
    result = tag_folder(folder, tagger, mode="append")
    assert read_caption(folder / "red.txt").startswith("café, old, hatsune_miku")
    assert (folder / "red.txt").read_bytes().decode("utf-8").startswith("café")
    assert [e.label for e in undo_history(folder)] == [result.undo.label] and "wd14" in result.undo.label
    undo_last(folder)
    assert snapshot(folder) == before  # new captions removed, the cp1252 one back byte for byte


def test_corrupt_images_are_listed_and_the_rest_tagged(tagger, tmp_path):
    folder = make_folder(tmp_path / "d", names=("red", "blue"))
    pattern_image(1, (64, 64)).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "garbage.png").write_bytes(b"not an image at all")
    result = tag_folder(folder, tagger)
    assert sorted(p.name for p, _ in result.failed) == ["garbage.png", "truncated.jpg"]
    assert all(str(p) in msg for p, msg in result.failed)
    assert sorted(p.name for p in result.tagged) == ["blue.png", "red.png"]
    assert not (folder / "garbage.txt").exists() and not (folder / "truncated.txt").exists()


def test_folder_errors_are_clear(tagger, tmp_path):
    with pytest.raises(BadInput, match="folder does not exist"):
        tag_folder(tmp_path / "missing", tagger)
    (tmp_path / "empty" / "10_sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "10_sub" / "a.png")
    with pytest.raises(BadInput, match="no images in .*use --recursive"):
        tag_folder(tmp_path / "empty", tagger)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(BadInput, match="none of the 1 images could be read"):
        tag_folder(tmp_path / "bad", tagger)
    with pytest.raises(BadInput, match="unknown mode"):
        plan_tagging(tmp_path / "empty", mode="merge")
    with pytest.raises(BadInput, match="caption extension"):
        plan_tagging(tmp_path / "empty", caption_extension=".png", recursive=True)


@contextlib.contextmanager
def read_only(folder: Path):
    """chmod for normal users; root ignores modes, so use the immutable flag there (skip if unavailable)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr: cannot make a read-only folder")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_folder_fails_before_tagging(tagger, tmp_path):
    folder = make_folder(tmp_path / "d", names=("red", "blue"))
    (folder / "red.txt").write_text("old caption", encoding="utf-8")
    before = sorted(os.listdir(folder))
    with read_only(folder):
        with pytest.raises(BadInput, match="cannot write captions in .*nothing was tagged"):
            tag_folder(folder, tagger, mode="overwrite")
    assert sorted(os.listdir(folder)) == before and read_caption(folder / "red.txt") == "old caption"
    assert not (folder / JOURNAL_DIR).exists()


def test_recursive_writes_beside_each_image_and_journals_at_the_root(tagger, tmp_path):
    folder = make_folder(tmp_path / "d", names=("red",))
    make_folder(folder / "5_blue", names=("blue",))
    result = tag_folder(folder, tagger, recursive=True, caption_extension="caption")
    assert (folder / "5_blue" / "blue.caption").is_file() and (folder / "red.caption").is_file()
    assert len(result.written) == 2 and len(undo_history(folder)) == 1
    undo_last(folder)
    assert not list(folder.rglob("*.caption"))


def test_batched_threaded_equals_one_at_a_time(tagger, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    paths = []
    for i in range(11):
        img = Image.new("RGB", (40 + i, 48), ((i * 60) % 256, (i * 110) % 256, (i * 170) % 256))
        img.save(folder / f"{i:02d}.png")
        paths.append(folder / f"{i:02d}.png")
    one = {p: tags for p, tags, _ in iter_tagged(paths, tagger, batch_size=1, workers=0)}
    batched = list(iter_tagged(paths, tagger, batch_size=4, workers=3))
    assert [p for p, _, _ in batched] == paths  # input order kept
    assert {p: tags for p, tags, _ in batched} == one
    assert len({tuple(t) for t in one.values()}) > 3  # the images really differ, so a mix-up would show


class SlowModel:
    """The real tagger, with a model that takes 0.15 s per batch, recording when decodes and batches run."""

    def __init__(self, inner, fail_on_batch: int | None = None, decode_seconds: float = 0.0, max_fitting: int = 99):
        self.inner, self.name, self.max_batch, self.max_fitting = inner, inner.name, None, max_fitting
        self.fail_on_batch, self.decode_seconds = fail_on_batch, decode_seconds
        self.batches: list[tuple[float, float]] = []
        self.decodes: list[tuple[float, float, str]] = []

    def prepare(self, path):
        start = time.perf_counter()
        time.sleep(self.decode_seconds)  # a large JPEG takes tens of ms to decode
        out = self.inner.prepare(path)
        self.decodes.append((start, time.perf_counter(), threading.current_thread().name))
        return out

    def tag_batch(self, prepared):
        if self.fail_on_batch is not None and len(self.batches) == self.fail_on_batch:
            raise RuntimeError("the model exploded (simulated)")
        if len(prepared) > self.max_fitting:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        start = time.perf_counter()
        time.sleep(0.15)
        out = self.inner.tag_batch(prepared)
        self.batches.append((start, time.perf_counter()))
        return out

    def close(self):
        pass


def test_images_are_decoded_while_the_model_runs(tagger, tmp_path):
    folder = make_folder(tmp_path / "d", names=("red", "blue", "green", "black", "white"))
    make_folder(tmp_path / "d" / "more", names=("red", "blue", "green", "black", "white"))
    slow = SlowModel(tagger, decode_seconds=0.05)
    result = tag_folder(folder, slow, batch_size=2, workers=2, recursive=True)
    assert len(result.tagged) == 10
    first_start, first_end = slow.batches[0]
    # some image was being decoded while the model ran the first batch
    assert any(start < first_end and end > first_start for start, end, _ in slow.decodes)
    assert all(name.startswith("tag-decode") for *_, name in slow.decodes)
    total = sum(end - start for start, end, _ in slow.decodes) + sum(end - start for start, end in slow.batches)
    assert result.seconds < total  # overlapped, not one after the other


def test_stop_and_failure_keep_finished_captions(tagger, tmp_path):
    folder = make_folder(tmp_path / "d")
    seen = []
    result = tag_folder(folder, tagger, batch_size=1, progress=lambda d, t: seen.append((d, t)),
                        should_stop=lambda: len(seen) >= 2)
    assert result.interrupted and len(result.written) == 2 and seen == [(1, 4), (2, 4)]
    assert sorted(p.name for p in folder.glob("*.txt")) == ["black.txt", "blue.txt"]
    undo_last(folder)

    failing = SlowModel(tagger, fail_on_batch=1)
    with pytest.raises(RuntimeError, match="exploded"):
        tag_folder(folder, failing, batch_size=2, workers=0)
    assert sorted(p.name for p in folder.glob("*.txt")) == ["black.txt", "blue.txt"]  # batch 1 written
    assert len(undo_history(folder)) == 1


def test_a_batch_that_does_not_fit_is_split(tagger, tmp_path):
    folder = make_folder(tmp_path / "d", names=("red", "blue", "green", "black", "white"))
    small = SlowModel(tagger, max_fitting=2)
    result = tag_folder(folder, small, batch_size=5)
    assert len(result.written) == 5 and "red_theme" in read_caption(folder / "red.txt")
    assert "blue_theme" in read_caption(folder / "blue.txt")  # results still go to the right images
    with pytest.raises(BadInput, match="out of memory tagging a single image"):
        tag_folder(make_folder(tmp_path / "e", names=("red",)), SlowModel(tagger, max_fitting=0))


def test_exclude_matches_spaces_underscores_and_case(tagger, tmp_path):
    folder = make_folder(tmp_path / "d", names=("red",))
    result = tag_folder(folder, tagger, exclude=["Hatsune Miku", "1girl", "long hair"])
    caption = read_caption(folder / "red.txt")
    assert "hatsune_miku" not in caption and "1girl" not in caption and "long_hair" not in caption
    assert "red_theme" in caption and "hatsune_miku" not in dict(result.frequency)


def test_cli_tags_a_folder_and_prints_frequency(wd14_dir, tmp_path, capsys):
    folder = make_folder(tmp_path / "d", names=("red", "blue"))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nope")
    code = main(["tag", str(folder), "--model_dir", str(wd14_dir), "--replace_underscores", "--exclude", "solo",
                 "--batch_size", "2"])
    out, err = capsys.readouterr()
    assert code == 0
    assert read_caption(folder / "red.txt").startswith("hatsune miku, red theme, 1girl")
    assert "tag frequency (" in out and "  1girl" in out and "solo " not in out
    assert "1 images were not tagged:" in err and f"cannot read image {folder / 'broken.jpg'}" in err
    assert f"python -m lib_lora tags {folder} --undo" in out
    assert main(["tags", str(folder), "--undo"]) == 0  # the hint works: the whole run is taken back
    assert not (folder / "red.txt").exists() and not (folder / "blue.txt").exists()


def test_cli_bad_input_messages(wd14_dir, tmp_path, capsys):
    assert main(["tag", str(tmp_path / "nope"), "--model_dir", str(wd14_dir)]) == 1
    assert "error: folder does not exist" in capsys.readouterr().err
    folder = make_folder(tmp_path / "d", names=("red",))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.onnx").write_bytes((wd14_dir / "model.onnx").read_bytes())
    assert main(["tag", str(folder), "--model_dir", str(tmp_path / "half")]) == 1
    assert "missing selected_tags.csv" in capsys.readouterr().err
    assert main(["tag", str(folder), "--model_dir", str(tmp_path / "nowhere"), "--batch_size", "0"]) == 1
    assert "--batch_size must be at least 1" in capsys.readouterr().err  # settings first, before any model
    assert not (folder / "red.txt").exists()


def test_bench_tag_runs_on_the_tiny_model(capsys):
    import json

    assert main(["bench", "tag", "--count", "5", "--image_size", "96x64", "--batch_size", "2", "--repeat", "1",
                 "--simulate_gpu", "1,0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    runs = {row["run"]: row for row in report["results"]}
    assert "simulated GPU wait of 1 ms per batch" in report["provider"]
    assert runs["one at a time (decode, then model, per image)"]["speedup"] == 1.0
    assert all(row["images_per_s"] > 0 for row in report["results"]) and len(runs) == 8


def test_read_only_caption_file_is_refused_before_tagging(tagger, tmp_path):
    """A caption made read-only is one the user locked: it is never replaced (on Windows a replace fails; on
    Linux a rename would silently go over it), and the run says so before the model spends any time."""
    folder = make_folder(tmp_path / "d", names=("red", "blue"))
    locked = folder / "red.txt"
    locked.write_text("hand-written, keep", encoding="utf-8")
    locked.chmod(0o444)
    with pytest.raises(BadInput, match=r"read-only.*red\.txt.*nothing was tagged or changed"):
        tag_folder(folder, tagger, mode="overwrite")
    assert locked.read_text(encoding="utf-8") == "hand-written, keep" and not (folder / "blue.txt").exists()
    result = tag_folder(folder, tagger, mode="skip")  # the locked caption is not touched: fine
    assert [p.name for p in result.written] == ["blue.txt"]


def test_images_sharing_one_caption_file_are_listed_not_tagged(tagger, tmp_path, capsys, wd14_dir):
    """red.png and red.jpg both read red.txt: tagging both would leave one image with the other's tags."""
    folder = make_folder(tmp_path / "d", names=("red", "blue"))
    Image.new("RGB", (48, 48), COLORS["green"]).save(folder / "red.jpg")
    result = tag_folder(folder, tagger, mode="overwrite")
    assert [p.name for p in result.tagged] == ["blue.png"] and not (folder / "red.txt").exists()
    assert sorted(p.name for p, _ in result.failed) == ["red.jpg", "red.png"]
    assert all("red.txt" in msg and "rename" in msg for _, msg in result.failed)
    assert main(["tag", str(folder), "--model_dir", str(wd14_dir)]) == 0
    err = capsys.readouterr().err
    assert "2 images were not tagged" in err and "red.jpg and red.png share red.txt" in err


def test_append_to_a_caption_on_several_lines_goes_on_the_first_line(tagger, tmp_path):
    """Training reads the first line only (as sd-scripts does): tags appended after a note on line 2 were lost."""
    assert merge_caption("a, b\nnote: from set 2", ["c"], "append") == "a, b, c\nnote: from set 2"
    assert merge_caption("a, b\r\nnote", ["c", "a"], "append") == "a, b, c\nnote"
    assert merge_caption("a, b\nnote", ["c"], "prepend") == "c, a, b\nnote"
    folder = make_folder(tmp_path / "d", names=("red",))
    (folder / "red.txt").write_text("my trigger\nshot on 2024-01-01", encoding="utf-8")
    tag_folder(folder, tagger, mode="append")
    first, second = (folder / "red.txt").read_text(encoding="utf-8").splitlines()
    assert first.startswith("my trigger, hatsune_miku, red_theme") and second == "shot on 2024-01-01"


def test_a_caption_edited_during_the_run_keeps_the_edit(tagger, tmp_path):
    """A long run in the tab while the user fixes a caption by hand: the run's write must build on that edit."""
    folder = make_folder(tmp_path / "d", names=("blue", "green", "red"))  # tagged in this order
    (folder / "blue.txt").write_text("old text", encoding="utf-8")

    def hand_edit(done, total):
        if done == 2:  # blue and green are tagged (not yet written); the user now edits both captions by hand
            (folder / "blue.txt").write_text("fixed by hand", encoding="utf-8")
            (folder / "green.txt").write_text("green by hand", encoding="utf-8")

    tag_folder(folder, tagger, mode="append", batch_size=1, workers=0, progress=hand_edit)
    assert read_caption(folder / "blue.txt").startswith("fixed by hand, hatsune_miku")
    assert read_caption(folder / "green.txt").startswith("green by hand, hatsune_miku")
    undo_last(folder)
    assert read_caption(folder / "blue.txt") == "fixed by hand" and read_caption(folder / "green.txt") == "green by hand"
    for name in ("blue.txt", "green.txt"):
        (folder / name).unlink()

    def caption_blue(done, total):
        if done == 2:
            (folder / "blue.txt").write_text("blue by hand", encoding="utf-8")

    result = tag_folder(folder, tagger, mode="skip", batch_size=1, workers=0, progress=caption_blue)
    assert read_caption(folder / "blue.txt") == "blue by hand"  # skip: captioned meanwhile, so left alone
    assert sorted(p.name for p in result.written) == ["green.txt", "red.txt"]
