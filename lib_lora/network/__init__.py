"""LoRA / LoCon networks in kohya format: naming, targets, modules, inject/restore, files.

Names are exported lazily (`from lib_lora.network import LoraNetwork` works) so that importing the package, or
`lib_lora.network.unet_names`, does not import torch.

- `config.NetworkConfig`           ranks, alphas, dropouts (sd-scripts meanings)
- `targets.unet_targets`, `text_encoder_targets`, `find_targets`   -> [(kohya_name, layer)]
- `network.LoraNetwork`, `inject`  modules over targets; apply/restore; load_kohya / from_kohya
- `files.save_lora`, `load_lora`, `write_sidecar`, `read_metadata`, `file_model_hash`
- `metadata.build_metadata`        every ss_* / modelspec.* key
- `keys`                           key grammar, lora_A/lora_B normalisation, network type by keys
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "NetworkConfig": "config",
    "unet_targets": "targets",
    "text_encoder_targets": "targets",
    "find_targets": "targets",
    "unet_layout": "targets",
    "LoraNetwork": "network",
    "inject": "network",
    "LoraModule": "modules",
    "save_lora": "files",
    "lora_path": "files",
    "load_lora": "files",
    "read_metadata": "files",
    "read_header": "files",
    "write_sidecar": "files",
    "file_model_hash": "files",
    "build_metadata": "metadata",
    "normalise_state_dict": "keys",
    "KEY_GRAMMAR": "keys",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
