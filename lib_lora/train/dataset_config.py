"""sd-scripts' `--dataset_config` file: `[general]`, `[[datasets]]`, `[[datasets.subsets]]` (TOML or JSON).

The facts follow sd-scripts (docs/config_README-en.md and its schema): a value is looked up in the subset, then its
dataset, then `[general]`, then the command line / `--config_file` (argparse) values, then the defaults; the
file's `batch_size` is `--train_batch_size`; `--train_data_dir` / `--reg_data_dir` are ignored when a dataset config
is given; `image_dir` is opened as written (a relative path is relative to the working directory); an unknown key
is an error. Subsets are DreamBooth style: images directly in `image_dir`, repeats from `num_repeats`, the caption
of an image without a caption file from `class_tokens` (else empty).

Our engine trains one dataset: per image folder it honours repeats, class tokens, reg and caption extension; the
rest (augmentation, caption handling, resolution, buckets, batch size) applies to the whole run. Where a file gives
such an option different values per subset or per dataset, the run is refused with one line naming the place and
the option instead of silently training with one of the values.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import BadInput
from .config import TrainConfig
from .config_io import coerce, tomllib

# options of a whole dataset ([general] or [[datasets]]); file name -> TrainConfig field
DATASET_OPTIONS = {
    "resolution": "resolution", "batch_size": "train_batch_size", "enable_bucket": "enable_bucket",
    "min_bucket_reso": "min_bucket_reso", "max_bucket_reso": "max_bucket_reso", "bucket_reso_steps": "bucket_reso_steps",
    "bucket_no_upscale": "bucket_no_upscale", "validation_split": "validation_split", "validation_seed": "validation_seed",
}
# subset options ([general], [[datasets]] or a subset) that this trainer applies to the whole run
WHOLE_RUN_SUBSET_OPTIONS = (
    "flip_aug", "color_aug", "random_crop", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
    "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
)
# subset options honoured per subset (may also stand in [general] / [[datasets]])
PER_SUBSET_OPTIONS = ("num_repeats", "class_tokens", "caption_extension")
# only in a subset
SUBSET_ONLY = ("image_dir", "is_reg")
# sd-scripts options this trainer does not have: allowed while they hold a value that changes nothing (None = any
# value: they only tune sd-scripts' own caches); any other value is refused
NOT_HERE: dict[str, tuple | None] = {
    "caption_separator": (",",), "secondary_separator": ("",), "caption_prefix": ("",), "caption_suffix": ("",),
    "enable_wildcard": (False,), "token_warmup_min": (1,), "token_warmup_step": (0,), "face_crop_aug_range": (),
    "resize_interpolation": ("",), "custom_attributes": ({},), "alpha_mask": (False,), "network_multiplier": (1, 1.0),
    "skip_image_resolution": (), "validation_split_num": (0,), "cache_info": None,
}
# subsets of other training methods
REFUSED_SUBSETS = {
    "metadata_file": "metadata_file makes it a fine-tuning subset, which this trainer does not have: use image_dir "
                     "with caption files beside the images (DreamBooth style)",
    "conditioning_data_dir": "conditioning_data_dir makes it a ControlNet subset, which this trainer does not have",
}

_ANYWHERE = set(WHOLE_RUN_SUBSET_OPTIONS) | {"num_repeats", "class_tokens", "caption_extension"} | set(NOT_HERE) - {"alpha_mask"}
_GENERAL_KEYS = set(DATASET_OPTIONS) | _ANYWHERE
_DATASET_KEYS = _GENERAL_KEYS | {"subsets"}
_SUBSET_KEYS = _ANYWHERE | set(SUBSET_ONLY) | {"alpha_mask"} | set(REFUSED_SUBSETS)
_ALL_KEYS = _DATASET_KEYS | _SUBSET_KEYS


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """What a dataset config decides: TrainConfig values for the whole run, and the image folders."""

    values: dict[str, Any]  # TrainConfig field -> value
    subsets: tuple  # tuple[lib_lora.dataset.Subset, ...]
    notes: tuple[str, ...] = ()


def read_dataset_config(path: str | Path, base: TrainConfig) -> DatasetConfig:
    """Read and check a dataset config against `base` (the command line / --config_file values: sd-scripts' argparse
    layer). Raises BadInput with one line that names the file, the place and the key."""
    path = Path(path)
    try:
        return _read(path, base)
    except BadInput as exc:
        raise BadInput(f"dataset_config {path}: {exc}") from None


def apply_dataset_config(cfg: TrainConfig, notes: list[str] | None = None,
                         given: Iterable[str] = ()) -> TrainConfig:
    """`cfg` with the dataset config's values for the whole run (resolution, batch size, buckets, augmentation)
    and without train_data_dir / reg_data_dir (ignored, as in sd-scripts); unchanged without a dataset config.
    Applying it twice changes nothing, so every entry point (CLI, validate, build_dataset, train) may call it.
    A note names each value the file overrides: those in `given` (the options typed on the command line) and any
    other that differs from the default."""
    if not cfg.dataset_config:
        return cfg
    read = read_dataset_config(cfg.dataset_config, cfg)
    if notes is not None:
        notes.extend(read.notes)
        ignored = [name for name in ("train_data_dir", "reg_data_dir") if getattr(cfg, name)]
        if ignored:
            notes.append(f"ignored because dataset_config is given (as in sd-scripts): {', '.join(ignored)}")
        default, typed = TrainConfig(), set(given)
        for name, value in read.values.items():
            old = getattr(cfg, name)
            if old != value and (name in typed or old != getattr(default, name)):
                notes.append(f"dataset_config sets {name} = {value!r}; the command line's / config file's "
                             f"{old!r} is not used (sd-scripts' precedence)")
    return dataclasses.replace(cfg, **read.values, train_data_dir="", reg_data_dir="")


def dataset_subsets(cfg: TrainConfig) -> tuple:
    """The image folders of cfg's dataset config (empty without one)."""
    if not cfg.dataset_config:
        return ()
    return read_dataset_config(cfg.dataset_config, cfg).subsets


