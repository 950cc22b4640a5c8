"""Folder scan and the checks before anything loads: repeats, captions, odd files, clear errors."""

import numpy as np
import pytest
from PIL import Image

from lib_lora.dataset.loader import Dataset
from lib_lora.dataset.options import DatasetOptions, parse_resolution, validate_options
from lib_lora.dataset.scan import parse_concept_folder, scan_root
from lib_lora.errors import BadInput
from lib_lora.imagefiles import open_image_rgb
from tests.fixtures.images import pattern_image

from .conftest import add_image, small_options


def test_concept_folders_give_repeats_and_fallback_captions(tmp_path):
    root = tmp_path / "train"
    add_image(root / "10_my_char", "a.PNG", caption="my_char, smile\nsecond line ignored")
    add_image(root / "10_my_char", "b.JpG")  # no caption file -> the concept name
    add_image(root / "10_my_char", "c.webp")
    (root / "10_my_char" / "c.txt").write_text("  \n", encoding="utf-8")  # empty caption counts as missing
    scan = scan_root(root)
    (concept,) = scan.concepts
    assert (concept.name, concept.repeats, concept.captions_missing) == ("my_char", 10, 2)
    captions = {e.path.name: (e.caption, e.caption_missing) for e in concept.images}
    assert captions == {"a.PNG": ("my_char, smile", False), "b.JpG": ("my_char", True), "c.webp": ("my_char", True)}
    assert parse_concept_folder("5_x_y") == (5, "x_y") and parse_concept_folder("mychar") is None


def test_other_caption_extension(tmp_path):
    root = tmp_path / "train"
    add_image(root / "1_c", "a.png", caption="from txt")
    (root / "1_c" / "a.caption").write_text("from caption", encoding="utf-8")
    assert scan_root(root, ".caption").images[0].caption == "from caption"
    assert scan_root(root, "txt").images[0].caption == "from txt"


def test_broken_images_skipped_and_listed_odd_folders_ignored(tmp_path):
    root = tmp_path / "train"
    add_image(root / "2_ok", "good.png", caption="ok")
    bad = add_image(root / "2_ok", "bad.png")
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    (root / "2_ok" / "zero.jpg").write_bytes(b"")
    pattern_image(5, (256, 192)).save(root / "2_ok" / "cut.jpg", quality=90)
    data = (root / "2_ok" / "cut.jpg").read_bytes()
    (root / "2_ok" / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])  # truncated JPEG (decoded at 1/8 scale)
    add_image(root / "nonumber", "x.png")
    add_image(root, "loose.png")
    add_image(root / "_duplicates" / "2_ok", "copy.png")  # where our duplicate finder moves copies
    ds = Dataset.build(small_options(root))
    assert [p.entry.path.name for p in ds.images] == ["good.png"]
    assert sorted(s.path.name for s in ds.skipped) == ["bad.png", "cut.jpg", "zero.jpg"]
    assert all("unreadable image" in s.reason for s in ds.skipped)
    assert {s.path.name for s in ds.ignored} == {"nonumber", "loose.png"}  # our own folder is not the user's doing
    text = "\n".join(ds.summary_lines())
    assert "skipped" in text and "bad.png" in text and "N_concept" in text and "_duplicates" not in text
    validation = Dataset.build(small_options(root, validation_data_dir=str(root / "2_ok")))
    assert validation.num_validation_images == 1
    add_image(root / "2_ok" / "_duplicates", "v.png")
    assert Dataset.build(small_options(root, validation_data_dir=str(root / "2_ok"))).num_validation_images == 1


