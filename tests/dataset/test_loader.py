"""Batches: repeats and reg counting, determinism and resume, augmentation applied and recorded, validation split."""

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest

from lib_lora.dataset.loader import Dataset
from lib_lora.dataset.plan import balance_reg_repeats, split_counts, steps_per_epoch
from lib_lora.errors import BadInput
from tests.fixtures.images import make_dataset

from .conftest import add_image, small_options


def keys_of(ds, specs):
    return [ds.images[it.image].entry.key for s in specs for it in s.items]


def test_repeats_counts_and_batches(two_concepts):
    ds = Dataset.build(small_options(two_concepts, train_batch_size=4))
    assert ds.num_train_images == 3 * 3 + 3 * 2
    specs = ds.epoch_batches(1)
    assert len(specs) == ds.batches_per_epoch == 4  # one 64x64 bucket: ceil(15 / 4)
    seen = Counter(keys_of(ds, specs))
    assert {n for k, n in seen.items() if "3_alice" in k} == {3} and {n for k, n in seen.items() if "2_bob" in k} == {2}
    assert sorted(len(s.items) for s in specs) == [3, 4, 4, 4]
    assert ds.dataset_dirs() == {"3_alice": {"n_repeats": 3, "img_count": 3}, "2_bob": {"n_repeats": 2, "img_count": 3}}
    assert steps_per_epoch(ds.batches_per_epoch, gradient_accumulation_steps=3) == 2
    assert steps_per_epoch(9, 1, num_processes=2) == 5


def test_batches_never_mix_buckets(tmp_path):
    root = tmp_path / "train"
    for i in range(3):
        add_image(root / "2_wide", f"w{i}.png", size=(96, 48), seed=i, caption="wide")
        add_image(root / "2_tall", f"t{i}.png", size=(48, 96), seed=10 + i, caption="tall")
    ds = Dataset.build(small_options(root, train_batch_size=4))
    specs = ds.epoch_batches(1)
    assert len(specs) == 4  # ceil(6/4) per bucket
    for spec in specs:
        assert {ds.images[it.image].choice.bucket for it in spec.items} == {spec.bucket}
    batch = ds.load_batch(specs[0])
    w, h = specs[0].bucket
    assert tuple(batch.pixels.shape[1:]) == (3, h, w) and batch.target_sizes[0] == (h, w)
    resolutions = {tuple(b["resolution"]) for b in ds.bucket_info()["buckets"].values()}
    assert resolutions == {(80, 48), (48, 80)}  # area capped at 64 x 64
    assert json.loads(json.dumps(ds.bucket_info()))["buckets"]["0"]["count"] == 6


def test_reg_images_balanced_to_train_count_with_prior_weight(two_concepts, tmp_path):
    assert balance_reg_repeats(10, [1, 1, 1]) == [4, 3, 3]
    assert balance_reg_repeats(4, [3, 3, 3]) == [3, 3, 0]  # more reg than train: some unused
    reg = make_dataset(tmp_path / "reg", {"person": 1}, per_concept=2, captions=False)
    ds = Dataset.build(small_options(two_concepts, reg_data_dir=str(reg), prior_loss_weight=0.5))
    assert ds.num_reg_images == 2 and ds.num_train_images == 15
    specs = ds.epoch_batches(1)
    items = [it for s in specs for it in s.items]
    reg_items = [it for it in items if ds.images[it.image].role == "reg"]
    assert len(reg_items) == 15 and {it.loss_weight for it in reg_items} == {0.5}
    assert {it.caption for it in reg_items} == {"person"}
    assert {it.loss_weight for it in items if it not in reg_items} == {1.0}
    batch = ds.load_batch(next(s for s in specs if any(ds.images[i.image].role == "reg" for i in s.items)))
    assert [w for w, r in zip(batch.loss_weights.tolist(), batch.is_reg) if r] == [0.5] * sum(batch.is_reg)
    assert ds.dataset_dirs(reg=True) == {"1_person": {"n_repeats": 1, "img_count": 2}}
    assert set(ds.tag_frequency()) == {"3_alice", "2_bob", "1_person"}
    assert ds.tag_frequency()["3_alice"] == {"alice": 3, "tag0": 1, "tag1": 1, "tag2": 1, "shared tag": 3}


