"""Latent cache in memory and on disk (reused, invalidated when the image changes), and the text-encoder cache."""

import pytest
import torch

from lib_lora.dataset.cache import TextEncoderCache
from lib_lora.dataset.loader import Dataset
from lib_lora.dataset.options import validate_options
from lib_lora.errors import IncompatibleFile
from tests.fixtures.images import pattern_image

from .conftest import pool_encoder, small_options


class CountingEncoder:
    def __init__(self):
        self.images = 0

    def __call__(self, pixels):
        self.images += pixels.shape[0]
        return pool_encoder(pixels)


def test_memory_cache_gives_the_latents_of_the_planned_pixels(two_concepts):
    ds = Dataset.build(small_options(two_concepts, flip_aug=True, cache_latents=True))
    encoder = CountingEncoder()
    cache = ds.cache_latents(encoder, "pool8")
    assert (cache.encoded, cache.reused) == (6, 0) and encoder.images == 12  # each image and its mirror
    pixel_ds = Dataset.build(small_options(two_concepts, flip_aug=True))
    for spec in ds.epoch_batches(1)[:4]:
        batch = ds.load_batch(spec)
        assert batch.pixels is None and batch.latents.shape == (len(spec.items), 4, 8, 8)
        expected = pool_encoder(pixel_ds.load_batch(spec).pixels)  # same plan, flips included
        assert torch.allclose(batch.latents, expected, atol=1e-6)
    again = ds.cache_latents(encoder, "pool8")
    assert (again.encoded, again.reused) == (0, 6) and encoder.images == 12
    ds.drop_latents()
    assert ds.load_batch(ds.epoch_batches(1)[0]).latents is None


def test_disk_cache_reused_across_runs_and_invalidated_by_changes(two_concepts):
    opts = small_options(two_concepts, cache_latents_to_disk=True)
    encoder = CountingEncoder()
    Dataset.build(opts).cache_latents(encoder, "pool8")
    files = sorted(two_concepts.rglob("*.latents.npz"))
    assert len(files) == 6 and files[0].name.endswith(".png.64x64.latents.npz")
    assert encoder.images == 6

    rerun = Dataset.build(opts)
    cache = rerun.cache_latents(encoder, "pool8")
    assert (cache.encoded, cache.reused) == (0, 6)
    spec = rerun.epoch_batches(1)[0]
    first_latents = rerun.load_batch(spec).latents

    changed = two_concepts / "3_alice" / "001.png"
    pattern_image(99).save(changed)  # same name, same size, new content
    cache = Dataset.build(opts).cache_latents(encoder, "pool8")
    assert (cache.encoded, cache.reused) == (1, 5)

    other_vae = Dataset.build(opts).cache_latents(encoder, "another-vae")
    assert other_vae.encoded == 6  # latents of another encoder are never reused

    files[0].write_bytes(b"garbage")
    damaged = Dataset.build(opts).cache_latents(encoder, "another-vae")
    assert (damaged.encoded, damaged.reused) == (1, 5)
    assert first_latents.shape == (2, 4, 8, 8)


def test_a_stop_between_vae_batches_keeps_what_was_written_and_no_partial_cache(two_concepts):
    opts = small_options(two_concepts, cache_latents_to_disk=True, train_batch_size=2)
    encoder = CountingEncoder()
    ds = Dataset.build(opts)
    cache = ds.cache_latents(encoder, "pool8", should_stop=lambda: encoder.images >= 2)
    assert cache.stopped and (cache.encoded, cache.total) == (2, 6) and encoder.images == 2
    assert len(list(two_concepts.rglob("*.latents.npz"))) == 2
    assert ds.latents is None and ds.load_batch(ds.epoch_batches(1)[0]).latents is None  # pixels, not half a cache
    rest = Dataset.build(opts).cache_latents(encoder, "pool8", should_stop=lambda: False)
    assert not rest.stopped and (rest.encoded, rest.reused) == (4, 2)


def test_disk_cache_in_a_cache_folder_and_new_bucket(two_concepts, tmp_path):
    cache_dir = tmp_path / "latents"
    encoder = CountingEncoder()
    on_disk = dict(cache_latents_to_disk=True, latents_cache_dir=str(cache_dir))
    Dataset.build(small_options(two_concepts, **on_disk)).cache_latents(encoder, "v")
    assert len(list(cache_dir.glob("*.npz"))) == 6 and not list(two_concepts.rglob("*.npz"))
    bigger = Dataset.build(small_options(two_concepts, resolution=96, max_bucket_reso=128, **on_disk))
    assert bigger.cache_latents(encoder, "v").encoded == 6  # another bucket: new files beside the old ones
    assert len(list(cache_dir.glob("*.npz"))) == 12


def test_cache_refused_with_pixel_changing_augmentations(two_concepts):
    problems = validate_options(small_options(two_concepts, cache_latents=True, random_crop=True))
    assert any("random_crop" in p for p in problems)


def test_validation_images_cached_without_mirror(tmp_path):
    from tests.fixtures.images import make_dataset

    root = make_dataset(tmp_path / "train", {"a": 1}, per_concept=4)
    ds = Dataset.build(small_options(root, validation_split=0.25, flip_aug=True, cache_latents=True))
    encoder = CountingEncoder()
    ds.cache_latents(encoder, "v")
    assert encoder.images == 3 * 2 + 1
    val = ds.load_batch(ds.validation_batches()[0])
    assert val.latents.shape[0] == 1 and val.flipped == [False]


def test_text_encoder_cache_encodes_each_caption_once(two_concepts):
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return [torch.full((2,), float(len(t))) for t in texts]

    ds = Dataset.build(small_options(two_concepts, caption_dropout_rate=0.5))
    variants = ds.caption_variants()
    assert "" in variants and "alice, tag0, shared tag" in variants and len(variants) == 7
    cache = TextEncoderCache(encode)
    cache.prefill(variants, batch_size=4)
    assert sum(len(c) for c in calls) == 7 and len(calls) == 2
    for spec in ds.epoch_batches(1):
        outs = cache.get([it.caption for it in spec.items])
        assert [o[0].item() for o in outs] == [float(len(it.caption)) for it in spec.items]
    assert sum(len(c) for c in calls) == 7
    assert Dataset.build(small_options(two_concepts, shuffle_caption=True)).caption_variants() is None
    with pytest.raises(IncompatibleFile):
        TextEncoderCache(lambda texts: []).get(["x"])
