"""Near-duplicates: resized, re-compressed and cropped copies are found; different pictures stay far apart; moving
the copies aside loses nothing and survives an interrupt."""

import io
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lib_lora.errors import BadInput
from lib_lora.tagging import dedupe
from lib_lora.tagging.check import check_dataset
from lib_lora.tagging.dedupe import (
    DEFAULT_THRESHOLD,
    MIN_CORRELATION,
    aligned_correlation,
    DUPLICATES_DIR,
    find_duplicates,
    fingerprint_image,
    finish_interrupted_moves,
    group_duplicates,
    hash_distance,
    is_duplicate,
    move_duplicates,
)
from tests.fixtures.images import pattern_image


def shapes_image(seed: int, size=(128, 128)) -> Image.Image:
    rng = np.random.default_rng(1000 + seed)
    w, h = size
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 8, h // 2)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=int(rng.integers(2, max(3, w // 16))))
    return img


def blotches_image(seed: int, size=(128, 128)) -> Image.Image:
    """Smooth random colour blotches (an 8x8 noise grid scaled up): photo-like low-frequency content."""
    rng = np.random.default_rng(4000 + seed)
    small = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def gradient_image(seed: int, size=(128, 128)) -> Image.Image:
    """A smooth two-way colour gradient: almost no detail, the case where hash bits turn to noise."""
    rng = np.random.default_rng(3000 + seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    a, b, c = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3), rng.uniform(0, 255, 3)
    return Image.fromarray((c + 120 * (a * xx[..., None] + b * yy[..., None])).clip(0, 255).astype(np.uint8))


def solid_image(seed: int, size=(128, 128)) -> Image.Image:
    rng = np.random.default_rng(2000 + seed)
    return Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))


def jpeg(img: Image.Image, quality: int = 70) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def crop(img: Image.Image, left=0.03, top=0.03, right=0.03, bottom=0.03) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))


COPIES = {
    "resized 75%": lambda im: im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.BICUBIC),
    "jpeg q70": jpeg,
    "cropped 3% each side": crop,
    "cropped 3% left": lambda im: crop(im, 0.03, 0, 0, 0),
    "cropped 3% top-left": lambda im: crop(im, 0.03, 0.03, 0, 0),
    "cropped 3% bottom-right": lambda im: crop(im, 0, 0, 0.03, 0.03),
}

ORIGINALS = (
    [(f"pattern{s}", pattern_image(s)) for s in range(24)]  # the fixture's 64 px images
    + [(f"pattern{s}-wide", pattern_image(s, (128, 96))) for s in range(6)]
    + [(f"shapes{s}", shapes_image(s)) for s in range(16)]
    + [(f"blotches{s}", blotches_image(s)) for s in range(8)]
    + [(f"gradient{s}", gradient_image(s)) for s in range(8)]
    + [(f"solid{s}", solid_image(s)) for s in range(4)]
)


@pytest.fixture(scope="module")
def prints():
    return {name: fingerprint_image(img) for name, img in ORIGINALS}


@pytest.fixture(scope="module")
def copy_prints():
    return {(name, kind): fingerprint_image(make(img)) for name, img in ORIGINALS for kind, make in COPIES.items()}


def test_every_copy_is_found_at_the_default_threshold(prints, copy_prints):
    missed = [key for key, fp in copy_prints.items() if not is_duplicate(prints[key[0]], fp)]
    assert missed == []
    detailed = [(prints[name], fp) for (name, _), fp in copy_prints.items() if not prints[name].low_detail]
    assert max(hash_distance(a, b) for a, b in detailed) <= DEFAULT_THRESHOLD - 8  # with room to spare
    assert min(aligned_correlation(a, b) for a, b in detailed) >= MIN_CORRELATION + 0.03


def test_different_pictures_are_far_apart(prints):
    pairs = list(itertools.combinations(prints.items(), 2))
    assert not [(a, b) for (a, fa), (b, fb) in pairs if is_duplicate(fa, fb)]
    detailed = [hash_distance(fa, fb) for (_, fa), (_, fb) in pairs if not (fa.low_detail or fb.low_detail)]
    assert min(detailed) >= 2 * DEFAULT_THRESHOLD  # unrelated pictures sit near 128 of 256 bits
    # the pictures that share a background (pattern seeds 0 and 35 differ only in their blocks) too
    assert not is_duplicate(fingerprint_image(pattern_image(0)), fingerprint_image(pattern_image(35)))


