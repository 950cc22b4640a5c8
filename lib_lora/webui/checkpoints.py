"""Merge LoRAs into a checkpoint into the webui's Stable-diffusion folder and list it without a restart."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from ..fsutil import check_name
from ..ui.host import MergeRequest


def checkpoint_dir() -> Path:
    from modules import sd_models, shared

    return Path(getattr(shared.cmd_opts, "ckpt_dir", None) or sd_models.model_path)


def merge_into_checkpoint(request: MergeRequest) -> Path:
    from modules import call_queue, sd_models, shared

    info = sd_models.checkpoints_list.get(request.checkpoint)
    if info is None:
        raise BadInput(f"checkpoint {request.checkpoint!r} is not in the webui's list")
    name = check_name(request.output_name, "checkpoint name")
    out = checkpoint_dir() / f"{name}.safetensors"
    if out.exists():
        raise BadInput(f"{out.name} already exists in {out.parent}; choose another name")
    from ..merge import merge_loras

    with call_queue.queue_lock:  # a merge is RAM- and disk-heavy: not while a generation or training runs
        shared.state.begin(job="LoRA Train merge")
        try:
            merge_loras(info.filename, [(str(p), float(w)) for p, w in request.loras], out,
                        precision=request.save_precision)
        finally:
            shared.state.end()
    sd_models.list_models()  # the merger copied the source's .yaml beside it; the new title is listed now
    return out
