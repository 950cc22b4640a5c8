"""The tab's Host inside A1111: paths, the loaded model, the queue lock, `shared.state` progress, the Lora list,
the X/Y/Z script and the checkpoint list. The only place (with its siblings) that imports `modules.*`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from ..errors import BadInput
from ..fsutil import check_name
from ..ui.host import GridRequest, GridResult, MergeRequest, ModelInfo
from . import model as webui_model


def _cmd_opt(name: str, default=None):
    from modules import shared

    return getattr(shared.cmd_opts, name, default)


class WebuiHost:
    kind = "webui"

    def __init__(self) -> None:
        self.queue = None  # set by the script once the service exists (to tell our own jobs from generations)

    # -- paths
    def projects_root(self) -> Path:
        from modules import paths_internal, shared

        configured = _cmd_opt("lora_train_dir") or getattr(shared.opts, "lora_train_dir", "") or ""
        root = Path(configured) if configured else Path(paths_internal.data_path) / "lora-train"
        root.mkdir(parents=True, exist_ok=True)
        return root

    def presets_dir(self) -> Path:
        folder = self.projects_root() / ".presets"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def lora_dir(self) -> Path:
        from modules import paths_internal

        return Path(_cmd_opt("lora_dir") or os.path.join(paths_internal.models_path, "Lora"))

    def tagger_models_folder(self) -> Path:
        """Tagger models download once into the webui's models folder, where the user sees (and can delete) them."""
        from modules import paths_internal

        return Path(paths_internal.models_path) / "lora-train-taggers"

    def lora_output_dir(self, project: str) -> Path:
        project = check_name(project, "project name")
        subdir = (_cmd_opt("lora_train_output_subdir") or "").strip().strip("/\\")
        base = self.lora_dir()
        if subdir:
            for part in Path(subdir).parts:
                check_name(part, "output subfolder")
            base = base / subdir
        return base / project

    # -- model
    def model_info(self) -> ModelInfo:
        return webui_model.model_info()

    def check_can_train(self) -> None:
        reason = webui_model.refusal()
        if reason:
            raise BadInput(reason)
        ours = self.queue is not None and self.queue.busy()
        if webui_model.generation_running() and not ours:
            raise BadInput("a generation is in progress: start the training when it has finished")

    def fixed_config(self, info: ModelInfo) -> dict:
        from modules import devices

        on_gpu = getattr(devices.device, "type", "cpu") == "cuda"
        return {
            "pretrained_model_name_or_path": info.path,
            "v2": info.arch == "sd2",
            "sdxl": info.arch == "sdxl",
            "v_parameterization": info.v_prediction,
            **({} if on_gpu else {"mixed_precision": "no"}),
        }

    @contextlib.contextmanager
    def training_session(self, job) -> Iterator[object]:
        """Queue lock held for the whole run; the built-in Lora's baked weights cleared; medvram hooks lifted;
        `shared.state` shows the job; everything put back on exit."""
        from modules import call_queue, progress, shared

        task_id = f"task(lora-train-{job.id})"
        progress.add_task_to_queue(task_id)
        with call_queue.queue_lock:
            shared.state.begin(job=f"LoRA Train {job.project}")
            progress.start_task(task_id)
            try:
                reason = webui_model.refusal()
                if reason:
                    raise BadInput(reason)
                sd_model = webui_model.loaded_model()
                webui_model.clear_builtin_networks(sd_model)
                with webui_model.medvram_lifted(sd_model):
                    from ..backends import LdmBackend
                    from .preview import webui_sampler

                    backend = LdmBackend(sd_model)
                    if getattr(shared.opts, "lora_train_webui_previews", True):
                        info = sd_model.sd_checkpoint_info
                        backend.sample = webui_sampler(sd_model, getattr(info, "name", None) or info.title)
                    yield backend
            finally:
                progress.finish_task(task_id)
                shared.state.end()

    @contextlib.contextmanager
    def exclusive(self, label: str) -> Iterator[None]:
        """GPU work other than training (tagging, merging): in the queue like a generation."""
        from modules import call_queue, shared

        with call_queue.queue_lock:
            shared.state.begin(job=label)
            try:
                yield
            finally:
                shared.state.end()

    @contextlib.contextmanager
    def pause_gate(self, job) -> Iterator[None]:
        """While paused the queue lock is free, so txt2img can run on the restored model."""
        from modules import call_queue, shared

        shared.state.textinfo = f"LoRA Train {job.project}: paused"
        call_queue.queue_lock.release()
        try:
            yield
        finally:
            call_queue.queue_lock.acquire()
            shared.state.begin(job=f"LoRA Train {job.project}")
            clear = webui_model.loaded_model()
            if clear is not None:
                webui_model.clear_builtin_networks(clear)

    def report(self, job) -> None:
        from modules import shared

        state = shared.state
        state.job_count = max(1, job.total_steps)
        state.job_no = min(job.step, state.job_count)
        state.sampling_step, state.sampling_steps = 0, 0
        state.textinfo = job.summary()
        if state.interrupted and not job.control.stop_requested:
            job.control.stop()

    # -- files
    def check_saved_lora(self, path: Path) -> str:
        from modules import shared

        from .lora_check import check_file

        if not getattr(shared.opts, "lora_train_check_loader", True):
            return "not checked (Settings > LoRA Train)"
        return check_file(path)

    def refresh_loras(self) -> None:
        import sys

        networks = sys.modules.get("networks")
        if networks is not None and hasattr(networks, "list_available_networks"):
            networks.list_available_networks()

    def lora_files(self) -> list[Path]:
        folder = self.lora_dir()
        return sorted(folder.rglob("*.safetensors")) if folder.is_dir() else []

    # -- test and merge
    def run_grid(self, request: GridRequest) -> GridResult:
        from .xyz import run_grid

        return run_grid(request)

    def register_send_to_txt2img(self, button, infotext) -> None:
        from .xyz import register_send_button

        register_send_button(button, infotext)

    def checkpoints(self) -> list[str]:
        from modules import sd_models

        return sorted(sd_models.checkpoints_list)

    def merge(self, request: MergeRequest) -> Path:
        from .checkpoints import merge_into_checkpoint

        return merge_into_checkpoint(request)
