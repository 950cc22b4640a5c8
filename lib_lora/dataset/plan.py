"""Pure planning: how often each image is seen, which images are held out, and the batches of an epoch.

Every random choice is drawn from a stream named by (seed, epoch, image, repeat, purpose), never from a shared
generator, so the batches of epoch 7 are the same whether the run started at epoch 1 or resumed at epoch 7, and
turning one augmentation on does not change the draws of another.
"""

from __future__ import annotations

import hashlib
import math
from typing import Hashable, Sequence

import numpy as np

Size = tuple[int, int]

# purposes of the per-item streams
ORDER, FLIP, CROP, COLOR, CAPTION, SPLIT = range(6)


def stable_hash(text: str) -> int:
    """A 64-bit hash of `text` that is the same in every process (unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def rng_for(*parts: int) -> np.random.Generator:
    """A generator for one named stream; parts are non-negative integers (seed, epoch, hashes, ...)."""
    return np.random.default_rng(np.random.SeedSequence([int(p) & (2**64 - 1) for p in parts]))


def item_rng(seed: int, epoch: int, key: str, repeat: int, purpose: int) -> np.random.Generator:
    return rng_for(seed, epoch, stable_hash(key), repeat, purpose)


def balance_reg_repeats(num_train_images: int, reg_repeats: Sequence[int]) -> list[int]:
    """How often each regularisation image is used per epoch, so reg images (with repeats) match the number of
    training images (with repeats), as sd-scripts counts: the first pass uses each image with its folder's repeat
    count until the total is reached; later passes add one repeat per image in order. 0 = not used."""
    used = [0] * len(reg_repeats)
    if num_train_images <= 0 or not reg_repeats:
        return used
    total = 0
    for i, repeats in enumerate(reg_repeats):
        used[i] = repeats
        total += repeats
        if total >= num_train_images:
            return used
    while total < num_train_images:
        for i in range(len(used)):
            used[i] += 1
            total += 1
            if total >= num_train_images:
                break
    return used


def split_counts(n: int, fraction: float) -> tuple[int, int]:
    """(train, held out) for a folder of `n` images: train = ceil(n * (1 - fraction)) as sd-scripts does
    (rounded first, so 10 x 0.7 is 7, not 8), the rest held out."""
    if fraction <= 0 or n == 0:
        return n, 0
    train = min(n, math.ceil(round(n * (1.0 - fraction), 9)))
    return train, n - train


def held_out(keys: Sequence[str], fraction: float, seed: int, group: str) -> set[int]:
    """Indices of `keys` (one folder's images) held out for validation: a fixed-seed shuffle, the tail."""
    _, n_val = split_counts(len(keys), fraction)
    if n_val == 0:
        return set()
    order = rng_for(seed, stable_hash(group), SPLIT).permutation(len(keys))
    return {int(i) for i in order[len(keys) - n_val :]}


def epoch_order(groups: dict[Hashable, list], batch_size: int, seed: int, epoch: int) -> list[tuple[Hashable, list]]:
    """Batches of one epoch: each group (a bucket's item list) shuffled and cut into batches of `batch_size` (the
    last one of a group may be smaller), then the batches shuffled, all from the (seed, epoch) stream."""
    rng = rng_for(seed, epoch, ORDER)
    batches: list[tuple[Hashable, list]] = []
    for group in sorted(groups):
        items = list(groups[group])
        order = rng.permutation(len(items))
        items = [items[i] for i in order]
        for start in range(0, len(items), batch_size):
            batches.append((group, items[start : start + batch_size]))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def batch_count(group_sizes: Sequence[int], batch_size: int) -> int:
    """Batches per epoch: one per `batch_size` items of each bucket, rounded up per bucket."""
    return sum(math.ceil(n / batch_size) for n in group_sizes)


def steps_per_epoch(batches: int, gradient_accumulation_steps: int = 1, num_processes: int = 1) -> int:
    """Optimizer steps per epoch as sd-scripts counts them: batches split over processes, then accumulated."""
    per_process = math.ceil(batches / max(1, num_processes))
    return math.ceil(per_process / max(1, gradient_accumulation_steps))