def test_large_look_alikes_that_align_by_chance_are_told_apart():
    """At 768x640 the fixture's stripes blur away and only four blocks on grey remain: one crop of 0360 lines up
    with 0197 to 26 bits, but their brightness at that alignment does not correlate like a copy's."""
    a, b = fingerprint_image(pattern_image(360, (768, 640))), fingerprint_image(pattern_image(197, (768, 640)))
    assert hash_distance(a, b) <= DEFAULT_THRESHOLD and aligned_correlation(a, b) < MIN_CORRELATION - 0.03
    assert not is_duplicate(a, b)
    many = [fingerprint_image(pattern_image(seed, (768, 640))) for seed in range(0, 400, 13)]
    assert not [(i, j) for i, j in itertools.combinations(range(len(many)), 2) if is_duplicate(many[i], many[j])]


def test_low_detail_images_are_recognised_and_compared_by_colour(prints):
    assert {n for n, fp in prints.items() if fp.low_detail} >= {f"solid{s}" for s in range(4)}
    assert not any(prints[f"shapes{s}"].low_detail or prints[f"pattern{s}"].low_detail for s in range(16))


def test_groups_are_exactly_each_original_with_its_copies(prints, copy_prints):
    fps = [p.__class__(**{**p.__dict__, "path": Path(name)}) for name, p in prints.items()]
    fps += [p.__class__(**{**p.__dict__, "path": Path(f"{name}|{kind}")}) for (name, kind), p in copy_prints.items()]
    groups = group_duplicates(fps)
    assert len(groups) == len(prints)
    for group in groups:
        origin = str(group.keep).split("|")[0]
        assert str(group.keep) == origin  # the original is the largest (or ties and wins by file order)
        assert sorted(str(p) for p in group.duplicates) == sorted(f"{origin}|{k}" for k in COPIES)



def test_a_chain_of_small_steps_is_not_one_group():
    """Panning frames (each 4% beside the last) and a colour ramp: neighbours are duplicates, the ends are not
    alike at all. Every image put aside must be a duplicate of the image kept in its group."""
    big = shapes_image(5, (400, 200))
    frames = [fingerprint_image(big.crop((8 * k, 0, 8 * k + 200, 200))) for k in range(12)]
    ramp = [fingerprint_image(Image.new("RGB", (64, 64), (10 * k, 100, 200 - 5 * k))) for k in range(20)]
    for chain, name in ((frames, "frame"), (ramp, "ramp")):
        fps = [p.__class__(**{**p.__dict__, "path": Path(f"{name}{k:02d}")}) for k, p in enumerate(chain)]
        assert is_duplicate(fps[0], fps[1]) and not is_duplicate(fps[0], fps[-1])
        groups = group_duplicates(fps)
        by_name = {str(fp.path): fp for fp in fps}
        assert groups and all(len(g.duplicates) <= 2 for g in groups), name
        for group in groups:
            assert all(is_duplicate(by_name[str(group.keep)], by_name[str(p)]) for p in group.duplicates)

