"""Turning one decoded image into the pixels a bucket trains on: resize, crop, colour shift, mirror.

Decisions (flip or not, where to crop, which colour shift) are drawn by the loader from per-item random streams
and passed in, so these functions are deterministic and the same decisions can be replayed after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Size = tuple[int, int]

# sd-scripts' color_aug: in a third of the images, either a hue shift of up to 8 on OpenCV's 0..180 hue circle
# (16 degrees) or a gamma between 0.95 and 1.05, half and half.
COLOR_PROBABILITY = 0.33
HUE_LIMIT_DEGREES = 16.0
GAMMA_RANGE = (0.95, 1.05)


@dataclass(frozen=True)
class ColorShift:
    kind: str  # "hue" (amount in degrees) or "gamma" (amount is the exponent)
    amount: float


def choose_color(rng: Any) -> ColorShift | None:
    """Draw a colour shift (or none) from `rng` (`random.Random` or `numpy.random.Generator`)."""
    if rng.random() > COLOR_PROBABILITY:
        return None
    if rng.random() > 0.5:
        return ColorShift("hue", float(rng.uniform(-HUE_LIMIT_DEGREES, HUE_LIMIT_DEGREES)))
    return ColorShift("gamma", float(rng.uniform(*GAMMA_RANGE)))


def apply_color(img, shift: ColorShift | None):
    """The PIL RGB image with `shift` applied. Gamma works on 0..1 values (sd-scripts applies it to 0..255 and
    clips, which brightens every pixel above ~1 and saturates highlights; a gamma should not)."""
    from PIL import Image

    if shift is None:
        return img
    if shift.kind == "hue":
        hsv = np.asarray(img.convert("HSV")).copy()
        step = int(round(shift.amount * 256 / 360))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + step) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")
    if shift.kind == "gamma":
        values = np.asarray(img, dtype=np.float32) / 255.0
        out = np.clip(np.power(values, shift.amount) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(out, "RGB")
    raise ValueError(f"unknown colour shift {shift.kind!r}")


def resize_and_crop(img, resized: Size, bucket: Size, left: int, top: int):
    """Resize the PIL image to `resized` (area averaging when shrinking, Lanczos when enlarging, as sd-scripts
    does) and cut the `bucket`-sized window at (left, top)."""
    from PIL import Image

    if img.size != tuple(resized):
        shrinking = img.size[0] >= resized[0] and img.size[1] >= resized[1]
        method = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
        img = img.resize(tuple(resized), method)
    if img.size != tuple(bucket):
        img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    return img


def mirror(img):
    """Left-right mirror of a PIL image."""
    from PIL import Image

    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_chw(img) -> np.ndarray:
    """PIL RGB -> float32 (3, H, W) in [-1, 1], the range the VAE encodes."""
    array = np.asarray(img, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1)) / 127.5 - 1.0
