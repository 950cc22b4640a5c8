"""The dataset check: every problem it knows, on a folder built to have each one, and nothing on a clean one."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from lib_lora import clip_tokenizer
from lib_lora.errors import BadInput
from lib_lora.tagging.check import CHECKS, check_dataset
from tests.fixtures.images import make_dataset, pattern_image


def cats(n: int) -> str:
    """'char, cat, cat, ...': 2n + 1 CLIP tokens ('char', ',' and n times 'cat' with commas between)."""
    return "char, " + ", ".join(["cat"] * n)


def truncated(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    data = buf.getvalue()
    return data[: len(data) * 2 // 3]


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    c = root / "10_char"
    c.mkdir()

    def img(name, image=None, caption="char, smile"):
        (image or pattern_image(len(name))).save(c / name)
        if caption is not None:
            (c / name).with_suffix(".txt").write_text(caption, encoding="utf-8")

    img("000.png")
    img("001.png")
    pattern_image(7).save(c / "001.jpg")  # same stem as 001.png: both read 001.txt
    img("002.png", caption="smile, blush")  # no activation tag
    img("003.png", caption="smile, char")  # activation not first
    (c / "004.png").write_bytes(truncated(pattern_image(4), "PNG"))
    (c / "004.txt").write_text("char")
    (c / "005.jpg").write_bytes(truncated(pattern_image(5), "JPEG"))
    (c / "005.txt").write_text("char")
    (c / "006.png").write_bytes(b"this is not a picture")
    (c / "006.txt").write_text("char")
    img("007.png", pattern_image(1, (40, 40)))
    img("008.png", pattern_image(2, (128, 64)))
    rgba = pattern_image(3).convert("RGBA")
    rgba.putpixel((5, 5), (0, 0, 0, 0))
    img("009.png", rgba)
    img("010.png", pattern_image(3).convert("RGBA"))  # alpha channel, but fully opaque
    img("011.png", pattern_image(11, mode="L"))
    img("012.jpg", pattern_image(12).convert("L").convert("RGB"))  # colour file, grey pixels
    img("013.png", caption=None)
    img("014.png", caption="")
    img("015.png", caption="char, smile\nsecond line")
    img("016.png", caption=cats(38))  # 77 tokens
    img("017.png", caption=cats(75))  # 151
    img("018.png", caption=cats(113))  # 227
    img("019.png", caption=cats(37))  # exactly 75: fine
    frames = [pattern_image(20), pattern_image(21)]
    frames[0].save(c / "020.png", save_all=True, append_images=frames[1:])
    (c / "020.txt").write_text("char")
    pattern_image(30).save(c / "anim.gif")
    pattern_image(31).save(c / "scan.tiff")
    (c / "orphan.txt").write_text("char, lost")
    (c / "sub").mkdir()
    pattern_image(32).save(c / "sub" / "nested.png")
    (root / "0_zero").mkdir()
    pattern_image(40).save(root / "0_zero" / "a.png")
    (root / "5_empty").mkdir()
    (root / "misc").mkdir()
    pattern_image(41).save(root / "misc" / "x.png")
    pattern_image(42).save(root / "loose.png")
    (root / "_duplicates").mkdir()
    (root / "_duplicates" / ".moves.json").write_text("[]")
    return root


@pytest.fixture(scope="module")
def report(messy, clip_tokenizer):
    return check_dataset(messy, min_side=48, max_side=100, activation="char", tokenizer=clip_tokenizer)


def found(report, code):
    return {f.path: f.detail for f in report.findings if f.code == code}


def test_token_counts_are_what_the_fixture_assumes(clip_tokenizer):
    for n, tokens in ((37, 75), (38, 77), (75, 151), (113, 227)):
        assert len(clip_tokenizer.tokenize(cats(n))) == tokens


@pytest.mark.parametrize(
    "code, paths",
    [
        ("unreadable", {"10_char/004.png", "10_char/005.jpg", "10_char/006.png"}),
        ("same_stem", {"10_char/001.jpg"}),
        ("interrupted_move", {"_duplicates/.moves.json"}),
        ("no_repeats_prefix", {"misc"}),
        ("loose_images", {"loose.png"}),
        ("nested_images", {"10_char/sub"}),
        ("zero_repeats", {"0_zero"}),
        ("empty_concept", {"5_empty"}),
        ("unsupported_format", {"10_char/anim.gif", "10_char/scan.tiff"}),
        ("too_small", {"10_char/007.png"}),
        ("too_large", {"10_char/008.png"}),
        ("animated", {"10_char/020.png"}),
        ("transparency", {"10_char/009.png"}),
        ("grayscale", {"10_char/011.png", "10_char/012.jpg"}),
        ("missing_caption", {"10_char/013.png", "0_zero/a.png", "misc/x.png"}),
        ("orphan_caption", {"10_char/orphan.txt"}),
        ("empty_caption", {"10_char/014.txt"}),
        ("multiline_caption", {"10_char/015.txt"}),
        ("activation_missing", {"10_char/002.txt"}),
        ("activation_not_first", {"10_char/003.txt"}),
        ("tokens_over_75", {"10_char/016.txt"}),
        ("tokens_over_150", {"10_char/017.txt"}),
        ("tokens_over_225", {"10_char/018.txt"}),
    ],
)
def test_each_problem_is_found_exactly_where_it_is(report, code, paths):
    assert set(found(report, code)) == paths


def test_details_say_what_is_wrong(report):
    assert found(report, "unsupported_format") == {"10_char/anim.gif": "GIF", "10_char/scan.tiff": "TIFF"}
    assert found(report, "same_stem")["10_char/001.jpg"] == "001.jpg + 001.png -> 001.txt"
    assert found(report, "too_small")["10_char/007.png"].startswith("40x40")
    assert found(report, "tokens_over_225")["10_char/018.txt"] == "227 tokens"
    assert "truncated" in found(report, "unreadable")["10_char/004.png"]
    assert found(report, "unreadable")["10_char/006.png"] == "not an image (unknown format or damaged start of file)"
    assert found(report, "animated")["10_char/020.png"] == "2 frames"


def test_severities_steps_and_concepts(report):
    assert report.layout == "concepts"
    assert (report.errors, report.warnings, report.count("info")) == (4, 24, 1)
    concepts = {c.folder: (c.repeats, c.images) for c in report.concepts}
    # 22 image files in 10_char, 3 of them unreadable: training leaves those out, so the steps do too
    assert concepts == {"0_zero": (0, 1), "10_char": (10, 19), "5_empty": (5, 0), "misc": (None, 1)}
    assert {c.folder: c.unreadable for c in report.concepts}["10_char"] == 3
    assert report.steps_per_epoch == 190 and report.images == 19 + 3 + 1 + 1  # files found, broken ones included
    assert {f.severity for f in report.findings if f.code == "unreadable"} == {"error"}
    assert {f.code for f in report.findings if f.severity == "error"} == {"unreadable", "same_stem"}
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["steps_per_epoch"] == 190 and as_json["errors"] == 4
    assert {c["folder"]: c["unreadable"] for c in as_json["concepts"]}["10_char"] == 3
    assert set(as_json["checks"]) == set(CHECKS)


def test_truncation_found_even_when_pil_tolerates_it(messy, clip_tokenizer, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # e.g. set by another extension in the webui
    result = check_dataset(messy / "10_char", min_side=48, max_side=100, tokenizer=clip_tokenizer)
    assert {"004.png", "005.jpg", "006.png"} <= set(found(result, "unreadable"))


def test_clean_dataset_has_no_findings(tmp_path, clip_tokenizer):
    root = make_dataset(tmp_path / "ds", {"mychar": 10, "other": 2}, per_concept=4)
    result = check_dataset(root, min_side=32, tokenizer=clip_tokenizer)
    assert result.findings == []
    assert result.steps_per_epoch == 4 * 10 + 4 * 2
    assert check_dataset(root, min_side=32, batch_size=3, tokenizer=clip_tokenizer).steps_per_epoch == 16  # ceil(48/3)


def test_flat_folder(tmp_path, clip_tokenizer):
    flat = make_dataset(tmp_path / "a", {"x": 1}, per_concept=2) / "1_x"
    renamed = flat.rename(tmp_path / "pictures")
    result = check_dataset(renamed, min_side=32, tokenizer=clip_tokenizer)
    assert result.layout == "flat" and result.steps_per_epoch == 2
    assert [(f.code, f.severity) for f in result.findings] == [("flat_folder", "info")]
    named = renamed.rename(tmp_path / "6_pictures")
    result = check_dataset(named, min_side=32, tokenizer=clip_tokenizer)
    assert result.findings == [] and result.concepts[0].repeats == 6 and result.steps_per_epoch == 12


def test_activation_guessed_per_concept(tmp_path, clip_tokenizer):
    root = make_dataset(tmp_path / "ds", {"hero": 5}, per_concept=5)
    (root / "5_hero" / "004.txt").write_text("tag4, shared tag")
    result = check_dataset(root, min_side=32, tokenizer=clip_tokenizer)
    assert set(found(result, "activation_missing")) == {"5_hero/004.txt"}
    assert "guessed" in found(result, "activation_missing")["5_hero/004.txt"]
    assert "--" not in found(result, "activation_missing")["5_hero/004.txt"]  # the tab shows it too
    for i in range(5):  # '1girl' first everywhere but one: a count tag, never taken for an activation tag
        (root / "5_hero" / f"{i:03d}.txt").write_text("1girl, smile" if i else "1boy, smile")
    assert found(check_dataset(root, min_side=32, tokenizer=clip_tokenizer), "activation_missing") == {}


def test_bad_input(tmp_path, clip_tokenizer):
    with pytest.raises(BadInput, match="does not exist"):
        check_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    result = check_dataset(tmp_path / "empty", tokenizer=clip_tokenizer)
    assert [f.code for f in result.findings if f.severity == "error"] == ["no_images"]
    with pytest.raises(BadInput, match="min-side"):
        check_dataset(tmp_path / "empty", min_side=600, max_side=500)


def test_token_count_skipped_without_vocabulary(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "ds", {"a": 1}, per_concept=1)

    def no_vocabulary():
        raise BadInput("CLIP's BPE vocabulary was not found: install 'open-clip-torch'")

    monkeypatch.setenv("LORA_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(clip_tokenizer, "find_bpe_file", no_vocabulary)
    clip_tokenizer.load_clip_tokenizer.cache_clear()
    try:
        result = check_dataset(root, min_side=32)
    finally:
        clip_tokenizer.load_clip_tokenizer.cache_clear()
    assert [(f.code, f.severity) for f in result.findings] == [("token_count_skipped", "info")]
    assert "open-clip-torch" in result.findings[0].detail


def test_fixes_are_host_neutral_unless_the_host_gives_its_words():
    """The report is read in a terminal and in the tab: its own fixes name no command, option or button."""
    from lib_lora.tagging.check import fix_for

    for code, (_, _, fix) in CHECKS.items():
        assert "python -m" not in fix and "--" not in fix and " > " not in fix, code
    assert fix_for("missing_caption") == CHECKS["missing_caption"][2]
    assert fix_for("missing_caption", {"missing_caption": "Tags > Tag images"}) == "Tags > Tag images"
    assert fix_for("grayscale", {"missing_caption": "x"}) == CHECKS["grayscale"][2]
