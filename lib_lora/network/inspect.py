"""What a LoRA file holds, read from its header (plus the tiny alpha tensors): `python -m lib_lora inspect`.

Works on any safetensors LoRA, ours or not: network type from the part names present (lora_down/up, hada_*,
lokr_*, ...), architecture from the metadata when present, else from key prefixes and the cross-attention width.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections import Counter
from pathlib import Path

from ..errors import IncompatibleFile
from .files import file_model_hash, read_header
from .keys import DOTTED_PARTS, kohya_module_name, network_type, split_key

_DOWN = ("lora_down.weight", "lora_A.weight", "lora.down.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b")
# cross-attention width (attn2 to_k input) and CLIP width of the real models
_CONTEXT_WIDTH = {768: "SD1", 1024: "SD2", 2048: "SDXL"}
_TE_WIDTH = {768: "SD1", 1024: "SD2"}


def describe(path: str | os.PathLike) -> dict:
    """Everything `inspect` shows, as plain JSON-ready data. Raises IncompatibleFile for unreadable files."""
    header, _ = read_header(path)
    metadata = dict(header.pop("__metadata__", None) or {})
    shapes, origin = _kohya_keys({key: tuple(entry.get("shape", ())) for key, entry in header.items()})
    dtypes = Counter(entry.get("dtype", "?") for entry in header.values())
    parts: dict[str, list[str]] = {}
    for key in shapes:
        module, part = split_key(key)
        parts.setdefault(module, []).append(part)
    down_shapes = {m: shapes[f"{m}.lora_down.weight"] for m in parts if f"{m}.lora_down.weight" in shapes}
    kind = network_type(parts, down_shapes)
    if kind == "unknown" and not any(m.startswith(("lora_", "lycoris_")) for m in parts):
        raise IncompatibleFile(
            f"{Path(path).name} is not a kohya LoRA file: none of its {len(shapes)} tensors belongs to a lora_unet_ / "
            "lora_te_ module (a checkpoint, or a LoRA in another format?)"
        )
    arch, arch_source = _architecture(metadata, shapes, parts)
    ranks = _ranks(path, shapes, parts, origin)
    size = Path(path).stat().st_size
    info = {
        "file": str(path),
        "size_bytes": size,
        "tensors": len(shapes),
        "dtypes": dict(dtypes),
        "architecture": arch,
        "architecture_source": arch_source,
        "network_type": kind,
        "network_module": metadata.get("ss_network_module"),
        "naming": PEFT_NAMING if origin else "kohya",
        "modules": _counts(parts),
        "dim_alpha": _summarise(ranks, down_shapes),
        "per_module": ranks if _varies(ranks, down_shapes) else None,
        "metadata": _key_metadata(metadata),
        "top_tags": _top_tags(metadata.get("ss_tag_frequency")),
        "hashes": _hashes(path, metadata),
        "metadata_keys": len(metadata),
        "problems": _problems(ranks),
    }
    return info


PEFT_NAMING = ("PEFT/diffusers (dotted module paths, lora_A / lora_B): `lib_lora merge` and diffusers take it; "
               "the A1111 <lora:> loader and --network_weights need kohya names")


def _kohya_keys(shapes: dict[str, tuple]) -> tuple[dict[str, tuple], dict[str, str]]:
    """Dotted diffusers / PEFT keys under the kohya names the merge reads them as (`network.keys.kohya_module_name`);
    kohya keys and anything else unchanged. Returns the renamed shapes and {kohya key: key in the file}."""
    arch = "sdxl" if any(key.startswith("text_encoder_2.") for key in shapes) else None
    out: dict[str, tuple] = {}
    origin: dict[str, str] = {}
    for key, shape in shapes.items():
        if not key.startswith(("lora_", "lycoris_")):
            for suffix, part in DOTTED_PARTS:
                if key.endswith(suffix):
                    name = kohya_module_name(key[: -len(suffix)], arch)
                    if name is not None and f"{name}.{part}" not in out:
                        out[f"{name}.{part}"] = shape
                        origin[f"{name}.{part}"] = key
                        break
            else:
                out[key] = shape
            continue
        out[key] = shape
    return out, origin


def _problems(ranks: dict[str, dict]) -> list[str]:
    """One line per kind of damage a user should know about before loading the file."""
    broken = sorted(m for m, v in ranks.items() if isinstance(v["alpha"], str))
    if not broken:
        return []
    more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
    return [f"alpha of {broken[0]}{more} is not a finite number ({ranks[broken[0]]['alpha']}): the file is damaged "
            "or from a diverged run (black images)"]


def _counts(parts: dict[str, list[str]]) -> dict[str, int]:
    counts = {"unet": 0, "te": 0, "te1": 0, "te2": 0, "other": 0}
    for module in parts:
        for prefix in ("unet", "te1", "te2", "te"):
            if module.startswith(f"lora_{prefix}_"):
                counts[prefix] += 1
                break
        else:
            counts["other"] += 1
    return {k: v for k, v in counts.items() if v or k == "unet"}


def _architecture(metadata: dict, shapes: dict, parts: dict) -> tuple[str, str]:
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "SDXL", f"metadata ss_base_model_version={version}"
    if version.startswith("sd_v2"):
        return "SD2" + (" (v-prediction)" if version.endswith("_v") else ""), f"metadata ss_base_model_version={version}"
    if version.startswith("sd_v1"):
        return "SD1", f"metadata ss_base_model_version={version}"
    spec = metadata.get("modelspec.architecture", "")
    for marker, name in (("stable-diffusion-xl", "SDXL"), ("stable-diffusion-v2", "SD2"), ("stable-diffusion-v1", "SD1")):
        if spec.startswith(marker):
            return name, f"metadata modelspec.architecture={spec}"
    if metadata.get("ss_v2") == "True":
        return "SD2", "metadata ss_v2=True"
    if any(m.startswith(("lora_te1_", "lora_te2_")) for m in parts):
        return "SDXL", "keys (lora_te1_ / lora_te2_)"
    for key, shape in shapes.items():
        if "attn2_to_k" in key and key.endswith((".lora_down.weight", ".lora_A.weight")) and len(shape) >= 2:
            guess = _CONTEXT_WIDTH.get(shape[1])
            if guess:
                return guess, f"keys (cross-attention width {shape[1]})"
    for key, shape in shapes.items():
        if key.startswith("lora_te_") and "q_proj" in key and key.endswith(".lora_down.weight") and len(shape) == 2:
            guess = _TE_WIDTH.get(shape[1])
            if guess:
                return guess, f"keys (text encoder width {shape[1]})"
    if any(m.startswith("lora_unet_input_blocks_") for m in parts):
        return "SDXL?", "keys (SAI-style UNet names; SD1 files can use them too)"
    if any(m.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")) for m in parts):
        return "SD1/SD2", "keys (diffusers-style UNet names; widths are not those of a full-size model)"
    return "unknown", "no metadata and no known key pattern"


def _ranks(path, shapes: dict, parts: dict, origin: dict[str, str]) -> dict[str, dict]:
    """Per module: rank (first dim of its down weight) and alpha (None when the file has none)."""
    alphas = {}
    alpha_keys = [f"{m}.alpha" for m, ps in parts.items() if "alpha" in ps]
    if alpha_keys:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for key in alpha_keys:
                value = float(fh.get_tensor(origin.get(key, key)).float().reshape(-1)[0])
                # NaN / inf are no JSON numbers (`--json` is for machines): spelled as strings, listed as problems
                alphas[split_key(key)[0]] = value if math.isfinite(value) else str(value)
    out = {}
    for module, module_parts in parts.items():
        down = next((p for p in _DOWN if p in module_parts), None)
        rank = shapes[f"{module}.{down}"][0] if down and shapes[f"{module}.{down}"] else None
        out[module] = {"dim": rank, "alpha": alphas.get(module)}
    return out


def _kind_of(module: str, down_shapes: dict) -> str:
    shape = down_shapes.get(module, ())
    return "conv" if len(shape) == 4 and tuple(shape[2:]) != (1, 1) else "linear"


def _summarise(ranks: dict, down_shapes: dict) -> dict[str, dict]:
    """{'linear': {'dim': 4, 'alpha': 1.0}, 'conv': {...}}; a value is a sorted list when it varies."""
    groups: dict[str, dict[str, set]] = {}
    for module, value in ranks.items():
        group = groups.setdefault(_kind_of(module, down_shapes), {"dim": set(), "alpha": set()})
        group["dim"].add(value["dim"])
        group["alpha"].add(value["alpha"])
    return {
        kind: {key: (next(iter(vals)) if len(vals) == 1 else sorted(vals, key=_order))
               for key, vals in group.items()}
        for kind, group in sorted(groups.items(), key=lambda kv: kv[0] != "linear")
    }


def _order(value) -> tuple:
    """Numbers first (ascending), then broken values ('nan', 'inf'), then None."""
    return (value is None, isinstance(value, str), value if isinstance(value, (int, float)) else 0, str(value))


def _varies(ranks: dict, down_shapes: dict) -> bool:
    return any(isinstance(v, list) for group in _summarise(ranks, down_shapes).values() for v in group.values())


_SHOWN = (
    ("ss_output_name", "output name"),
    ("ss_sd_model_name", "base model"),
    ("ss_base_model_version", "base model version"),
    ("modelspec.architecture", "modelspec architecture"),
    ("ss_resolution", "resolution"),
    ("ss_epoch", "epoch"),
    ("ss_num_epochs", "epochs"),
    ("ss_steps", "steps"),
    ("ss_max_train_steps", "max steps"),
    ("ss_network_dim", "network dim"),
    ("ss_network_alpha", "network alpha"),
    ("ss_network_args", "network args"),
    ("ss_network_dropout", "network dropout"),
    ("ss_clip_skip", "clip skip"),
    ("ss_learning_rate", "learning rate"),
    ("ss_optimizer", "optimizer"),
    ("ss_num_train_images", "train images"),
    ("ss_training_started_at", "trained at"),
)


def _key_metadata(metadata: dict) -> dict[str, str]:
    shown = {}
    for key, label in _SHOWN:
        value = metadata.get(key)
        if value in (None, "", "None", "{}"):
            continue
        if key == "ss_training_started_at":
            try:
                value = datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            except (TypeError, ValueError, OverflowError, OSError):
                pass
        shown[label] = value
    return shown


def _top_tags(raw: str | None, limit: int = 10) -> list[tuple[str, int]]:
    if not raw:
        return []
    try:
        frequency = json.loads(raw)
        total: Counter = Counter()
        for tags in frequency.values():
            total.update({str(tag): int(count) for tag, count in tags.items()})
    except (ValueError, TypeError, AttributeError):
        return []
    return total.most_common(limit)


def _hashes(path, metadata: dict) -> dict[str, object]:
    computed = file_model_hash(path)
    stored = metadata.get("sshs_model_hash")
    return {
        "model_hash": computed,
        "short_hash": computed[:12],
        "stored_model_hash": stored,
        "stored_matches": None if stored is None else stored == computed,
        "legacy_hash": metadata.get("sshs_legacy_hash"),
    }
