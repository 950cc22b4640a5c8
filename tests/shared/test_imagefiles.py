"""What counts as an image, and how it opens: case-insensitive extensions, EXIF rotation, alpha on white."""

import pytest
from PIL import Image

from lib_lora.errors import BadInput, IncompatibleFile
from lib_lora.imagefiles import iter_image_files, open_image_rgb


def test_iter_images_any_case_skips_hidden(tmp_path):
    for name in ["a.PNG", "b.jpg", "c.JPEG", "d.webp", "e.Bmp", "f.gif", "g.txt", ".h.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "i.png").write_bytes(b"x")
    assert [p.name for p in iter_image_files(tmp_path)] == ["a.PNG", "b.jpg", "c.JPEG", "d.webp", "e.Bmp"]
    (tmp_path / "_duplicates" / "sub").mkdir(parents=True)  # our duplicate finder's folder: not walked into
    (tmp_path / "_duplicates" / "sub" / "j.png").write_bytes(b"x")
    assert "i.png" in [p.name for p in iter_image_files(tmp_path, recursive=True)]
    assert "j.png" not in [p.name for p in iter_image_files(tmp_path, recursive=True)]
    with pytest.raises(BadInput):
        list(iter_image_files(tmp_path / "missing"))


def test_transparent_composited_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    img.save(tmp_path / "t.png")
    rgb = open_image_rgb(tmp_path / "t.png")
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (0, 0, 255)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (8, 4), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert open_image_rgb(tmp_path / "r.jpg").size == (4, 8)


def test_truncated_image_names_file(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    (tmp_path / "x.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(IncompatibleFile, match="x.png"):
        open_image_rgb(tmp_path / "x.png")
