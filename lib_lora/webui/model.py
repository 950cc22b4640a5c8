"""The webui's loaded model: what it is, whether it can be trained now, and the state to clear / lift around a run.

Every `modules.*` import is inside a function: this file is imported by the tab's script at webui start, before
the model exists, and by tests without a webui.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from ..errors import BadInput
from ..ui.host import ModelInfo


def loaded_model():
    """The model object, or None; never triggers a load (unlike `shared.sd_model`)."""
    from modules import sd_models

    return sd_models.model_data.sd_model


def arch_of(sd_model) -> str:
    if getattr(sd_model, "is_sd3", False):
        return "sd3"
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    return "sd1"


def model_info() -> ModelInfo:
    sd_model = loaded_model()
    if sd_model is None:
        raise BadInput("no model is loaded: choose a checkpoint at the top of the page and wait for it to load")
    arch = arch_of(sd_model)
    info = getattr(sd_model, "sd_checkpoint_info", None)
    name = getattr(info, "title", None) or getattr(info, "name", None) or "loaded model"
    if arch == "sd3":
        raise BadInput(f"{name} is an SD3 model: LoRA Train trains SD1, SD2 and SDXL models only")
    return ModelInfo(name=name, arch=arch, v_prediction=getattr(sd_model, "parameterization", "eps") == "v",
                     path=getattr(info, "filename", "") or "")


def refusal() -> str | None:
    """Why the loaded model cannot be trained right now, or None."""
    from modules import devices, shared

    try:
        model_info()
    except BadInput as exc:
        return str(exc)
    sd_model = loaded_model()
    if getattr(shared.cmd_opts, "lowvram", False):
        return ("the webui runs with --lowvram, which streams the UNet block by block and cannot train; "
                "restart it with --medvram (training works there) or without either")
    if getattr(devices, "fp8", False) or str(getattr(shared.opts, "fp8_storage", "Disable")) not in ("Disable", "False", ""):
        return "the model is stored in FP8 (Settings > Optimizations > FP8 weight): turn that off to train"
    info = getattr(sd_model, "sd_checkpoint_info", None)
    selected = getattr(shared.opts, "sd_model_checkpoint", None)
    if info is not None and selected and selected not in (info.title, info.name, info.model_name, info.name_for_extra,
                                                          getattr(info, "short_title", None)):
        return (f"the checkpoint selected at the top ({selected}) is not the loaded one ({info.title}): "
                "wait for it to finish loading")
    return None


def generation_running() -> bool:
    """True while something else holds the webui's queue lock (a txt2img, img2img, merge, ...)."""
    from modules import call_queue

    inner = getattr(call_queue.queue_lock, "_lock", None)
    return bool(inner is not None and inner.locked())


def clear_builtin_networks(sd_model) -> int:
    """Undo what the built-in Lora extension baked into the weights for earlier generations.

    It adds each active LoRA's delta into the weights in place and keeps the set active after the generation
    ends; training on top of that would train against the wrong base. Clearing its active list and running its
    own per-module apply with the empty set restores every module from its backup. Returns the modules restored.
    """
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(networks, "loaded_networks"):
        return 0
    import torch

    networks.loaded_networks.clear()
    restored = 0
    with torch.no_grad():  # it copies backups into the weights in place; ldm leaves UNet weights requiring grad
        for module in getattr(sd_model, "network_layer_mapping", {}).values():
            if getattr(module, "network_current_names", ()) != ():
                networks.network_apply_weights(module)
                restored += 1
    return restored


def _medvram_hooks(sd_model) -> list[tuple]:
    found = []
    for module in sd_model.modules():
        for key, fn in list(module._forward_pre_hooks.items()):
            if getattr(fn, "__name__", "") == "send_me_to_gpu":
                found.append((module, key, fn))
    return found


@contextlib.contextmanager
def medvram_lifted(sd_model) -> Iterator[None]:
    """Under --medvram the webui keeps one of UNet / text encoder / VAE on the GPU at a time, swapped by forward
    hooks. For the run the hooks come off and `sd_model.lowvram` reads False, so the backend places the modules
    itself (UNet on the GPU; VAE and text encoders only while their caches are filled); afterwards every part goes
    back to the CPU and the same hook objects and flag are put back, as the webui left them."""
    if not getattr(sd_model, "lowvram", False):
        yield
        return
    from modules import devices, lowvram

    lowvram.send_everything_to_cpu()
    hooks = _medvram_hooks(sd_model)
    for module, key, _ in hooks:
        del module._forward_pre_hooks[key]
    vae = sd_model.first_stage_model
    wrappers = {k: vae.__dict__.pop(k) for k in ("encode", "decode") if k in vae.__dict__}
    sd_model.lowvram = False
    try:
        yield
    finally:
        sd_model.lowvram = True
        for module in _medvram_parts(sd_model):
            module.to(devices.cpu)
        for module, key, fn in hooks:
            module._forward_pre_hooks[key] = fn
        vae.__dict__.update(wrappers)
        lowvram.module_in_gpu = None
        devices.torch_gc()


def _medvram_parts(sd_model) -> list:
    """The modules the webui's medvram setup keeps on the CPU (modules/lowvram.py `to_remain_in_cpu`)."""
    parts = [getattr(sd_model, name, None) for name in ("first_stage_model", "depth_model", "embedder", "model")]
    if hasattr(sd_model, "conditioner"):
        parts.append(sd_model.conditioner)
    elif hasattr(sd_model.cond_stage_model, "model"):
        parts.append(sd_model.cond_stage_model.model)
    else:
        parts.append(getattr(sd_model.cond_stage_model, "transformer", None))
    return [p for p in parts if p is not None]


def medvram_hook_count(sd_model) -> int:
    """How many medvram swap hooks the model carries (tests compare before / after a run)."""
    return len(_medvram_hooks(sd_model))
