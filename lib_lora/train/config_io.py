"""TrainConfig <-> TOML (sd-scripts' `--config_file` layout), versioned migration, kohya_ss GUI preset import.

Reading is strict where a typo would silently change a run (an unknown key is an error that lists the valid
names) and lenient where files from other tools carry options we have no use for (sd-scripts' `xformers`,
the GUI's `LoRA_type` bookkeeping): those become notes the caller shows.
The webui's Python stack has neither `tomli` nor `tomli_w`, so the writer is ours (the subset of TOML a flat
config needs: strings, numbers, booleans, arrays of those, one level of tables).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import shlex
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import BadInput
from ..fsutil import atomic_write_text
from .optim_names import canonical_optimizer
from .config import (
    CONFIG_VERSION, DYNAMO_BACKENDS, DYNAMO_MODES, OPTIMIZERS, SCHEDULERS, TrainConfig, field_info, field_names, field_types,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (the webui's)
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

# --------------------------------------------------------------------------- migration and foreign names

# sd-scripts options we accept and ignore (they tune sd-scripts' own machinery); a note says so.
IGNORED_KEYS = frozenset({
    "xformers", "sdpa", "mem_eff_attn", "max_data_loader_n_workers", "persistent_data_loader_workers", "lowram",
    "highvram", "vae_batch_size", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "no_half_vae",
    "log_prefix", "save_model_as", "console_log_simple", "full_fp16", "full_bf16",
})


# More sd-scripts options, as kohya_ss GUI writes them into the --config_file it hands to sd-scripts (which ignores
# keys it does not know). Each is accepted, with a note, while it holds a value under which it changes nothing here
# (sd-scripts' default; `None` = any value: the option only bookkeeps, uploads or logs elsewhere, or matters only
# together with a setting refused here); any other value would change the training in a way this trainer does
# not do, so it is refused instead of silently ignored.
NEUTRAL_WHEN: dict[str, tuple | None] = {
    # bookkeeping, uploads, logging services, epoch-file retention, compile settings
    **dict.fromkeys((
        "epoch", "wandb_run_name", "wandb_api_key", "log_tracker_name", "log_tracker_config",
        "log_config", "metadata_author", "metadata_description", "metadata_license", "metadata_tags",
        "metadata_title", "huggingface_repo_id", "huggingface_token", "huggingface_repo_type",
        "huggingface_repo_visibility", "huggingface_path_in_repo", "async_upload", "save_state_to_huggingface",
        "resume_from_huggingface", "save_last_n_epochs", "save_last_n_epochs_state", "save_state_on_train_end",
        "sample_at_first", "save_n_epoch_ratio", "disable_mmap_load_safetensors", "ddp_timeout",
        "ddp_gradient_as_bucket_view", "ddp_static_graph", "lowvram", "skip_cache_check", "huber_c",
        "huber_schedule", "multires_noise_discount",
    ), None),
    # loss, noise and schedule variants: only their off value
    "loss_type": ("l2",), "min_timestep": (0, None), "max_timestep": (1000, None),
    "multires_noise_iterations": (0, None), "noise_offset_type": ("Original",), "noise_offset_random_strength": (False,),
    "adaptive_noise_scale": (0, None), "ip_noise_gamma": (0, None), "ip_noise_gamma_random_strength": (False,),
    "debiased_estimation_loss": (False,), "scale_v_pred_loss_like_noise_pred": (False,), "v_pred_like_loss": (0, None),
    "zero_terminal_snr": (False,), "masked_loss": (False,), "alpha_mask": (False,), "weighted_captions": (False,),
    "scale_weight_norms": (0, None), "lr_scheduler_type": ("", None), "lr_scheduler_args": ((), "", None),
    "lr_decay_steps": (0, None), "lr_scheduler_min_lr_ratio": (0, None), "lr_scheduler_timescale": (0, None),
    "fp8_base": (False,), "fp8_base_unet": (False,), "dim_from_weights": (False,), "base_weights": ((), "", None),
    "stop_text_encoder_training": (0, None), "token_warmup_min": (1,), "token_warmup_step": (0,),
    "caption_prefix": ("", None), "caption_suffix": ("", None), "secondary_separator": ("", None),
    "enable_wildcard": (False,), "caption_separator": (",",), "face_crop_aug_range": ("", None),
    "loraplus_lr_ratio": (0, None), "loraplus_unet_lr_ratio": (0, None), "loraplus_text_encoder_lr_ratio": (0, None),
    "debug_dataset": (False,), "no_metadata": (False,),
}


def is_neutral(key: str, value: Any) -> bool:
    """Whether an sd-scripts option of NEUTRAL_WHEN holds a value under which it changes nothing here."""
    allowed = NEUTRAL_WHEN[key]
    if allowed is None:
        return True
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, str):
        return value.strip().lower() in {str(a).lower() for a in allowed if isinstance(a, str)}
    return any(value == a and type(value) is not str for a in allowed if not isinstance(a, str))


def _migrate_v0(d: dict) -> dict:
    """Files without `config_version` (sd-scripts' own, hand-written): its deprecated optimizer switches and spelling."""
    if d.pop("use_8bit_adam", False):
        d.setdefault("optimizer_type", "AdamW8bit")
    if d.pop("use_lion_optimizer", False):
        d.setdefault("optimizer_type", "Lion")
    if "caption_extention" in d:  # sd-scripts' old spelling, still read there
        d.setdefault("caption_extension", d.pop("caption_extention"))
    return d


# version -> function turning a dict of that version into the next version's dict
MIGRATIONS: dict[int, Callable[[dict], dict]] = {0: _migrate_v0}


def migrate(d: dict) -> dict:
    """Apply MIGRATIONS from the dict's `config_version` (0 when absent) up to CONFIG_VERSION."""
    d = dict(d)
    version = d.pop("config_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise BadInput(f"config_version {version!r} is not a version number")
    if version > CONFIG_VERSION:
        raise BadInput(f"config_version {version} was written by a newer lib_lora (this one reads up to {CONFIG_VERSION})")
    while version < CONFIG_VERSION:
        d = MIGRATIONS[version](d) if version in MIGRATIONS else d
        version += 1
    return d


# --------------------------------------------------------------------------- value coercion


def _is_optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _scalar_types(tp: Any) -> tuple:
    args = typing.get_args(tp)
    if not args or typing.get_origin(tp) is tuple:
        return (tp,)
    return tuple(a for a in args if a is not type(None))


def _to_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    raise BadInput(f"setting {name} must be true or false, got {v!r}")


def _to_number(name: str, v: Any, want_int: bool) -> int | float:
    if isinstance(v, bool):
        raise BadInput(f"setting {name} must be a number, got {v!r}")
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise BadInput(f"setting {name} must be a number, got {v!r}") from None
    if not isinstance(v, (int, float)):
        raise BadInput(f"setting {name} must be a number, got {v!r}")
    if want_int:
        if isinstance(v, float) and (not math.isfinite(v) or v != int(v)):
            raise BadInput(f"setting {name} must be a whole number, got {v!r}")
        return int(v)
    return float(v)


def coerce(name: str, value: Any) -> Any:
    """Turn a value read from TOML, JSON or a form into the field's type; BadInput names the field on failure."""
    tp = field_types()[name]
    if value is None:
        if _is_optional(tp):
            return None
        raise BadInput(f"setting {name} may not be empty")
    kinds = _scalar_types(tp)
    if name == "lr_warmup_steps":  # int count, or a float ratio below 1 (sd-scripts' isinstance(float) rule)
        num = _to_number(name, value, want_int=False)
        return int(num) if num.is_integer() else num
    if name == "resolution" and isinstance(value, (list, tuple)):
        return ",".join(str(_to_number(name, x, want_int=True)) for x in value)
    if tuple[str, ...] in kinds:
        if isinstance(value, (list, tuple)):
            if not all(isinstance(x, (str, int, float, bool)) for x in value):
                raise BadInput(f"setting {name} must be a list of strings, got {value!r}")
            return tuple(str(x) for x in value)
        if str in kinds:  # sample_prompts: a path, or a list
            if not isinstance(value, str):
                raise BadInput(f"setting {name} must be a path or a list of strings, got {value!r}")
            return value
        if isinstance(value, str):  # "weight_decay=0.01 decouple=True" as the kohya_ss GUI writes it
            return tuple(shlex.split(value))
        raise BadInput(f"setting {name} must be a list of 'key=value' strings, got {value!r}")
    kind = kinds[0]
    if kind is bool:
        return _to_bool(name, value)
    if kind is int:
        return _to_number(name, value, want_int=True)
    if kind is float:
        return _to_number(name, value, want_int=False)
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise BadInput(f"setting {name} must be text, got {value!r}")
        return _normalise_choice(name, str(value))
    raise TypeError(f"no coercion for {name}: {tp}")  # a field type this module does not know: a bug


_CHOICE_ALIASES = {"save_precision": {"float": "fp32", "full": "fp32"}, "mixed_precision": {"": "no"}}


def _normalise_choice(name: str, value: str) -> str:
    """Case-insensitive match on a field's choices (sd-scripts lower-cases optimizer names)."""
    value = _CHOICE_ALIASES.get(name, {}).get(value.strip().lower(), value)
    if name == "optimizer_type":
        return canonical_optimizer(value)
    pool = {"optimizer_type": OPTIMIZERS, "lr_scheduler": SCHEDULERS, "dynamo_backend": DYNAMO_BACKENDS,
            "dynamo_mode": DYNAMO_MODES}.get(name)
    if pool:
        for choice in pool:
            if choice.lower() == value.strip().lower():
                return choice
    return value


# --------------------------------------------------------------------------- dict <-> config


def _flatten(d: Mapping[str, Any]) -> dict[str, Any]:
    """sd-scripts' --config_file rule: tables are flattened one level ([model] a = 1 -> a = 1)."""
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, value in d.items():
        items = value.items() if isinstance(value, Mapping) else [(key, value)]
        for k, v in items:
            if k in flat:
                raise BadInput(f"setting {k} is given twice (in [{where[k] or 'top level'}] and [{key}])")
            flat[k] = v
            where[k] = key if isinstance(value, Mapping) else ""
    return flat


def unknown_key_message(bad: list[str]) -> str:
    hints = []
    for key in bad:
        close = difflib.get_close_matches(key, field_names(), n=1)
        hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return f"unknown setting(s): {', '.join(hints)}; valid names: {', '.join(field_names())}"


def from_dict(d: Mapping[str, Any], notes: list[str] | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """Build a config from a (possibly sectioned, possibly old) mapping; unknown keys raise BadInput."""
    flat = migrate(_flatten(d))
    names = set(field_names())
    bad = sorted(k for k in flat if k not in names and k not in IGNORED_KEYS and k not in NEUTRAL_WHEN)
    if bad:
        raise BadInput(unknown_key_message(bad))
    unsupported = sorted(f"{k} = {flat[k]!r}" for k in flat if k in NEUTRAL_WHEN and not is_neutral(k, flat[k]))
    if unsupported:
        raise BadInput(f"sd-scripts option(s) this trainer does not have: {', '.join(unsupported)} "
                       "(remove them, or set them to sd-scripts' default)")
    ignored = sorted(k for k in flat if k in IGNORED_KEYS or k in NEUTRAL_WHEN)
    if "save_model_as" in flat and str(flat["save_model_as"]).lower() != "safetensors":
        raise BadInput(f"save_model_as {flat['save_model_as']!r} is not supported: LoRA files are always .safetensors")
    if ignored and notes is not None:
        notes.append(f"ignored (sd-scripts options with no effect here): {', '.join(ignored)}")
    values = {k: coerce(k, v) for k, v in flat.items() if k in names}
    values["config_version"] = CONFIG_VERSION
    return dataclasses.replace(base or TrainConfig(), **values)


def to_dict(cfg: TrainConfig, only_changed: bool = False) -> dict[str, Any]:
    """Flat {name: value}; None values are left out (TOML has no null; absent = the default None)."""
    default = TrainConfig()
    out = {}
    for name in field_names():
        value = getattr(cfg, name)
        if value is None or (only_changed and name != "config_version" and value == getattr(default, name)):
            continue
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


# --------------------------------------------------------------------------- TOML


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        text = repr(v)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        if "'" not in v and "\n" not in v and "\r" not in v and all(ord(c) >= 32 or c == "\t" for c in v):
            return f"'{v}'"  # a literal string keeps Windows paths readable
        escaped = v.replace("\\", "\\\\").replace('"', '\\"')
        escaped = "".join(c if ord(c) >= 32 or c == "\t" else f"\\u{ord(c):04x}" for c in escaped)
        return f'"{escaped}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(cfg: TrainConfig, only_changed: bool = False) -> str:
    """TOML text with one table per group ([model], [dataset], ...); sd-scripts reads it flattened."""
    data = to_dict(cfg, only_changed)
    groups: dict[str, list[str]] = {}
    for name, value in data.items():
        if name == "config_version":
            continue
        groups.setdefault(field_info(name)["group"], []).append(f"{name} = {_toml_value(value)}")
    lines = [f"config_version = {CONFIG_VERSION}"]
    for group, rows in groups.items():
        lines += ["", f"[{group}]", *rows]
    return "\n".join(lines) + "\n"


def loads_toml(text: str, notes: list[str] | None = None) -> TrainConfig:
    if tomllib is None:  # pragma: no cover
        raise BadInput("reading TOML on Python 3.10 needs the 'tomli' package (pip install tomli)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"the config is not valid TOML: {exc}") from None
    return from_dict(data, notes)


def load_toml(path: str | Path, notes: list[str] | None = None) -> TrainConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read config file {path}: {exc}") from None
    try:
        return loads_toml(text, notes)
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from None


def save_toml(cfg: TrainConfig, path: str | Path) -> Path:
    """Write every setting (atomically) and return the path."""
    atomic_write_text(path, dump_toml(cfg))
    return Path(path)


def config_file_path(path: str) -> Path:
    """sd-scripts' `--config_file` rule: a name without `.toml` gets it appended (JSON presets kept as they are)."""
    p = Path(path)
    if p.suffix.lower() in (".toml", ".json"):
        return p
    return Path(str(path) + ".toml")


def load_config_file(path: str | Path, notes: list[str] | None = None) -> TrainConfig:
    """A `--config_file`: TOML (ours or sd-scripts') or a kohya_ss GUI `.json` preset."""
    p = config_file_path(str(path))
    if p.suffix.lower() == ".json":
        from .kohya_ss import load_kohya_ss_json

        return load_kohya_ss_json(p, notes)
    return load_toml(p, notes)


def json_for_display(cfg: TrainConfig) -> str:
    """Every setting as indented JSON (the tab's 'show settings' view)."""
    return json.dumps(to_dict(cfg), indent=2)
