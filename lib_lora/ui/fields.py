"""The Train sub-tab's settings, as one table of named fields grouped the way LoRA guides teach them.

Why a table: the widgets, the preset files, the API's job config and the handlers all use the same names (the
`TrainConfig` field names, i.e. sd-scripts' option names), so values travel by name, never by position, and
adding a field touches one line. Help text and choices come from `TrainConfig`'s field metadata; this table adds
only what a tab needs (label, widget, group, range, and the defaults that work for a first LoRA).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import BadInput

GROUPS = ("Steps", "Learning", "Structure", "Processing", "Samples", "Advanced")
PSEUDO = ("conv_dim", "conv_alpha")  # tab fields that become `network_args` entries


@dataclass(frozen=True)
class UiField:
    name: str
    label: str
    group: str
    widget: str  # number | int | text | textarea | dropdown | checkbox
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    zero_is_none: bool = False  # 0 in the widget means "unset" (None) in the config
    info: str = ""


F = UiField
FIELDS: tuple[UiField, ...] = (
    # Steps: images x repeats x epochs / batch
    F("max_train_epochs", "Epochs", "Steps", "int", 10, 1, 1000,
      info="passes over the dataset (each image x its folder's repeats); one file per saved epoch"),
    F("train_batch_size", "Batch size", "Steps", "int", 1, 1, 64),
    F("gradient_accumulation_steps", "Gradient accumulation", "Steps", "int", 1, 1, 64),
    F("save_every_n_epochs", "Save every N epochs", "Steps", "int", 1, 1, 1000,
      info="writes NAME-01, NAME-02, ... to compare in the Test tab; the last epoch is always saved"),
    F("seed", "Seed (-1 = random)", "Steps", "int", 42, -1, 2**32 - 1,
      info="the same seed and settings give the same LoRA"),
    # Learning
    F("optimizer_type", "Optimizer", "Learning", "dropdown", "AdamW",
      info="AdamW for a first LoRA; Prodigy finds its own rate (set both learning rates to 1)"),
    F("unet_lr", "UNet learning rate", "Learning", "number", 5e-4, 0, 10,
      info="how fast the image model learns; lower it if samples burn in early epochs"),
    F("text_encoder_lr", "Text encoder learning rate (0 = UNet only)", "Learning", "number", 1e-4, 0, 10,
      info="how fast the prompt model learns the trigger word; usually 1/2 to 1/5 of the UNet rate"),
    F("lr_scheduler", "Scheduler", "Learning", "dropdown", "cosine_with_restarts"),
    F("lr_scheduler_num_cycles", "Restarts (cosine with restarts)", "Learning", "int", 3, 1, 100),
    F("lr_warmup_steps", "Warmup (fraction of steps below 1, else steps)", "Learning", "number", 0.05, 0, 100000),
    F("min_snr_gamma", "Min-SNR gamma (0 = off)", "Learning", "number", 5.0, 0, 100, zero_is_none=True),
    F("noise_offset", "Noise offset (0 = off)", "Learning", "number", 0.0, 0, 1, zero_is_none=True),
    F("max_grad_norm", "Max gradient norm (0 = off)", "Learning", "number", 1.0, 0, 100),
    F("optimizer_args", "Optimizer options (k=v, space separated)", "Learning", "text", ""),
    # Structure
    F("network_dim", "Network rank (dim)", "Structure", "int", 16, 1, 1024),
    F("network_alpha", "Network alpha", "Structure", "number", 8.0, 0, 1024),
    F("conv_dim", "Conv rank (LoCon, 0 = off)", "Structure", "int", 0, 0, 1024,
      info="also trains the convolution layers (LoCon): more detail and style, a larger file"),
    F("conv_alpha", "Conv alpha", "Structure", "number", 1.0, 0, 1024,
      info="scale of the conv layers' update (conv alpha / conv rank)"),
    F("network_dropout", "Dropout (0 = off)", "Structure", "number", 0.0, 0, 1, zero_is_none=True),
    F("network_weights", "Start from LoRA file (optional)", "Structure", "text", ""),
    # Processing
    F("resolution", "Resolution (W or W,H)", "Processing", "text", "512"),
    F("enable_bucket", "Aspect-ratio buckets", "Processing", "checkbox", True),
    F("min_bucket_reso", "Smallest bucket side", "Processing", "int", 256, 64, 4096),
    F("max_bucket_reso", "Largest bucket side", "Processing", "int", 1024, 64, 4096),
    F("bucket_no_upscale", "Never upscale into a bucket", "Processing", "checkbox", False),
    F("cache_latents", "Cache latents (VAE leaves the GPU)", "Processing", "checkbox", True),
    F("flip_aug", "Random flips", "Processing", "checkbox", False),
    F("shuffle_caption", "Shuffle tags", "Processing", "checkbox", True),
    F("keep_tokens", "Keep first N tags in place", "Processing", "int", 1, 0, 100),
    F("caption_dropout_rate", "Caption dropout", "Processing", "number", 0.0, 0, 1),
    F("caption_tag_dropout_rate", "Tag dropout", "Processing", "number", 0.0, 0, 1),
    F("clip_skip", "Clip skip (1 = last layer; 2 for anime models)", "Processing", "int", 1, 1, 12),
    F("max_token_length", "Caption tokens", "Processing", "dropdown", "75"),
    # Samples
    F("sample_every_n_epochs", "Preview every N epochs (0 = off)", "Samples", "int", 0, 0, 1000, zero_is_none=True),
    F("sample_prompts", "Preview prompts (one per line)", "Samples", "textarea", ""),
    F("sample_sampler", "Preview sampler", "Samples", "dropdown", "euler_a"),
    # Advanced
    F("mixed_precision", "Mixed precision", "Advanced", "dropdown", "fp16"),
    F("gradient_checkpointing", "Gradient checkpointing (less memory, slower)", "Advanced", "checkbox", False),
    F("torch_compile", "torch.compile (faster steps after a slow first one)", "Advanced", "checkbox", False,
      info="compiles the UNet forward (inductor); the first step takes minutes; falls back to normal training if it fails"),
    F("save_precision", "Save precision", "Advanced", "dropdown", "fp16"),
    F("validation_split", "Validation split", "Advanced", "number", 0.0, 0, 0.5),
    F("training_comment", "Comment in the LoRA metadata", "Advanced", "text", ""),
)
BY_NAME: dict[str, UiField] = {f.name: f for f in FIELDS}


def config_info(name: str) -> dict[str, Any]:
    """help / choices / default of a TrainConfig field, or {} for tab-only fields."""
    if name in PSEUDO:
        return {}
    from ..train.config import field_info

    return field_info(name)


def choices(f: UiField) -> list:
    """A dropdown's choices as strings: gradio 3.41 shows an empty box for a number value among number choices."""
    found = config_info(f.name).get("choices") or ()
    return [c if isinstance(c, str) else str(c) for c in found]


