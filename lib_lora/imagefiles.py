"""Which files are images, and how to open one the way every part of the product expects.

Shared by the dataset scan, the checks, the duplicate finder and the taggers so that "an image" means the same
thing everywhere: png, jpg, jpeg, webp, bmp in any letter case; EXIF orientation applied; transparency
composited on white.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from .errors import BadInput, IncompatibleFile

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Folders our own tools make inside a dataset (the duplicate finder moves duplicates into `_duplicates/`). They hold
# no training data and the user did not make them: the scan skips them without listing them as folders it ignored,
# and recursive listings (taggers, the duplicate finder) do not walk into them.
DUPLICATES_DIR = "_duplicates"
TOOL_FOLDERS = frozenset({DUPLICATES_DIR})


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def iter_image_files(folder: str | os.PathLike, recursive: bool = False) -> Iterator[Path]:
    """Image files under `folder` in a stable (sorted) order; hidden files and folders (`.name`) are skipped, and
    so are our tools' folders (TOOL_FOLDERS) when recursing."""
    root = Path(folder)
    if not root.is_dir():
        raise BadInput(f"folder does not exist: {root}")
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if recursive and entry.name not in TOOL_FOLDERS:
                yield from iter_image_files(entry, recursive=True)
        elif is_image_file(entry):
            yield entry


def open_image_rgb(
    path: str | os.PathLike,
    background: tuple[int, int, int] = (255, 255, 255),
    draft_size: int | tuple[int, int] | None = None,
):
    """Open an image fully decoded as RGB: EXIF rotation applied, alpha composited on `background`.

    `draft_size` (one side, or (w, h)) lets JPEG decoding skip detail that is not needed (the result is at least
    that big, not exactly that size): the duplicate finder only looks at thumbnails and a tagger shrinks to 448 px,
    so a full-size decode of a large photo would dominate their run time.
    Raises IncompatibleFile naming the file when it is unreadable or truncated, so callers can skip and list it.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            if draft_size:
                img.draft("RGB", (draft_size, draft_size) if isinstance(draft_size, int) else tuple(draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in _WIDE_GREY_MODES:
                img = _grey_to_8_bit(img)
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, background + (255,))
                canvas.alpha_composite(rgba)
                return canvas.convert("RGB")
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # broken / truncated / huge
        raise IncompatibleFile(f"cannot read image {path}: {exc}") from exc


# 16-bit grey PNGs open as "I;16" (Pillow 10) or "I" (Pillow 9). Pillow's convert("RGB") clips those values at
# 255 instead of scaling them, so a 16-bit grey photo would come out almost white in training and tagging.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _grey_to_8_bit(img):
    """A 16-bit grey image as 8-bit "L", scaled (0..65535 -> 0..255) rather than clipped."""
    import numpy as np
    from PIL import Image

    values = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as `open_image_rgb` returns it (EXIF rotation applied), after checking that the whole file
    decodes. JPEGs decode at 1/8 scale (still reading every byte, so truncation is caught): a dataset scan of
    camera photos runs several times faster than opening each image. Raises IncompatibleFile like open_image_rgb.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.format == "JPEG":
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            orientation = img.getexif().get(0x0112, 1)  # the tag exif_transpose acts on (EXIF or XMP)
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # a "bomb" is no OSError
        raise IncompatibleFile(f"cannot read image {path}: {exc}") from exc
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
