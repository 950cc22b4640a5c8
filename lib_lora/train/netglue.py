"""The one place the training loop talks to `lib_lora.network`: build the network for a backend, write files.

Kept apart so the loop reads as training only, and so a change in the network package's signatures touches
one small module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import TrainConfig, effective_lrs


def network_config(cfg: TrainConfig):
    """NetworkConfig from sd-scripts' options; a side with learning rate 0 is not trained (kohya_ss's rule)."""
    from ..network.config import NetworkConfig

    unet_lr, te_lr = effective_lrs(cfg)
    return NetworkConfig.from_args(
        cfg.network_dim,
        cfg.network_alpha,
        list(cfg.network_args),
        dropout=cfg.network_dropout,
        train_unet=unet_lr > 0,
        train_text_encoder=te_lr > 0,
    )


def build_network(cfg: TrainConfig, backend: Any):
    """A fresh LoRA network over the backend's targets (not applied yet)."""
    from ..network import LoraNetwork

    net_cfg = network_config(cfg)
    return LoraNetwork(backend.lora_targets(net_cfg), net_cfg)


def load_weights(network: Any, path: str) -> None:
    """Start from an existing LoRA file (`network_weights`); IncompatibleFile names unmatched keys."""
    from ..network import load_lora

    tensors, _ = load_lora(path)
    network.load_kohya(tensors)


def save_network(network: Any, path: Path, metadata: dict[str, str], precision: str, sidecar: dict[str, str] | None) -> Path:
    """Write `path` (atomic, with hashes and modelspec added by the network package) and its `.json` sidecar."""
    from ..network import save_lora, write_sidecar

    save_lora(path, network.state_dict(), metadata, precision)
    if sidecar is not None:
        write_sidecar(path, **sidecar)
    return path