def defaults() -> dict[str, Any]:
    """The tab's values for a fresh project (the first-LoRA defaults)."""
    return {f.name: f.default for f in FIELDS}


def _coerce_widget(f: UiField, value: Any) -> Any:
    if f.widget == "checkbox":
        return bool(value)
    if f.widget in ("int", "number"):
        if value is None or value == "":
            return None if f.zero_is_none else f.default
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise BadInput(f"{f.label}: {value!r} is not a number") from None
        if number != number:  # NaN
            raise BadInput(f"{f.label}: not a number")
        if f.minimum is not None and number < f.minimum or f.maximum is not None and number > f.maximum:
            raise BadInput(f"{f.label} must be between {f.minimum:g} and {f.maximum:g}, not {number:g}")
        if f.widget == "int":
            if number != int(number):
                raise BadInput(f"{f.label} must be a whole number, not {number:g}")
            number = int(number)
        if f.zero_is_none and number == 0:
            return None
        return number
    return "" if value is None else value


def to_config_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Widget values by field name -> TrainConfig keyword values. Raises BadInput naming the first bad field."""
    out: dict[str, Any] = {}
    for name, raw in values.items():
        f = BY_NAME.get(name)
        if f is None:
            raise BadInput(f"unknown setting {name!r}")
        out[name] = _coerce_widget(f, raw)
    if out.get("seed") == -1:
        out["seed"] = None
    if "optimizer_args" in out:
        out["optimizer_args"] = tuple(str(out["optimizer_args"] or "").split())
    if "sample_prompts" in out:
        out["sample_prompts"] = tuple(ln.strip() for ln in str(out["sample_prompts"] or "").splitlines() if ln.strip())
    if out.get("text_encoder_lr") == 0:
        out["network_train_unet_only"] = True
    conv_dim = out.pop("conv_dim", None)
    conv_alpha = out.pop("conv_alpha", None)
    if conv_dim:
        alpha = 1 if conv_alpha is None else float(conv_alpha)
        # the file's ss_network_args keeps these strings (as sd-scripts does): a whole number reads "4", not "4.0"
        out["network_args"] = (f"conv_dim={int(conv_dim)}", f"conv_alpha={int(alpha) if alpha.is_integer() else alpha}")
    if out.get("max_token_length") in ("", None):
        out["max_token_length"] = None
    elif "max_token_length" in out:
        out["max_token_length"] = int(out["max_token_length"])
    return out


def check_ranges(cfg) -> None:
    """The tab's ranges applied to a TrainConfig that did not come from the widgets (an API job's config), so the
    API refuses what the tab refuses; BadInput names the first field out of range (unset values are left alone)."""
    for f in FIELDS:
        if f.widget not in ("int", "number") or f.name in PSEUDO or (f.minimum is None and f.maximum is None):
            continue
        value = getattr(cfg, f.name, None)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if f.minimum is not None and value < f.minimum or f.maximum is not None and value > f.maximum:
            raise BadInput(f"{f.label} ({f.name}) must be between {f.minimum:g} and {f.maximum:g}, not {value:g}")


def from_config(cfg) -> dict[str, Any]:
    """A TrainConfig -> widget values by field name (the inverse of `to_config_values` for the tab's fields)."""
    values: dict[str, Any] = {}
    for f in FIELDS:
        if f.name in PSEUDO:
            continue
        v = getattr(cfg, f.name)
        if v is None:
            v = 0 if f.zero_is_none else (-1 if f.name == "seed" else f.default)
        if f.name == "optimizer_args":
            v = " ".join(v)
        elif f.name == "max_token_length":
            v = str(v)
        elif f.name == "sample_prompts":
            v = "\n".join(v) if isinstance(v, tuple) else str(v)
        elif f.name == "text_encoder_lr" and cfg.network_train_unet_only:
            v = 0.0
        values[f.name] = v
    args = dict(a.split("=", 1) for a in cfg.network_args if "=" in a)
    values["conv_dim"] = int(float(args.get("conv_dim", 0)))
    values["conv_alpha"] = float(args.get("conv_alpha", 1))
    return values


def build_config(values: Mapping[str, Any], fixed: Mapping[str, Any]):
    """TrainConfig from widget values plus the host's fixed facts (model, folders, output name)."""
    from ..train.config import TrainConfig
    from ..train.config_io import from_dict

    merged = {**to_config_values(values), **fixed}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise BadInput(f"unknown settings: {', '.join(unknown)}")
    try:
        return from_dict(merged)
    except (ValueError, TypeError) as exc:
        raise BadInput(str(exc)) from None
