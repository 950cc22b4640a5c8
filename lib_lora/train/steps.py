"""How many steps a run takes: images x repeats x epochs / batch / gradient accumulation.

Printed by the CLI before anything loads and shown live in the tab while the user edits settings. The count
must be the one the run will use, so images are tested the way the dataset scan tests them (a broken file is
not trained); each file is decoded once and remembered until it changes, so recounting as the user types
reads only the folder listings.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..imagefiles import is_image_file
from .config import TrainConfig

_CONCEPT = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class ConceptCount:
    folder: str
    repeats: int
    images: int  # image files; with check_images, the ones training can read
    unreadable: int = 0  # with check_images: broken image files training skips


def count_concepts(root: str | Path, check_images: bool = False) -> list[ConceptCount]:
    """`N_concept` subfolders of `root` with their image counts (any letter case of the extensions);
    `check_images`: only the images the dataset scan will use (see `lib_lora.dataset.scan.checked_image_size`)."""
    root = Path(root)
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _CONCEPT.match(sub.name)
        if not match:
            continue
        if check_images:
            from ..dataset.scan import usable_image_count

            n, bad = usable_image_count(sub)
        else:
            n = sum(1 for f in sub.iterdir() if not f.name.startswith(".") and f.is_file() and is_image_file(f))
            bad = 0
        found.append(ConceptCount(sub.name, int(match.group(1)), n, bad))
    return found


@dataclass(frozen=True)
class StepPlan:
    train_images: int  # distinct images
    repeated_images: int  # images x repeats (one epoch's worth)
    reg_images: int  # distinct regularization images (x repeats)
    items_per_epoch: int  # repeated images, doubled by regularization as sd-scripts does
    batches_per_epoch: int  # per process
    steps_per_epoch: int  # optimizer steps
    epochs: int
    total_steps: int
    concepts: tuple[ConceptCount, ...] = ()  # the training folders counted (plan_from_folders)

    @property
    def unreadable(self) -> int:
        return sum(c.unreadable for c in self.concepts)

    def describe(self, cfg: TrainConfig) -> str:
        reg = f" + {self.items_per_epoch - self.repeated_images} regularization" if self.reg_images else ""
        bad = f" ({self.unreadable} unreadable left out)" if self.unreadable else ""
        return (
            f"{self.train_images} images{bad} x repeats = {self.repeated_images}{reg} per epoch; "
            f"batch {cfg.train_batch_size}, gradient accumulation {cfg.gradient_accumulation_steps} -> "
            + self.epochs_text()
        )

    def epochs_text(self) -> str:
        """'12 steps per epoch x 3 epochs = 36 steps', or, when max_train_steps ends inside an epoch, '8 steps per
        epoch; max_train_steps 100 -> 13 epochs (the last one partial)': the end of the CLI's plan line and of
        the tab's steps line, so both read the same."""
        epochs = f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        if self.total_steps >= self.steps_per_epoch * self.epochs:
            return f"{self.steps_per_epoch} steps per epoch x {epochs} = {self.total_steps} steps"
        # max_train_steps ends inside an epoch
        partial = "(partial)" if self.epochs == 1 else "(the last one partial)"
        return f"{self.steps_per_epoch} steps per epoch; max_train_steps {self.total_steps} -> {epochs} {partial}"


def plan_steps(
    cfg: TrainConfig,
    repeated_images: int,
    train_images: int | None = None,
    reg_images: int = 0,
    batches_per_epoch: int | None = None,
    num_processes: int = 1,
) -> StepPlan:
    """The step plan. `batches_per_epoch` (from buckets, where each bucket rounds up on its own) overrides
    the plain ceil(items / batch). With regularization images sd-scripts pads them to the number of training
    images, so an epoch holds twice the items."""
    items = repeated_images * 2 if reg_images > 0 else repeated_images
    batches = batches_per_epoch if batches_per_epoch is not None else math.ceil(items / max(1, cfg.train_batch_size))
    batches = math.ceil(batches / max(1, num_processes))
    per_epoch = max(1, math.ceil(batches / max(1, cfg.gradient_accumulation_steps))) if batches else 0
    if cfg.max_train_epochs:
        epochs = cfg.max_train_epochs
        total = epochs * per_epoch
    else:
        total = cfg.max_train_steps
        epochs = math.ceil(total / per_epoch) if per_epoch else 0
    return StepPlan(
        train_images=repeated_images if train_images is None else train_images,
        repeated_images=repeated_images,
        reg_images=reg_images,
        items_per_epoch=items,
        batches_per_epoch=batches,
        steps_per_epoch=per_epoch,
        epochs=epochs,
        total_steps=total,
    )


def plan_from_dataset(cfg: TrainConfig, dataset, num_processes: int = 1) -> StepPlan:
    """The plan of a run over a built `lib_lora.dataset.Dataset` (buckets counted): what `train()` runs."""
    distinct = sum(1 for p in getattr(dataset, "images", ()) if p.role == "train") or None
    return plan_steps(cfg, dataset.num_train_images, train_images=distinct,
                      reg_images=getattr(dataset, "num_reg_images", 0),
                      batches_per_epoch=dataset.batches_per_epoch, num_processes=num_processes)


def plan_from_folders(cfg: TrainConfig, num_processes: int = 1) -> StepPlan:
    """The plan from the folders (no buckets: each batch is full), for the tab and the CLI preview; images the
    dataset scan would skip as unreadable are not counted."""
    if cfg.dataset_config:
        train, reg = _count_subsets(cfg)
    else:
        train = count_concepts(cfg.train_data_dir, True) if cfg.train_data_dir and Path(cfg.train_data_dir).is_dir() else []
        reg = count_concepts(cfg.reg_data_dir, True) if cfg.reg_data_dir and Path(cfg.reg_data_dir).is_dir() else []
    from ..dataset.plan import split_counts

    held_out = cfg.validation_split if not cfg.validation_data_dir else 0.0
    repeated = sum(c.repeats * split_counts(c.images, held_out)[0] for c in train)
    plan = plan_steps(
        cfg,
        repeated_images=repeated,
        train_images=sum(c.images for c in train),
        reg_images=sum(c.images for c in reg),
        num_processes=num_processes,
    )
    return dataclasses.replace(plan, concepts=tuple(train))


def _count_subsets(cfg: TrainConfig) -> tuple[list[ConceptCount], list[ConceptCount]]:
    """(training, reg) counts of a dataset config's subsets; none when the file cannot be read (validate says why)."""
    from ..dataset.scan import usable_image_count
    from ..errors import BadInput
    from .dataset_config import dataset_subsets

    try:
        subsets = dataset_subsets(cfg)
    except BadInput:
        return [], []
    found: tuple[list[ConceptCount], list[ConceptCount]] = ([], [])
    for sub in subsets:
        n, bad = usable_image_count(Path(sub.image_dir))
        found[sub.is_reg].append(ConceptCount(Path(sub.image_dir).name, sub.num_repeats, n, bad))
    return found
