"""The dataset's settings, with sd-scripts' names and defaults, and the checks that run before anything loads.

The training config (lib_lora/train) carries the same field names; `DatasetOptions.from_config(cfg)` picks them
out of any object or mapping, so the two never need a hand-written copy of each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Union

from ..errors import BadInput

if TYPE_CHECKING:
    from .scan import Subset

Resolution = Union[int, "tuple[int, int]", str]


@dataclass(frozen=True)
class DatasetOptions:
    # folders (sd-scripts DreamBooth layout: N_concept sub-folders, N = repeats)
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    caption_extension: str = ".txt"
    caption_separator: str = ","
    # size and buckets
    resolution: Resolution = 512  # 512, (768, 512) as (width, height), or "768,512"
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    # augmentation
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    # captions
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    # caches
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    latents_cache_dir: str | None = None  # ours: None = `.npz` beside each image
    # regularisation, validation, batching
    prior_loss_weight: float = 1.0
    validation_split: float = 0.0
    validation_seed: int | None = None  # None = seed
    validation_data_dir: str | None = None
    train_batch_size: int = 1
    seed: int = 42
    # sd-scripts' dataset config: image folders with their own repeats / class tokens / caption extension, used
    # instead of train_data_dir and reg_data_dir (lib_lora.train.dataset_config reads the file)
    subsets: "tuple[Subset, ...]" = ()

    @property
    def size(self) -> tuple[int, int]:
        """The training resolution as (width, height)."""
        return parse_resolution(self.resolution)

    @property
    def latents_cached(self) -> bool:
        return bool(self.cache_latents or self.cache_latents_to_disk)

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> "DatasetOptions":
        """Build from any object or mapping that carries (some of) these field names, e.g. the TrainConfig."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if isinstance(config, Mapping):
                if field.name in config:
                    values[field.name] = config[field.name]
            elif hasattr(config, field.name):
                values[field.name] = getattr(config, field.name)
        values.update(overrides)
        return cls(**values)


def parse_resolution(value: Resolution) -> tuple[int, int]:
    """512 -> (512, 512); (768, 512) or "768,512" -> (768, 512) as (width, height); BadInput otherwise."""
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
        elif isinstance(value, int):
            parts = [value]
        else:
            parts = [int(p) for p in value]
    except (TypeError, ValueError):
        raise BadInput(f"resolution {value!r} is not a number or 'width,height'") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise BadInput(f"resolution {value!r} is not a positive number or 'width,height'")
    return parts[0], parts[1]


def bucket_range(opts: DatasetOptions) -> tuple[int, int]:
    """min/max bucket sizes moved to multiples of bucket_reso_steps (min down, max up), as sd-scripts does."""
    steps = opts.bucket_reso_steps
    lo = opts.min_bucket_reso - opts.min_bucket_reso % steps
    hi = opts.max_bucket_reso + (-opts.max_bucket_reso) % steps
    return lo, hi


def validate_options(opts: DatasetOptions) -> list[str]:
    """Every problem with the settings alone (no file is touched), each one line a user can act on."""
    problems: list[str] = []
    try:
        width, height = opts.size
    except BadInput as exc:
        problems.append(str(exc))
        width = height = None
    if width is not None and (width % 8 or height % 8):
        problems.append(f"resolution {width}x{height} must be a multiple of 8 in both sides")
    if opts.bucket_reso_steps <= 0 or opts.bucket_reso_steps % 8:
        problems.append(f"bucket_reso_steps {opts.bucket_reso_steps} must be a positive multiple of 8 (64 is usual)")
    elif opts.enable_bucket and not opts.bucket_no_upscale:
        lo, hi = bucket_range(opts)
        if lo <= 0:
            problems.append(f"min_bucket_reso {opts.min_bucket_reso} must be at least bucket_reso_steps")
        if lo > hi:
            problems.append(f"min_bucket_reso {opts.min_bucket_reso} is above max_bucket_reso {opts.max_bucket_reso}")
        if width is not None and min(width, height) < lo:
            short = min(width, height)
            problems.append(f"min_bucket_reso {opts.min_bucket_reso} is above the resolution's short side {short}")
        if width is not None and max(width, height) > hi:
            long = max(width, height)
            problems.append(f"max_bucket_reso {opts.max_bucket_reso} is below the resolution's long side {long}")
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        rate = getattr(opts, name)
        if not 0.0 <= rate <= 1.0:
            problems.append(f"{name} {rate} must be between 0 and 1")
    if not 0.0 <= opts.validation_split < 1.0:
        problems.append(f"validation_split {opts.validation_split} must be at least 0 and below 1")
    if opts.validation_split > 0 and opts.validation_data_dir:
        problems.append("give validation_split or validation_data_dir, not both")
    if opts.keep_tokens < 0:
        problems.append(f"keep_tokens {opts.keep_tokens} must not be negative")
    if opts.caption_dropout_every_n_epochs < 0:
        problems.append(f"caption_dropout_every_n_epochs {opts.caption_dropout_every_n_epochs} must not be negative")
    if opts.train_batch_size < 1:
        problems.append(f"train_batch_size {opts.train_batch_size} must be at least 1")
    if opts.prior_loss_weight < 0:
        problems.append(f"prior_loss_weight {opts.prior_loss_weight} must not be negative")
    if not opts.caption_extension:
        problems.append("caption_extension is empty (use .txt)")
    if opts.latents_cached and (opts.color_aug or opts.random_crop):
        problems.append(
            "cache_latents cannot be combined with color_aug or random_crop (they change the pixels every epoch): "
            "turn off the cache or those augmentations"
        )
    if not opts.train_data_dir and not opts.subsets:
        problems.append("train_data_dir is not set")
    for sub in opts.subsets:
        if sub.num_repeats < 1:
            problems.append(f"{sub.name or sub.image_dir}: num_repeats {sub.num_repeats} must be at least 1")
    return problems


def check_options(opts: DatasetOptions) -> None:
    """Raise BadInput listing every problem `validate_options` finds."""
    problems = validate_options(opts)
    if problems:
        raise BadInput("; ".join(problems))
