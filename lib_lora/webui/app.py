"""The tab's life inside the webui: one service (host + job queue) per process, and the callbacks
`scripts/lora_train.py` registers. The service outlives UI reloads, so a running training keeps going."""

from __future__ import annotations

_service = None

SECTION = ("lora_train", "LoRA Train", "training")


def service():
    """The process-wide TrainService over a WebuiHost."""
    global _service
    if _service is None:
        from ..ui.service import TrainService
        from .host import WebuiHost

        host = WebuiHost()
        _service = TrainService(host)
        host.queue = _service.queue
    return _service


def on_ui_tabs():
    from ..ui.tab import build_tab

    return [(build_tab(service().host, service()), "LoRA Train", "lora_train")]


def on_ui_settings():
    from modules import shared

    options = {
        "lora_train_dir": shared.OptionInfo(
            "", "Folder for LoRA Train projects (empty: <webui data dir>/lora-train; --lora-train-dir wins)"),
        "lora_train_check_loader": shared.OptionInfo(
            True, "Check each saved epoch with the webui's own Lora loader (a mismatch stops the training)"),
        "lora_train_webui_previews": shared.OptionInfo(
            True, "Render training previews with the webui's own sampler (off: the trainer's small built-in sampler)"),
    }
    for key, info in options.items():
        info.section, info.category_id = SECTION[:2], SECTION[2]
        shared.opts.add_option(key, info)


def on_app_started(_demo, app):
    from modules import shared

    if not (getattr(shared.cmd_opts, "api", False) or getattr(shared.cmd_opts, "nowebui", False)):
        return
    from .api import add_routes

    add_routes(app, service(), getattr(shared.cmd_opts, "api_auth", None))