# --------------------------------------------------------------------------------------------------------------


def _load(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise BadInput("a dataset config is a .toml or .json file (sd-scripts reads no other)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput("the file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read it: {exc}") from None
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"not valid JSON: {exc}") from None
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise BadInput("reading TOML on Python 3.10 needs the 'tomli' package (pip install tomli)")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"not valid TOML: {exc}") from None


def _check_keys(table: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(table, Mapping):
        raise BadInput(f"{where} must be a table")
    for key in table:
        if key in allowed:
            continue
        if key in REFUSED_SUBSETS and where.startswith("subset"):
            continue
        if key in SUBSET_ONLY or key in REFUSED_SUBSETS:
            raise BadInput(f"{key} in {where}: it belongs in a [[datasets.subsets]] entry")
        if key in DATASET_OPTIONS or key == "subsets":
            raise BadInput(f"{key} in {where}: it is set per dataset, in [[datasets]] or [general]")
        close = difflib.get_close_matches(key, sorted(_ALL_KEYS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise BadInput(f"unknown key {key} in {where}{hint}; known keys there: {', '.join(sorted(allowed))}")
    return dict(table)


def _not_here(key: str, value: Any, where: str) -> None:
    neutral = NOT_HERE[key]
    if neutral is None:
        return
    if not any(isinstance(value, bool) == isinstance(n, bool) and value == n for n in neutral):
        raise BadInput(f"{key} = {value!r} in {where}: an sd-scripts option this trainer does not have "
                       "(remove it, or set sd-scripts' default)")


def _check_table(table: Mapping[str, Any], where: str) -> None:
    """Every value of one table has the right type, said where it is written (not where a subset inherits it)."""
    for key, raw in table.items():
        if key in NOT_HERE:
            _not_here(key, raw, where)
        elif key in DATASET_OPTIONS:
            _value(DATASET_OPTIONS[key], raw, where, key)
        elif key in WHOLE_RUN_SUBSET_OPTIONS or key == "caption_extension":
            _value(key, raw, where, key)
        elif key == "num_repeats" and (isinstance(raw, bool) or not isinstance(raw, int) or raw < 1):
            raise BadInput(f"num_repeats {raw!r} in {where} must be a whole number of at least 1")
        elif key == "class_tokens" and not isinstance(raw, str):
            raise BadInput(f"class_tokens in {where} must be text, got {raw!r}")
        elif key == "is_reg" and not isinstance(raw, bool):
            raise BadInput(f"is_reg in {where} must be true or false, got {raw!r}")


def _value(field: str, raw: Any, where: str, key: str) -> Any:
    try:
        return coerce(field, raw)
    except BadInput as exc:
        raise BadInput(f"{where}: {exc}".replace(f"setting {field}", key)) from None


def _read(path: Path, base: TrainConfig) -> DatasetConfig:
    from ..dataset.scan import Subset

    data = _load(path)
    if not isinstance(data, Mapping):
        raise BadInput("expected tables [general] and [[datasets]]")
    for key in data:
        if key not in ("general", "datasets"):
            raise BadInput(f"unknown table [{key}] (a dataset config has [general] and [[datasets]] with "
                           "[[datasets.subsets]]; training options go in --config_file)")
    general = _check_keys(data.get("general", {}), _GENERAL_KEYS, "[general]")
    _check_table(general, "[general]")
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise BadInput("no [[datasets]] (add [[datasets]] with at least one [[datasets.subsets]] image_dir)")

    notes: list[str] = []
    dataset_values: list[tuple[str, dict[str, Any]]] = []  # (where, {field: value})
    subsets: list[Subset] = []
    whole_run: dict[str, list[tuple[str, Any]]] = {name: [] for name in WHOLE_RUN_SUBSET_OPTIONS}
    seen_dirs: set[tuple[int, Path]] = set()
    for d, dataset in enumerate(datasets, 1):
        dwhere = f"[[datasets]] {d}"
        dataset = _check_keys(dataset, _DATASET_KEYS, dwhere)
        _check_table({k: v for k, v in dataset.items() if k != "subsets"}, dwhere)
        values = {}
        for key, field in DATASET_OPTIONS.items():
            raw = dataset.get(key, general.get(key))
            values[field] = getattr(base, field) if raw is None else _value(field, raw, dwhere, key)
        dataset_values.append((dwhere, values))
        entries = dataset.get("subsets", [])
        if not isinstance(entries, list) or not entries:
            raise BadInput(f"{dwhere} has no [[datasets.subsets]] (each subset names an image_dir)")
        for s, entry in enumerate(entries, 1):
            where = f"subset {s} of {dwhere}"
            entry = _check_keys(entry, _SUBSET_KEYS, where)
            for key, reason in REFUSED_SUBSETS.items():
                if key in entry:
                    raise BadInput(f"{where}: {reason}")
            _check_table(entry, where)

            def pick(key: str, field: str | None = None):
                for table in (entry, dataset, general):
                    if key in table:
                        return _value(field, table[key], where, key) if field else table[key]
                return getattr(base, field) if field else None

            if "image_dir" not in entry:
                raise BadInput(f"{where} has no image_dir (the folder holding its images)")
            raw_dir = entry["image_dir"]
            if not isinstance(raw_dir, str) or not raw_dir.strip():
                raise BadInput(f"{where}: image_dir must be a folder path, got {raw_dir!r}")
            folder = Path(raw_dir).expanduser()
            folder = folder if folder.is_absolute() else Path.cwd() / folder  # sd-scripts opens it as written
            if not folder.is_dir():
                raise BadInput(f"{where}: image_dir {raw_dir} does not exist or is not a folder "
                               f"(a relative image_dir is relative to the working directory {Path.cwd()}, as in sd-scripts)")
            repeats = pick("num_repeats")
            repeats = 1 if repeats is None else repeats
            tokens = pick("class_tokens")
            is_reg = entry.get("is_reg", False)
            extension = pick("caption_extension", "caption_extension")
            if (d, folder.resolve()) in seen_dirs:  # sd-scripts: a repeated image_dir in one dataset is ignored
                notes.append(f"{where}: image_dir {raw_dir} is already a subset of {dwhere}; ignored as in sd-scripts")
                continue
            seen_dirs.add((d, folder.resolve()))
            label = f"{where} (image_dir {raw_dir})"
            for name in WHOLE_RUN_SUBSET_OPTIONS:
                whole_run[name].append((label, pick(name, name)))
            subsets.append(Subset(str(folder), repeats, tokens, is_reg, extension, where))

    values = _one_value_per_run(dataset_values, whole_run)
    if len(datasets) > 1:
        notes.append(f"{len(datasets)} [[datasets]] with the same resolution, batch size and buckets are trained as one "
                     "dataset: a batch may hold images of several of them (sd-scripts keeps them apart), so an epoch "
                     "can have up to one step per bucket fewer")
    if not any(not s.is_reg for s in subsets):
        raise BadInput("no training subset (every subset is is_reg = true)")
    return DatasetConfig(values, tuple(subsets), tuple(notes))


def _one_value_per_run(dataset_values: list[tuple[str, dict[str, Any]]],
                       whole_run: dict[str, list[tuple[str, Any]]]) -> dict[str, Any]:
    """The whole run's values, or BadInput naming where two places differ."""
    first_where, values = dataset_values[0]
    for where, other in dataset_values[1:]:
        for field, value in other.items():
            if value != values[field]:
                key = next(k for k, f in DATASET_OPTIONS.items() if f == field)
                raise BadInput(
                    f"{where} sets {key} = {_show(value)} but {first_where} has {_show(values[field])}: this trainer "
                    "trains one resolution / batch size / bucket setting per run; give every [[datasets]] the same "
                    "value, or train them as separate runs")
    values = dict(values)
    for name, found in whole_run.items():
        first_label, first = found[0]
        for label, value in found[1:]:
            if value != first:
                raise BadInput(
                    f"{label} sets {name} = {_show(value)} but {first_label} has {_show(first)}: this trainer applies "
                    f"{name} to the whole dataset; give every subset the same value (e.g. in [general])")
        values[name] = first
    return values


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) and (not value.strip() or value != value.strip()) else str(value)
