"""The one place the training loop talks to `lib_lora.network`: build the network for a backend, write files.

Kept apart so the loop reads as training only, and so a change in the network package's signatures touches
one small module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import TrainConfig, effective_lrs, resolution_wh


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


def save_network(network: Any, path: Path, cfg: TrainConfig, training: dict[str, str], *, arch: str, v_prediction: bool,
                 dataset: Any, epoch: int, steps: int, started_at: float, session_id: int, base_model: str | None,
                 activation_text: str) -> Path:
    """Write `path` with every ss_* / modelspec.* key (the network package adds the hashes) and its `.json` sidecar
    (activation text = the concept names, sd version for the webui's filter)."""
    from ..network import build_metadata, save_lora, write_sidecar

    tables = {name: getattr(dataset, name)() for name in ("tag_frequency", "dataset_dirs", "bucket_info") if hasattr(dataset, name)}
    meta = build_metadata(
        arch=arch, output_name=Path(path).stem, network=network.cfg, v_prediction=v_prediction,
        resolution=resolution_wh(cfg), clip_skip=cfg.clip_skip, training=training, base_model=base_model, epoch=epoch,
        steps=steps, started_at=started_at, session_id=session_id, description=cfg.training_comment or None,
        trigger_phrase=activation_text or None, **tables,
    )
    save_lora(path, network, meta, cfg.save_precision)
    write_sidecar(path, activation_text=activation_text, sd_version=arch)
    return Path(path)