def test_same_seed_same_batches_other_epoch_other_order(two_concepts):
    opts = small_options(two_concepts, flip_aug=True, shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.2)
    first, again = Dataset.build(opts), Dataset.build(opts)
    assert first.epoch_batches(3) == again.epoch_batches(3)  # a resumed run rebuilds and replays epoch 3
    assert keys_of(first, first.epoch_batches(1)) != keys_of(first, first.epoch_batches(2))
    other = Dataset.build(small_options(two_concepts, seed=2, flip_aug=True, shuffle_caption=True, keep_tokens=1))
    assert keys_of(first, first.epoch_batches(1)) != keys_of(other, other.epoch_batches(1))
    spec = first.epoch_batches(2)[1]
    assert np.array_equal(first.load_batch(spec).pixels.numpy(), again.load_batch(spec).pixels.numpy())
    with pytest.raises(ValueError):
        first.epoch_batches(0)


def test_augment_streams_are_independent(two_concepts):
    """Turning flip on must not change which captions an epoch trains with."""
    base = small_options(two_concepts, shuffle_caption=True, caption_dropout_rate=0.3)
    plain = Dataset.build(base).epoch_batches(1)
    with_flip = small_options(two_concepts, shuffle_caption=True, caption_dropout_rate=0.3, flip_aug=True)
    flipped = Dataset.build(with_flip).epoch_batches(1)
    assert [[i.caption for i in s.items] for s in plain] == [[i.caption for i in s.items] for s in flipped]


def test_flip_mirrors_pixels_and_crop_coordinates(tmp_path):
    root = tmp_path / "train"
    add_image(root / "8_c", "wide.png", size=(100, 50), seed=3, caption="c")
    ds = Dataset.build(small_options(root, enable_bucket=False, flip_aug=True, train_batch_size=1))
    items = [s for s in ds.epoch_batches(1)]
    flips = [s.items[0].flip for s in items]
    assert True in flips and False in flips
    plain = ds.load_batch(next(s for s in items if not s.items[0].flip))
    mirrored = ds.load_batch(next(s for s in items if s.items[0].flip))
    assert mirrored.flipped == [True] and plain.flipped == [False]
    assert np.array_equal(mirrored.pixels.numpy(), plain.pixels.numpy()[..., ::-1])
    # 100x50 -> 128x64, centre crop 64 wide at left 32: mirrored left is 128 - 64 - 32 = 32 as well
    assert plain.crop_top_lefts == [(0, 32)] and mirrored.crop_top_lefts == [(0, 32)]
    assert plain.original_sizes == [(50, 100)] and plain.target_sizes == [(64, 64)]


def test_random_crop_moves_within_the_image_and_is_recorded(tmp_path):
    root = tmp_path / "train"
    add_image(root / "20_c", "wide.png", size=(100, 50), seed=3, caption="c")
    ds = Dataset.build(small_options(root, enable_bucket=False, random_crop=True, flip_aug=True, train_batch_size=1))
    lefts = set()
    for spec in ds.epoch_batches(1):
        item = spec.items[0]
        left, top = item.crop
        assert 0 <= left <= 64 and top == 0
        lefts.add(left)
        batch = ds.load_batch(spec)
        expected_left = 64 - left if item.flip else left
        assert batch.crop_top_lefts == [(0, expected_left)]
    assert len(lefts) > 5


