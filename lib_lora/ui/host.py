"""What the tab needs from whoever serves it: the webui (`lib_lora.webui.host.WebuiHost`) or the standalone app
(`lib_lora.ui.standalone.StandaloneHost`).

Why a protocol: the gradio blocks in `lib_lora.ui` must know nothing of the webui, so the same tab runs inside
A1111 and as `python -m lib_lora ui`. Everything model-, path- or progress-related goes through this object.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Protocol, runtime_checkable


@dataclass(frozen=True)
class ModelInfo:
    """The model a training run would use."""

    name: str  # what the user recognises: checkpoint title or folder name
    arch: str  # sd1 | sd2 | sdxl
    v_prediction: bool = False
    path: str = ""  # checkpoint file or diffusers folder (metadata; the webui trains on the loaded object)

    @property
    def sd_version(self) -> str:
        """The Lora card's `sd version` value."""
        return {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}.get(self.arch, "Unknown")


@dataclass(frozen=True)
class GridRequest:
    """An epoch / weight comparison: Prompt S/R over epoch file stems and / or weights."""

    lora_stems: tuple[str, ...]  # e.g. ("proj-01", "proj-02")
    weights: tuple[float, ...] = ()  # e.g. (0.5, 0.75, 1.0); empty = the preferred weight only
    prompt: str = ""  # contains <lora:STEM:W> with the first stem and the first (or preferred) weight
    negative_prompt: str = ""
    seed: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler: str = "Euler a"


@dataclass
class GridResult:
    image: Any  # PIL image
    infotext: str  # what "Send to txt2img" pastes
    path: str = ""  # where the grid was saved, if anywhere
    notes: list = field(default_factory=list)


@dataclass(frozen=True)
class MergeRequest:
    checkpoint: str  # a name from host.checkpoints()
    loras: tuple[tuple[str, float], ...]  # (lora file path, weight)
    output_name: str
    save_precision: str = "fp16"


@runtime_checkable
class Host(Protocol):
    kind: str  # "webui" | "standalone"

    def projects_root(self) -> Path:
        """Folder holding every project."""

    def presets_dir(self) -> Path:
        """Folder of saved presets (outside the extension folder: updates reset that folder)."""

    def lora_output_dir(self, project: str) -> Path:
        """Where a project's epoch files go (the webui: <Lora folder>/<project>)."""

    def model_info(self) -> ModelInfo:
        """The model training would use; BadInput when there is none or it cannot be trained."""

    def check_can_train(self) -> None:
        """BadInput naming the reason the model cannot be trained right now (none loaded, SD3, lowvram, busy)."""

    def fixed_config(self, info: ModelInfo) -> dict:
        """Config values the host decides (model path, v2 / sdxl flags, precision for its device)."""

    def training_session(self, job) -> ContextManager:
        """Exclusive use of the model for one job: yields a Backend, restores everything on exit."""

    def exclusive(self, label: str) -> ContextManager:
        """Exclusive use of the device for other work (tagging, merging), queued behind generations / training."""

    def pause_gate(self, job) -> ContextManager:
        """Entered while a job is paused: the model is free for other work inside it."""

    def report(self, job) -> None:
        """Push a job's progress into the host's own progress display (no-op standalone)."""

    def check_saved_lora(self, path: Path) -> str:
        """Check a saved epoch against the host's own LoRA loader; a line for the tab. Raises on mismatch."""

    def refresh_loras(self) -> None:
        """Make newly saved files visible to the host's LoRA list."""

    def lora_files(self) -> list[Path]:
        """Every LoRA file the host knows (for the Test and Merge tabs)."""

    def run_grid(self, request: GridRequest) -> GridResult:
        """Render a comparison grid with the host's own sampler."""

    def checkpoints(self) -> list[str]:
        """Checkpoint names the Merge tab offers."""

    def merge(self, request: MergeRequest) -> Path:
        """Merge LoRAs into a checkpoint, register it, return its path."""


class NullGate:
    """A pause gate that does nothing special (the standalone app holds no shared lock)."""

    def __call__(self, job) -> ContextManager:
        return contextlib.nullcontext()