# ---- folders ------------------------------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "ds"
    a, b = root / "10_a", root / "5_b"
    a.mkdir(parents=True)
    b.mkdir()
    big = pattern_image(1, (128, 128))
    big.save(a / "001.png")
    (a / "001.txt").write_text("a, original")
    jpeg(big).save(b / "copy.jpg", quality=95)  # a copy in another concept
    (b / "copy.txt").write_text("b, copy")
    crop(big).save(a / "002.png")  # cropped copy, no caption
    pattern_image(2, (128, 128)).save(a / "003.png")
    (a / "003.txt").write_text("a, different")
    pattern_image(3, (96, 96)).save(b / "004.png")
    (b / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def all_files(root: Path) -> dict[bytes, int]:
    counts: dict[bytes, int] = {}
    for p in root.rglob("*"):
        if p.is_file() and p.name != dedupe.MOVE_JOURNAL:
            counts[p.read_bytes()] = counts.get(p.read_bytes(), 0) + 1
    return counts


def test_find_across_concepts_skipping_broken(dataset):
    result = find_duplicates(dataset)
    assert result.scanned == 6
    assert [(p.name, "truncated" in r or "identify" in r or "cannot" in r) for p, r in result.skipped] == [("broken.png", True)]
    assert len(result.groups) == 1
    group = result.groups[0]
    assert group.keep == dataset / "10_a" / "001.png"
    assert group.duplicates == [dataset / "10_a" / "002.png", dataset / "5_b" / "copy.jpg"]


def test_keep_prefers_pixels_then_colour(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    picture = pattern_image(5, (128, 128))
    picture.resize((96, 96)).save(root / "a_small.png")
    picture.convert("L").save(root / "b_big_grey.png")  # a grayscale version is a duplicate too
    picture.save(root / "c_big_colour.jpg", quality=60)
    picture.save(root / "d_big_colour.png")  # same size and colour: the lossless file wins
    result = find_duplicates(root)
    assert [g.keep.name for g in result.groups] == ["d_big_colour.png"]
    assert sorted(p.name for p in result.groups[0].duplicates) == ["a_small.png", "b_big_grey.png", "c_big_colour.jpg"]
    (root / "d_big_colour.png").unlink()
    assert find_duplicates(root).groups[0].keep.name == "c_big_colour.jpg"  # colour over the grey one


def test_move_keeps_every_byte_and_pairs_captions(dataset):
    before = all_files(dataset)
    clash = dataset / DUPLICATES_DIR / "10_a" / "002.png"
    clash.parent.mkdir(parents=True)
    pattern_image(9).save(clash)  # an earlier run left a file with that name
    before[clash.read_bytes()] = 1
    result = find_duplicates(dataset)
    moves = move_duplicates(dataset, result.groups)
    assert {(m.source.name, m.target.relative_to(dataset).as_posix()) for m in moves} == {
        ("002.png", "_duplicates/10_a/002-1.png"),
        ("copy.jpg", "_duplicates/5_b/copy.jpg"),
        ("copy.txt", "_duplicates/5_b/copy.txt"),
    }
    assert all_files(dataset) == before  # nothing deleted, nothing changed
    assert (dataset / "10_a" / "001.txt").read_text() == "a, original"
    assert not (dataset / DUPLICATES_DIR / dedupe.MOVE_JOURNAL).exists()
    again = find_duplicates(dataset)
    assert again.groups == [] and again.scanned == 4  # _duplicates is not scanned


def test_caption_shared_with_a_kept_image_is_copied(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    pattern_image(6, (128, 128)).save(root / "1.png")
    jpeg(pattern_image(6, (128, 128)).resize((96, 96))).save(root / "1.jpg")  # same stem: both read 1.txt
    (root / "1.txt").write_text("shared")
    moves = move_duplicates(root, find_duplicates(root).groups)
    assert [(m.source.name, m.copy) for m in moves] == [("1.txt", True), ("1.jpg", False)]
    assert (root / "1.txt").read_text() == "shared" and (root / "_duplicates" / "1.txt").read_text() == "shared"


def test_interrupted_move_is_finished_later(dataset, monkeypatch, clip_tokenizer):
    groups = find_duplicates(dataset).groups
    real = os.replace
    calls = []

    def interrupt(src, dst):
        if not str(src).endswith(".tmp"):  # count the moves, not the journal's atomic write
            calls.append(src)
            if len(calls) == 3:  # 002.png and copy.jpg moved, Ctrl-C before copy.txt follows
                raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(dedupe.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        move_duplicates(dataset, groups)
    monkeypatch.setattr(dedupe.os, "replace", real)
    assert (dataset / DUPLICATES_DIR / "5_b" / "copy.jpg").exists() and (dataset / "5_b" / "copy.txt").exists()
    codes = {f.code for f in check_dataset(dataset, min_side=32, tokenizer=clip_tokenizer).findings}
    assert "interrupted_move" in codes
    assert finish_interrupted_moves(dataset) == 1
    assert (dataset / DUPLICATES_DIR / "5_b" / "copy.txt").read_text() == "b, copy"
    assert not (dataset / "5_b" / "copy.txt").exists()
    assert finish_interrupted_moves(dataset) == 0


@pytest.mark.parametrize("refused", ["everything", "moves"])
def test_move_in_read_only_folder_says_so_and_loses_nothing(dataset, monkeypatch, refused):
    before = all_files(dataset)
    groups = find_duplicates(dataset).groups
    real = os.replace

    def refuse(src, dst):
        if refused == "everything" or not str(src).endswith(".tmp"):
            raise PermissionError(13, "Permission denied", str(dst))
        real(src, dst)

    monkeypatch.setattr(dedupe.os, "replace", refuse)
    expected = "nothing was moved" if refused == "everything" else "run dedupe --move again"
    with pytest.raises(BadInput, match=f"Permission denied.*{expected}"):
        move_duplicates(dataset, groups)
    assert all_files(dataset) == before


def test_bad_input(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        find_duplicates(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(BadInput, match="no images"):
        find_duplicates(tmp_path / "empty")
    with pytest.raises(BadInput, match="threshold"):
        find_duplicates(tmp_path / "empty", threshold=300)