def test_color_aug_changes_some_images_deterministically(two_concepts):
    ds = Dataset.build(small_options(two_concepts, color_aug=True, train_batch_size=1))
    plain = Dataset.build(small_options(two_concepts, train_batch_size=1))
    specs = ds.epoch_batches(1) + ds.epoch_batches(2) + ds.epoch_batches(3)
    shifted = [s for s in specs if s.items[0].color is not None]
    assert 0 < len(shifted) < len(specs)
    assert {s.items[0].color.kind for s in shifted} <= {"hue", "gamma"}
    spec = shifted[0]
    with_color = ds.load_batch(spec).pixels
    unshifted = plain.load_pixels(dataclasses.replace(spec.items[0], color=None))
    assert not np.allclose(with_color.numpy()[0], unshifted, atol=1e-3)
    assert np.array_equal(with_color.numpy(), ds.load_batch(spec).pixels.numpy())


def test_validation_split_is_never_trained_on(tmp_path):
    root = make_dataset(tmp_path / "train", {"a": 2, "b": 3}, per_concept=5)
    ds = Dataset.build(small_options(root, validation_split=0.4, flip_aug=True))
    assert split_counts(5, 0.4) == (3, 2) and split_counts(10, 0.3) == (7, 3)
    held = {ds.images[i].entry.key for i in range(len(ds.images)) if ds.images[i].role == "validation"}
    assert ds.num_validation_images == len(held) == 4
    for epoch in (1, 2, 3):
        assert held.isdisjoint(keys_of(ds, ds.epoch_batches(epoch)))
    assert ds.num_train_images == 3 * 2 + 3 * 3
    val = ds.validation_batches()
    assert set(keys_of(ds, val)) == held and ds.validation_batches() == val
    assert all(not it.flip and it.color is None for s in val for it in s.items)
    written = {(f"tag{i}", "shared tag") for i in range(5)}
    assert {tuple(it.caption.split(", ")[1:]) for s in val for it in s.items} <= written
    again = Dataset.build(small_options(root, validation_split=0.4))
    assert {p.entry.key for p in again.images if p.role == "validation"} == held
    other = Dataset.build(small_options(root, validation_split=0.4, validation_seed=99))
    assert {p.entry.key for p in other.images if p.role == "validation"} != held
    assert ds.dataset_dirs()["2_a"]["img_count"] == 3


def test_validation_data_dir_and_too_small_split(two_concepts, tmp_path):
    val_root = tmp_path / "val"
    add_image(val_root, "v0.png", seed=40, caption="alice, held out")
    add_image(val_root / "3_alice", "v1.png", seed=41)
    ds = Dataset.build(small_options(two_concepts, validation_data_dir=str(val_root)))
    val_items = [it for s in ds.validation_batches() for it in s.items]
    assert sorted(it.caption for it in val_items) == ["alice", "alice, held out"]
    assert ds.num_train_images == 15 and ds.num_validation_images == 2
    with pytest.raises(BadInput, match="validation_split"):
        Dataset.build(small_options(two_concepts, validation_split=0.1))  # 3 images per folder: none held out


def test_no_upscale_small_image_skipped_with_reason(tmp_path):
    root = tmp_path / "train"
    add_image(root / "1_c", "ok.png", size=(64, 48), caption="c")
    add_image(root / "1_c", "tiny.png", size=(12, 40), caption="c")
    ds = Dataset.build(small_options(root, bucket_no_upscale=True))
    assert [p.entry.path.name for p in ds.images] == ["ok.png"]
    assert ds.images[0].choice.bucket == (64, 48)
    assert [s.path.name for s in ds.skipped] == ["tiny.png"] and "too small" in ds.skipped[0].reason


def test_caption_dropout_exact_under_the_seed(two_concepts):
    """Each (seed, epoch, image, repeat) has its own caption stream; the plan follows it draw for draw."""
    from lib_lora.dataset.plan import CAPTION, item_rng

    ds = Dataset.build(small_options(two_concepts, caption_dropout_rate=0.5, seed=5))
    for epoch in (1, 2):
        items = [it for s in ds.epoch_batches(epoch) for it in s.items]
        for it in items:
            key = ds.images[it.image].entry.key
            expected_drop = item_rng(5, epoch, key, it.repeat, CAPTION).random() < 0.5
            assert (it.caption == "") == expected_drop
        assert 0 < sum(it.caption == "" for it in items) < len(items)
