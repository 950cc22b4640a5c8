"""Import a kohya_ss GUI preset (`presets/lora/*.json`, or a GUI "Save config" file) as a TrainConfig.

The GUI stores most settings under sd-scripts' names, some under its own (`max_resolution`, `epoch`,
`optimizer`, `LoRA_type`, `lr_warmup` in percent), and every value may arrive as a string ("0.0001",
"" for unset, 64.0 for an integer). Names the GUI shares with us pass through `config_io.coerce`; the
ALIASES table holds the renamed ones; everything with a value we cannot use is reported in `notes`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import BadInput
from .config import TrainConfig, field_names
from .config_io import IGNORED_KEYS, NEUTRAL_WHEN, coerce, is_neutral

# kohya_ss GUI key -> our field (same meaning, different name)
ALIASES = {
    "max_resolution": "resolution",
    "optimizer": "optimizer_type",
    "epoch": "max_train_epochs",
    "lora_network_weights": "network_weights",
}

# GUI LoRA_type values we can train; LoCon types move conv_dim / conv_alpha into network_args
LORA_TYPES = {"Standard": False, "Kohya LoCon": True, "LoCon": True, "LyCORIS/LoCon": True}

# GUI keys consumed by the special rules below (never reported as ignored)
_HANDLED = {"LoRA_type", "conv_dim", "conv_alpha", "lr_warmup", "lr_warmup_steps", "rank_dropout", "module_dropout",
            "max_train_steps", "max_train_epochs", "epoch", "text_encoder_lr", "unet_lr", "sample_prompts", "noise_offset_type",
            "dynamo_backend"}
# settings where 0 in the GUI means "off" and we use None
_ZERO_IS_UNSET = {"max_train_epochs", "save_every_n_epochs", "sample_every_n_epochs", "save_every_n_steps",
                  "sample_every_n_steps", "save_last_n_steps", "save_last_n_steps_state", "min_snr_gamma", "noise_offset",
                  "clip_skip", "network_dropout", "seed"}


def _given(v: Any) -> bool:
    return v is not None and not (isinstance(v, str) and v.strip() == "")


def _num(v: Any) -> float:
    try:
        return float(v) if _given(v) else 0.0
    except (TypeError, ValueError):
        raise BadInput(f"kohya_ss preset value {v!r} is not a number") from None


def _meaningful(v: Any) -> bool:
    """Worth telling the user we ignored it: set, and not a 'nothing' value."""
    return _given(v) and v is not False and v != 0 and v != "0" and v != "none" and v != "None"


# GUI spellings of sd-scripts options checked like them
_SAME_AS = {"stop_text_encoder_training_pct": "stop_text_encoder_training"}


def _gui_value(raw: Any) -> Any:
    """A GUI value as sd-scripts would get it: "0.0" -> 0, "1000" -> 1000, "true" -> True."""
    if isinstance(raw, str):
        text = raw.strip()
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        try:
            number = float(text)
        except ValueError:
            return raw
        return int(number) if number.is_integer() else number
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    return raw


def _refused(preset: dict[str, Any]) -> list[str]:
    """sd-scripts options the GUI hands to sd-scripts with a value that would change the training in a way this
    trainer does not do: refused as the same option is in a TOML file (config_io.NEUTRAL_WHEN), never a note."""
    multires = str(preset.get("noise_offset_type", "Original") or "Original") == "Multires"
    bad = []
    for key, raw in preset.items():
        name = _SAME_AS.get(key, key)
        if name not in NEUTRAL_WHEN or key in _HANDLED or not _given(raw):
            continue
        if name.startswith("multires_noise") and not multires:  # the GUI passes these only with Multires noise
            continue
        if not is_neutral(name, _gui_value(raw)):
            bad.append(f"{key} = {raw!r}")
    return sorted(bad)


def from_kohya_ss(preset: dict[str, Any], notes: list[str] | None = None) -> TrainConfig:
    """Map a kohya_ss GUI preset dict onto a TrainConfig (defaults for what it does not set)."""
    refused = _refused(preset)
    if refused:
        raise BadInput(f"sd-scripts option(s) this trainer does not have: {', '.join(refused)} "
                       "(remove them, or set them to sd-scripts' default)")
    names = set(field_names())
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for key, raw in preset.items():
        target = ALIASES.get(key, key)
        if key in _HANDLED or key == "epoch":
            continue
        if target not in names:
            if _meaningful(raw) and key not in IGNORED_KEYS:
                ignored.append(key)
            continue
        if not _given(raw):
            continue
        if target in _ZERO_IS_UNSET and _num(raw) == 0:
            continue
        values[target] = coerce(target, raw)

    # network type: LoRA, or LoCon (3x3 convs) through network_args as sd-scripts takes it
    lora_type = str(preset.get("LoRA_type", "Standard") or "Standard")
    if lora_type not in LORA_TYPES:
        raise BadInput(f"kohya_ss LoRA_type {lora_type!r} is not supported: use Standard or a LoCon type")
    args = list(values.get("network_args", ()))
    if LORA_TYPES[lora_type] and _num(preset.get("conv_dim")) > 0:
        args += [f"conv_dim={int(_num(preset['conv_dim']))}", f"conv_alpha={_num(preset.get('conv_alpha', 1)):g}"]
    for key in ("rank_dropout", "module_dropout"):
        if _num(preset.get(key)) > 0:
            args.append(f"{key}={_num(preset[key]):g}")
    if args:
        values["network_args"] = tuple(args)

    # length: max_train_epochs wins, then a non-zero max_train_steps, then the GUI's `epoch`
    if _num(preset.get("max_train_epochs")) > 0:
        values["max_train_epochs"] = coerce("max_train_epochs", preset["max_train_epochs"])
    elif _num(preset.get("max_train_steps")) > 0:
        values["max_train_steps"] = coerce("max_train_steps", preset["max_train_steps"])
    elif _num(preset.get("epoch")) > 0:
        values["max_train_epochs"] = coerce("max_train_epochs", preset["epoch"])

    # warmup: absolute steps win; the GUI's `lr_warmup` is a percent of all steps -> our ratio
    if _num(preset.get("lr_warmup_steps")) > 0:
        values["lr_warmup_steps"] = coerce("lr_warmup_steps", preset["lr_warmup_steps"])
    elif 0 < _num(preset.get("lr_warmup")) < 100:
        values["lr_warmup_steps"] = _num(preset["lr_warmup"]) / 100.0

    # learning rates: the GUI trains only one side when the other's rate is 0
    for key in ("unet_lr", "text_encoder_lr"):
        if _given(preset.get(key)):
            values[key] = coerce(key, preset[key])
    unet, te = values.get("unet_lr"), values.get("text_encoder_lr")
    if te == 0 and unet not in (None, 0):
        values["network_train_unet_only"], values["text_encoder_lr"] = True, None
    elif unet == 0 and te not in (None, 0):
        values["network_train_text_encoder_only"], values["unet_lr"] = True, None

    # torch.compile: the GUI's accelerate `dynamo_backend` ("no" = off) only picks the backend; as in sd-scripts, only
    # `torch_compile` (passed through above under its own name) turns compiling on
    backend = preset.get("dynamo_backend")
    if _given(backend) and str(backend).strip().lower() != "no":
        values["dynamo_backend"] = coerce("dynamo_backend", backend)

    # sample prompts: the GUI holds the prompt text itself, one per line
    prompts = preset.get("sample_prompts")
    if _given(prompts):
        lines = [ln.strip() for ln in str(prompts).splitlines() if ln.strip()]
        values["sample_prompts"] = tuple(lines)

    if ignored and notes is not None:
        notes.append(f"kohya_ss settings not used here: {', '.join(sorted(ignored))}")
    return dataclasses.replace(TrainConfig(), **values)


def load_kohya_ss_json(path: str | Path, notes: list[str] | None = None) -> TrainConfig:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"preset file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"cannot read kohya_ss preset {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} is not a kohya_ss preset (expected a JSON object)")
    try:
        return from_kohya_ss(data, notes)
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from None


__all__ = ["ALIASES", "from_kohya_ss", "load_kohya_ss_json"]
