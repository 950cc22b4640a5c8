"""Resumable training state: a small JSON file beside the network, optimizer, scheduler and scaler states.

A state folder is written whole or not at all (built under a temporary name, then swapped in), so an
interrupt while saving leaves the previous state intact. Network weights are kept in float32 whatever the
save precision, so resuming continues the exact numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInput, IncompatibleFile
from ..fsutil import atomic_write_bytes, atomic_write_text
from .config import TrainConfig

STATE_VERSION = 1
STATE_FILE = "state.json"

# settings that never change the trained numbers: where and how often files are written, logging, previews, the
# seed (a resumed run takes the state's), the starting weights (the state's replace them), gradient checkpointing
# (the same arithmetic, recomputed: turning it on after an out-of-memory stop is a normal resume)
_NOT_NUMERIC = frozenset({
    "output_dir", "output_name", "save_precision", "save_every_n_epochs", "save_state", "state_dir", "resume",
    "training_comment", "sample_every_n_epochs", "save_every_n_steps", "save_last_n_steps", "save_last_n_steps_state",
    "sample_every_n_steps", "sample_prompts", "sample_sampler", "sample_dir", "logging_dir", "log_with", "dry_run", "config_version",
    "seed", "network_weights", "gradient_checkpointing",
})


def settings_digest(cfg: TrainConfig) -> str:
    """A short hash of every setting that decides the numbers (all but _NOT_NUMERIC), so a resume with changed
    settings is noticed."""
    from .config import field_names

    values = {k: getattr(cfg, k) for k in field_names() if k not in _NOT_NUMERIC}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=list).encode()).hexdigest()[:16]


@dataclass
class TrainState:
    seed: int
    total_steps: int
    epochs_done: int = 0
    batches_done: int = 0  # batches of epoch `epochs_done + 1` already trained
    global_step: int = 0  # optimizer steps done
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    val_losses: dict[str, float] = field(default_factory=dict)  # epoch (as text, JSON keys) -> loss
    saved_files: list[str] = field(default_factory=list)
    started_at: float = 0.0
    session_id: int = 0
    settings: str = ""  # settings_digest of the run that wrote it
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        data = json.loads(text)
        if data.get("version", 0) > STATE_VERSION:
            raise IncompatibleFile(f"the state was written by a newer lib_lora (state version {data['version']})")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _tensor_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_state(
    folder: str | Path,
    state: TrainState,
    network_tensors: dict,
    optimizer_state: dict,
    scheduler_state: dict,
    scaler_state: dict | None,
    cfg: TrainConfig,
) -> Path:
    """Write the state folder atomically (temporary folder, then swap) and return it."""
    from safetensors.torch import save as st_save

    from .config_io import dump_toml

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in network_tensors.items()}
        atomic_write_bytes(tmp / "network.safetensors", st_save(tensors))
        atomic_write_bytes(tmp / "optimizer.pt", _tensor_bytes(optimizer_state))
        atomic_write_bytes(tmp / "scheduler.pt", _tensor_bytes(scheduler_state))
        if scaler_state is not None:
            atomic_write_bytes(tmp / "scaler.pt", _tensor_bytes(scaler_state))
        atomic_write_text(tmp / "settings.toml", dump_toml(cfg))
        atomic_write_text(tmp / STATE_FILE, state.to_json())  # last: its presence marks a complete folder
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return folder


@dataclass
class LoadedState:
    state: TrainState
    network: dict
    optimizer: dict
    scheduler: dict
    scaler: dict | None


def load_state(folder: str | Path) -> LoadedState:
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.is_file():
        raise BadInput(f"{folder} is not a saved state folder (no {STATE_FILE})")
    try:
        state = TrainState.from_json(path.read_text(encoding="utf-8"))
        network = load_file(str(folder / "network.safetensors"))
        optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        scheduler = torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True)
        scaler_path = folder / "scaler.pt"
        scaler = torch.load(scaler_path, map_location="cpu", weights_only=True) if scaler_path.exists() else None
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError, TypeError) as exc:
        raise IncompatibleFile(f"state folder {folder} is damaged: {exc}") from None
    return LoadedState(state, network, optimizer, scheduler, scaler)


def resolve_seed(cfg: TrainConfig) -> TrainConfig:
    """The config with a concrete seed, chosen before the dataset is built (its batch order depends on it):
    the resumed state's seed, else the given one, else a random one (recorded in the state and the metadata)."""
    import random

    if cfg.resume and (Path(cfg.resume) / STATE_FILE).is_file():
        try:
            seed = int(json.loads((Path(cfg.resume) / STATE_FILE).read_text(encoding="utf-8"))["seed"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IncompatibleFile(f"state folder {cfg.resume} is damaged: {exc}") from None
        return dataclasses.replace(cfg, seed=seed)
    if cfg.seed is None:
        return dataclasses.replace(cfg, seed=random.randrange(2**31))
    return cfg


def build_dataset(cfg: TrainConfig):
    """The dataset for `cfg` (seed resolved first): scanned, split and bucketed, no pixels loaded yet."""
    from ..dataset import Dataset, DatasetOptions

    from .dataset_config import apply_dataset_config, dataset_subsets

    cfg = apply_dataset_config(resolve_seed(cfg))
    return Dataset.build(DatasetOptions.from_config(cfg, subsets=dataset_subsets(cfg)))