def test_exif_rotation_decides_the_bucket_and_alpha_becomes_white(tmp_path):
    root = tmp_path / "train"
    folder = root / "1_c"
    folder.mkdir(parents=True)
    img = Image.new("RGB", (96, 48), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 48 x 96
    img.save(folder / "rot.jpg", exif=exif)
    clear = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    clear.save(folder / "alpha.png")
    ds = Dataset.build(small_options(root, train_batch_size=1))
    by_name = {p.entry.path.name: p for p in ds.images}
    assert by_name["rot.jpg"].entry.size == (48, 96) == open_image_rgb(folder / "rot.jpg").size
    bw, bh = by_name["rot.jpg"].choice.bucket
    assert bh > bw  # portrait bucket
    spec = next(s for s in ds.epoch_batches(1) if ds.images[s.items[0].image].entry.path.name == "alpha.png")
    pixels = ds.load_batch(spec).pixels
    assert np.allclose(pixels.numpy(), 1.0)  # transparent -> white -> +1


@pytest.mark.parametrize("layout", ["missing", "empty", "no_concepts", "all_broken", "empty_concept"])
def test_nothing_to_train_is_a_clear_error(tmp_path, layout):
    root = tmp_path / "train"
    if layout != "missing":
        root.mkdir()
    if layout == "no_concepts":
        add_image(root, "loose.png")
    if layout == "all_broken":
        (root / "1_c").mkdir()
        (root / "1_c" / "x.png").write_bytes(b"not a png")
    if layout == "empty_concept":
        (root / "3_c").mkdir()
    with pytest.raises(BadInput) as err:
        Dataset.build(small_options(root))
    message = str(err.value)
    assert str(root) in message or "x.png" in message
    assert "\n" not in message


def test_missing_reg_and_validation_folders(two_concepts, tmp_path):
    with pytest.raises(BadInput, match="reg_data_dir"):
        Dataset.build(small_options(two_concepts, reg_data_dir=str(tmp_path / "nope")))
    (tmp_path / "emptyreg").mkdir()
    ds = Dataset.build(small_options(two_concepts, reg_data_dir=str(tmp_path / "emptyreg")))
    assert ds.num_reg_images == 0 and "reg_data_dir holds no image" in ds.ignored[0].reason
    with pytest.raises(BadInput, match="validation_data_dir"):
        Dataset.build(small_options(two_concepts, validation_data_dir=str(tmp_path / "nope")))


def test_bad_settings_reported_together_before_any_folder_is_read(tmp_path):
    opts = DatasetOptions(
        train_data_dir=str(tmp_path / "does-not-exist"),
        resolution=512,
        enable_bucket=True,
        min_bucket_reso=768,
        caption_dropout_rate=1.5,
        cache_latents=True,
        color_aug=True,
        keep_tokens=-1,
    )
    problems = validate_options(opts)
    assert len(problems) == 4 and any("min_bucket_reso 768" in p for p in problems)
    with pytest.raises(BadInput) as err:
        Dataset.build(opts)
    assert "does not exist" not in str(err.value) and "caption_dropout_rate" in str(err.value)
    assert validate_options(DatasetOptions()) == ["train_data_dir is not set"]
    both = DatasetOptions(train_data_dir="x", validation_split=0.2, validation_data_dir="v", bucket_reso_steps=60)
    assert len(validate_options(both)) == 2
    assert parse_resolution("768,512") == (768, 512) and parse_resolution(640) == (640, 640)
    with pytest.raises(BadInput):
        parse_resolution("big")


def test_16_bit_grayscale_png_keeps_its_brightness(tmp_path):
    """Scanners and photo tools export 16-bit grey PNGs; PIL's own conversion clips them to white."""
    root = tmp_path / "train"
    folder = root / "1_c"
    folder.mkdir(parents=True)
    ramp = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)  # black to white, left to right
    Image.fromarray(ramp).save(folder / "grey16.png")
    assert Image.open(folder / "grey16.png").mode in ("I;16", "I")  # really a 16-bit file
    rgb = np.asarray(open_image_rgb(folder / "grey16.png"), dtype=np.float64)
    expected = np.round(ramp / 257.0)
    assert np.abs(rgb[..., 0] - expected).max() <= 1 and (rgb[..., 0] == rgb[..., 2]).all()
    ds = Dataset.build(small_options(root, train_batch_size=1, enable_bucket=False))
    pixels = ds.load_batch(ds.epoch_batches(1)[0]).pixels.numpy()
    assert abs(pixels.mean()) < 0.05  # a ramp averages mid-grey (0 in [-1, 1]), not white (+1)


def test_decompression_bomb_is_skipped_and_listed_not_a_crash(tmp_path, monkeypatch):
    """PIL refuses images over twice MAX_IMAGE_PIXELS with DecompressionBombError (not an OSError)."""
    from PIL import Image as PILImage

    root = tmp_path / "train"
    add_image(root / "1_c", "ok.png", size=(32, 32))
    add_image(root / "1_c", "huge.png", size=(64, 64))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 32 * 32)  # 64x64 is over twice that: a "bomb" here
    ds = Dataset.build(small_options(root, train_batch_size=1))
    assert ds.num_train_images == 1
    assert [(s.path.name, "decompression bomb" in s.reason) for s in ds.skipped] == [("huge.png", True)]
