"""The header metadata of our LoRA files, built in one place for the readers we know.

What reads it (lora-format.md 4, webui-api.md 4.8/4.11): the webui takes `ss_output_name` as the alias,
`ss_base_model_version` (`sdxl_` prefix) and `ss_v2` for its SD-version filter, `ss_tag_frequency`,
`ss_dataset_dirs`, `ss_bucket_info`, `ss_sd_model_name`, `ss_clip_skip`, `ss_training_started_at` for the card;
Forge reads `modelspec.architecture`; kohya tools read `ss_network_*`. Every value is a string (dicts as JSON), the
key set and formats are sd-scripts' (`str(value)`: None -> "None", True -> "True", (512, 512) -> "(512, 512)").
Hashes are added by `save_lora`, which knows the final tensors.
"""

from __future__ import annotations

import datetime
import json
import random
import time
from typing import Mapping

from .. import __version__
from ..errors import BadInput
from ..fsutil import check_name
from .config import NetworkConfig

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
IMPLEMENTATION_SGM = "https://github.com/Stability-AI/generative-models"
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}


def base_model_version(arch: str, v_prediction: bool = False) -> str:
    """kohya's `ss_base_model_version`: sd_v1 / sd_v2 (+ `_v` for v-prediction) / sdxl_base_v1-0."""
    if arch not in BASE_MODEL_VERSION:
        raise BadInput(f"unknown architecture {arch!r} (expected sd1, sd2 or sdxl)")
    version = BASE_MODEL_VERSION[arch]
    return version + "_v" if v_prediction and arch != "sdxl" else version


def modelspec_architecture(arch: str, v_prediction: bool = False, lora: bool = True) -> str:
    """SAI ModelSpec architecture id, with `/lora` for LoRA files."""
    if arch == "sdxl":
        base = "stable-diffusion-xl-v1-base"
    elif arch == "sd2":
        base = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
    elif arch == "sd1":
        base = "stable-diffusion-v1"
    else:
        raise BadInput(f"unknown architecture {arch!r} (expected sd1, sd2 or sdxl)")
    return base + "/lora" if lora else base


def build_metadata(
    *,
    arch: str,
    output_name: str,
    network: NetworkConfig,
    v_prediction: bool = False,
    resolution: int | tuple[int, int] | None = None,
    clip_skip: int | None = None,
    training: Mapping[str, object] | None = None,
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    dataset_dirs: Mapping[str, Mapping[str, int]] | None = None,
    bucket_info: Mapping[str, object] | None = None,
    base_model: str | None = None,
    epoch: int | None = None,
    steps: int | None = None,
    started_at: float | None = None,
    finished_at: float | None = None,
    session_id: int | None = None,
    title: str | None = None,
    description: str | None = None,
    author: str | None = None,
    trigger_phrase: str | None = None,
    tags: str | None = None,
) -> dict[str, str]:
    """Every `ss_*` and `modelspec.*` key of one LoRA file, all values strings.

    `training` holds the remaining training settings under sd-scripts' names, with or without the `ss_` prefix
    (`{"learning_rate": 1e-4, "optimizer": "AdamW", "num_epochs": 10, ...}`); explicit arguments win over it.
    `output_name` is the file's stem (`mylora-03`); `resolution` is `(width, height)` or one int.
    """
    check_name(output_name, "output name")
    width, height = _resolution(resolution, arch, v_prediction)
    now = time.time()
    started = started_at if started_at is not None else now
    meta: dict[str, str] = {}
    for key, value in (training or {}).items():
        meta[key if key.startswith("ss_") else f"ss_{key}"] = _text(value)
    args: dict[str, object] = dict(network.network_args())
    if args and "dropout" not in args:
        args["dropout"] = network.dropout  # sd-scripts injects --network_dropout (None = null) into the stored args
    meta.update({
        "ss_session_id": str(session_id if session_id is not None else random.randint(0, 2**32)),
        "ss_training_started_at": str(float(started)),
        "ss_training_finished_at": str(float(finished_at if finished_at is not None else now)),
        "ss_output_name": output_name,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(network.dim),
        "ss_network_alpha": str(network.effective_alpha),
        "ss_network_dropout": _text(network.dropout),
        "ss_v2": str(arch == "sd2"),
        "ss_base_model_version": base_model_version(arch, v_prediction),
        "ss_resolution": f"({width}, {height})",
        "ss_clip_skip": _text(clip_skip),
    })
    # sd-scripts writes the key only when --network_args were given; `training` may carry its own spelling
    meta.pop("ss_network_args", None)
    if args:
        meta["ss_network_args"] = json.dumps(args)
    optional = {
        "ss_sd_model_name": base_model,
        "ss_epoch": epoch,
        "ss_steps": steps,
        "ss_tag_frequency": tag_frequency,
        "ss_dataset_dirs": dataset_dirs,
        "ss_bucket_info": bucket_info,
    }
    for key, value in optional.items():
        if value is not None:
            meta[key] = _text(value)
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": modelspec_architecture(arch, v_prediction),
        "modelspec.implementation": IMPLEMENTATION_SGM if arch == "sdxl" else "diffusers",
        "modelspec.title": title or output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(started)).isoformat(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.implementation_version": f"sd-webui-lora-train/{__version__}",
        "modelspec.encoder_layer": None if clip_skip is None else str(clip_skip),
        "modelspec.description": description,
        "modelspec.author": author,
        "modelspec.trigger_phrase": trigger_phrase,
        "modelspec.tags": tags,
    }
    meta.update({k: v for k, v in spec.items() if v is not None})
    return meta


def _resolution(resolution, arch: str, v_prediction: bool) -> tuple[int, int]:
    if resolution is None:
        side = 768 if arch == "sd2" and v_prediction else DEFAULT_RESOLUTION.get(arch, 512)
        return side, side
    if isinstance(resolution, int):
        return resolution, resolution
    try:
        width, height = (int(v) for v in resolution)
    except (TypeError, ValueError):
        raise BadInput(f"resolution must be an int or (width, height), got {resolution!r}") from None
    return width, height


def _text(value: object) -> str:
    """sd-scripts' spelling of a metadata value: str() for scalars, JSON for dicts and lists."""
    if isinstance(value, (dict, list)) or isinstance(value, Mapping):
        return json.dumps(value)
    return str(value)
