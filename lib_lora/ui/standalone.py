"""The tab's Host outside the webui: a model path (diffusers folder or single file) loaded with the diffusers
backend, plain folders for projects, LoRAs and checkpoints, a threading lock instead of the webui's queue lock.

Imports diffusers only when a model is actually loaded (training, grid), never at import time.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Iterator

from ..errors import BadInput
from ..fsutil import check_name
from .host import GridRequest, GridResult, MergeRequest, ModelInfo


def detect_arch(model: Path) -> tuple[str, bool]:
    """(arch, v_prediction) of a diffusers folder from its configs, or of a single file from its keys."""
    if model.is_dir():
        unet_cfg = model / "unet" / "config.json"
        sched_cfg = model / "scheduler" / "scheduler_config.json"
        arch = "sd1"
        if unet_cfg.is_file():
            cfg = json.loads(unet_cfg.read_text(encoding="utf-8"))
            if cfg.get("addition_embed_type") == "text_time":
                arch = "sdxl"
            elif cfg.get("use_linear_projection") or (model / "text_encoder" / "config.json").is_file() and \
                    json.loads((model / "text_encoder" / "config.json").read_text(encoding="utf-8")).get("hidden_act") == "gelu":
                arch = "sd2"
        v = False
        if sched_cfg.is_file():
            v = json.loads(sched_cfg.read_text(encoding="utf-8")).get("prediction_type") == "v_prediction"
        return arch, v
    from safetensors import safe_open

    with safe_open(str(model), framework="pt") as fh:
        keys = set(fh.keys())
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl", False
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2", False
    return "sd1", False


class StandaloneHost:
    kind = "standalone"

    def __init__(self, model: str | Path, projects_root: str | Path, lora_dir: str | Path | None = None,
                 checkpoints_dir: str | Path | None = None, device: str | None = None) -> None:
        self.model_path = Path(model)
        if not self.model_path.exists():
            raise BadInput(f"model {self.model_path} does not exist")
        self.root = Path(projects_root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.loras = Path(lora_dir) if lora_dir else self.root / ".lora"
        self.ckpt_dir = Path(checkpoints_dir) if checkpoints_dir else self.model_path.parent
        self.device = device
        self._lock = threading.Lock()
        self._arch = detect_arch(self.model_path)
        self._backend = None

    # -- paths
    def projects_root(self) -> Path:
        return self.root

    def presets_dir(self) -> Path:
        folder = self.root / ".presets"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def lora_output_dir(self, project: str) -> Path:
        return self.loras / check_name(project, "project name")

    # -- model
    def model_info(self) -> ModelInfo:
        arch, v = self._arch
        return ModelInfo(name=self.model_path.name, arch=arch, v_prediction=v, path=str(self.model_path))

    def check_can_train(self) -> None:
        self.model_info()

    def fixed_config(self, info: ModelInfo) -> dict:
        on_gpu = self._device() == "cuda"
        return {
            "pretrained_model_name_or_path": info.path, "v2": info.arch == "sd2", "sdxl": info.arch == "sdxl",
            "v_parameterization": info.v_prediction, **({} if on_gpu else {"mixed_precision": "no"}),
        }

    def _device(self) -> str:
        if self.device:
            return self.device
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"

    def backend(self):
        """The diffusers backend over the model, loaded once."""
        if self._backend is None:
            from ..backends import load_backend

            self._backend = load_backend(str(self.model_path), device=self._device())
        return self._backend

    @contextlib.contextmanager
    def training_session(self, job) -> Iterator[object]:
        with self._lock:
            yield self.backend()

    @contextlib.contextmanager
    def exclusive(self, label: str) -> Iterator[None]:
        with self._lock:
            yield

    @contextlib.contextmanager
    def pause_gate(self, job) -> Iterator[None]:
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()

    def report(self, job) -> None:
        return None

    # -- files
    def check_saved_lora(self, path: Path) -> str:
        """Outside the webui: the file must load back into this model with every module matched."""
        from ..network import LoraNetwork, load_lora
        from .grid import _targets

        tensors, _meta = load_lora(path)
        LoraNetwork.from_kohya(_targets(self.backend()), tensors)  # IncompatibleFile names unmatched modules
        modules = {k.partition(".")[0] for k in tensors}
        return f"ok: all {len(modules)} modules load back into this model"

    def refresh_loras(self) -> None:
        return None

    def lora_files(self) -> list[Path]:
        return sorted(self.loras.rglob("*.safetensors")) if self.loras.is_dir() else []

    # -- test and merge
    def run_grid(self, request: GridRequest) -> GridResult:
        from .grid import render_grid

        with self._lock:
            return render_grid(self.backend(), self.loras, request)

    def checkpoints(self) -> list[str]:
        files = sorted(self.ckpt_dir.glob("*.safetensors")) if self.ckpt_dir.is_dir() else []
        return [f.name for f in files]

    def merge(self, request: MergeRequest) -> Path:
        from ..merge import merge_loras

        source = self.ckpt_dir / request.checkpoint
        if not source.is_file():
            raise BadInput(f"checkpoint {request.checkpoint!r} not found in {self.ckpt_dir}")
        out = self.ckpt_dir / f"{check_name(request.output_name, 'checkpoint name')}.safetensors"
        if out.exists():
            raise BadInput(f"{out.name} already exists; choose another name")
        with self._lock:
            merge_loras(str(source), [(str(p), float(w)) for p, w in request.loras], out,
                        precision=request.save_precision)
        return out
