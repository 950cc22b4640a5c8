"""Helpers for the dataset tests: tiny synthetic datasets, options with small buckets, a real pooling encoder."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib_lora.dataset.options import DatasetOptions
from tests.fixtures.images import make_dataset, pattern_image


def small_options(root: Path, **kw) -> DatasetOptions:
    """Options sized for 64-px test images: resolution 64, buckets 32..128 in steps of 16."""
    base = dict(
        train_data_dir=str(root),
        resolution=64,
        enable_bucket=True,
        min_bucket_reso=32,
        max_bucket_reso=128,
        bucket_reso_steps=16,
        train_batch_size=2,
        seed=1,
    )
    base.update(kw)
    return DatasetOptions(**base)


def add_image(folder: Path, name: str, size=(64, 64), seed: int = 0, caption: str | None = None, mode: str = "RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    pattern_image(seed, size, mode).save(folder / name)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    return folder / name


def pool_encoder(pixels):
    """A real, deterministic stand-in for a VAE: 8x average pooling to 4 channels (3 colours + their mean)."""
    import torch

    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)


@pytest.fixture
def two_concepts(tmp_path) -> Path:
    """train/3_alice (3 images) + train/2_bob (3 images), 64x64 with captions."""
    return make_dataset(tmp_path / "train", {"alice": 3, "bob": 2}, per_concept=3)
