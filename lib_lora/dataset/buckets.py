"""Aspect-ratio buckets as pure integer functions: which bucket an image goes to, how it is resized and cropped.

Same numbers as sd-scripts (`make_bucket_resolutions`, `BucketManager.select_bucket`), so a dataset lands in the
same buckets here as there and `ss_bucket_info` reads the same. Sizes are always (width, height).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

Size = tuple[int, int]


@dataclass(frozen=True)
class BucketChoice:
    bucket: Size  # the training size (width, height) the image is cropped to
    resized: Size  # the image is first resized to this (>= bucket in both sides), then cropped
    ar_error: float  # bucket aspect ratio minus image aspect ratio


def bucket_resolutions(resolution: Size, min_reso: int = 256, max_reso: int = 1024, steps: int = 64) -> list[Size]:
    """The predefined bucket set for `resolution` (sorted): sides multiples of `steps` within [min, max], area at
    most the resolution's area, plus the square whose side is the rounded-down square root of that area."""
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (max_area // width) // steps * steps)
        if height >= min_reso:
            resos.add((width, height))
            resos.add((height, width))
        width += steps
    return sorted(resos)


def _round_to_steps(x: float, steps: int) -> int:
    value = int(x + 0.5)
    return value - value % steps


def select_bucket(image: Size, buckets: Sequence[Size]) -> BucketChoice:
    """Pick the predefined bucket whose aspect ratio is closest (an exact size match wins), and the resize that
    covers it with the image's aspect ratio kept (the overflow is cropped)."""
    width, height = image
    aspect = width / height
    if tuple(image) in set(buckets):
        bucket = (width, height)
    else:
        bucket = min(buckets, key=lambda b: (abs(b[0] / b[1] - aspect)))
        # ties: sd-scripts takes the first in sorted order (numpy argmin); `min` does the same on a sorted list
    if aspect > bucket[0] / bucket[1]:  # image is wider: match heights
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    return BucketChoice(tuple(bucket), resized, bucket[0] / bucket[1] - aspect)


def select_bucket_no_upscale(image: Size, resolution: Size, steps: int = 64) -> BucketChoice:
    """bucket_no_upscale: never enlarge. An image larger in area than the resolution is shrunk to that area
    (long or short side rounded to `steps`, whichever keeps the aspect ratio better); the bucket is then the
    resized size rounded down to `steps`. Raises ValueError when a side would be below `steps`."""
    width, height = image
    aspect = width / height
    max_area = resolution[0] * resolution[1]
    if width * height > max_area:
        r_width = math.sqrt(max_area * aspect)
        r_height = max_area / r_width
        bw = _round_to_steps(r_width, steps)
        bh_for_w = _round_to_steps(bw / aspect, steps)
        bh = _round_to_steps(r_height, steps)
        bw_for_h = _round_to_steps(bh * aspect, steps)
        err_w = abs(bw / bh_for_w - aspect) if bh_for_w else math.inf
        err_h = abs(bw_for_h / bh - aspect) if bh else math.inf
        if err_w < err_h:
            resized = (bw, int(bw / aspect + 0.5))
        else:
            resized = (int(bh * aspect + 0.5), bh)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    if min(bucket) <= 0:
        raise ValueError(f"image {width}x{height} is smaller than bucket_reso_steps {steps}")
    return BucketChoice(bucket, resized, bucket[0] / bucket[1] - aspect)


def center_crop(resized: Size, bucket: Size) -> tuple[int, int]:
    """(left, top) of a centred `bucket`-sized window in a `resized` image."""
    return (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2


def crop_room(resized: Size, bucket: Size) -> tuple[int, int]:
    """How far the crop window can move: random_crop picks left in [0, room_x] and top in [0, room_y]."""
    return resized[0] - bucket[0], resized[1] - bucket[1]


def flipped_left(left: int, resized: Size, bucket: Size) -> int:
    """The crop's left edge measured in the mirrored image (what SDXL's crop conditioning sees after a flip)."""
    return resized[0] - bucket[0] - left


def bucket_info(counts: Iterable[tuple[Size, int]], ar_errors: Sequence[float]) -> dict:
    """`ss_bucket_info`: {"buckets": {"0": {"resolution": [w, h], "count": n}, ...}, "mean_img_ar_error": x}.

    `counts` are (bucket, images including repeats); buckets are numbered in sorted size order, empty ones left
    out; the error is the mean absolute aspect-ratio error over images (without repeats)."""
    totals: dict[Size, int] = {}
    for bucket, count in counts:
        totals[tuple(bucket)] = totals.get(tuple(bucket), 0) + count
    used = sorted(b for b, n in totals.items() if n > 0)
    buckets = {str(i): {"resolution": [b[0], b[1]], "count": totals[b]} for i, b in enumerate(used)}
    mean_error = float(sum(abs(e) for e in ar_errors) / len(ar_errors)) if ar_errors else 0.0
    return {"buckets": buckets, "mean_img_ar_error": mean_error}
