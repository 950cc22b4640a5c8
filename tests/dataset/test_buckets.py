"""Aspect-ratio buckets: the bucket set, the bucket an image lands in, and the resize and crop (sd-scripts' numbers)."""

import json

import pytest

from lib_lora.dataset import buckets as B


def test_bucket_set_for_512_defaults():
    resos = B.bucket_resolutions((512, 512), 256, 1024, 64)
    assert resos == sorted(resos)
    assert (512, 512) in resos
    # long side grows while the short side shrinks in 64-steps, area never above 512 x 512
    for pair in [(576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (1024, 256)]:
        assert pair in resos and pair[::-1] in resos
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in resos)
    assert all(256 <= min(w, h) and max(w, h) <= 1024 and w * h <= 512 * 512 for w, h in resos)
    assert len(resos) == 17


def test_bucket_set_respects_min_and_max():
    resos = B.bucket_resolutions((512, 512), 384, 768, 64)
    assert min(min(r) for r in resos) == 384 and max(max(r) for r in resos) == 640
    assert (832, 256) not in resos


def test_landscape_image_picks_closest_ratio_and_covers_it():
    resos = B.bucket_resolutions((512, 512), 256, 1024, 64)
    choice = B.select_bucket((768, 512), resos)  # ratio 1.5: 640x384 (1.67) is closer than 576x448 (1.29)
    assert choice.bucket == (640, 384)
    assert choice.resized == (640, 427)  # width matched, height covers the bucket
    assert B.center_crop(choice.resized, choice.bucket) == (0, 21)
    assert choice.ar_error == pytest.approx(640 / 384 - 1.5)


def test_portrait_and_exact_sizes():
    resos = B.bucket_resolutions((512, 512), 256, 1024, 64)
    portrait = B.select_bucket((1000, 2000), resos)  # ratio 0.5: 320x704 (0.45) beats 384x640 (0.6)
    assert portrait.bucket == (320, 704) and portrait.resized == (352, 704)  # heights matched, width cropped
    assert B.center_crop(portrait.resized, portrait.bucket) == (16, 0)
    exact = B.select_bucket((640, 384), resos)
    assert exact.bucket == (640, 384) and exact.resized == (640, 384)
    small = B.select_bucket((100, 100), resos)  # upscaled
    assert small.bucket == (512, 512) and small.resized == (512, 512)


def test_no_upscale_keeps_small_images_small_and_shrinks_large_ones():
    small = B.select_bucket_no_upscale((300, 200), (512, 512), 64)
    assert small.resized == (300, 200) and small.bucket == (256, 192)
    assert B.center_crop(small.resized, small.bucket) == (22, 4)
    large = B.select_bucket_no_upscale((2000, 1000), (512, 512), 64)
    assert large.resized == (640, 320) and large.bucket == (640, 320)
    with pytest.raises(ValueError):
        B.select_bucket_no_upscale((40, 300), (512, 512), 64)


def test_without_buckets_the_resolution_is_covered_then_cropped():
    choice = B.select_bucket((100, 50), [(64, 64)])
    assert choice.bucket == (64, 64) and choice.resized == (128, 64)
    assert B.center_crop(choice.resized, choice.bucket) == (32, 0)
    assert B.crop_room(choice.resized, choice.bucket) == (64, 0)
    assert B.flipped_left(10, choice.resized, choice.bucket) == 54


def test_bucket_info_shape_for_metadata():
    info = B.bucket_info([((640, 384), 20), ((512, 512), 30), ((640, 384), 5), ((384, 640), 0)], [0.1, -0.3])
    assert info == {
        "buckets": {"0": {"resolution": [512, 512], "count": 30}, "1": {"resolution": [640, 384], "count": 25}},
        "mean_img_ar_error": pytest.approx(0.2),
    }
    assert json.loads(json.dumps(info))["buckets"]["1"]["resolution"] == [640, 384]
