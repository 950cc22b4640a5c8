"""`python -m lib_lora ui --model PATH`: the LoRA Train tab as a plain gradio page on 127.0.0.1, training with
the diffusers backend (no webui needed)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model: a diffusers folder or a .safetensors checkpoint")
    parser.add_argument("--projects", default="lora-train", help="folder holding the projects (default: ./lora-train)")
    parser.add_argument("--lora-dir", default=None, help="where epoch files go, as <dir>/<project>/ (default: <projects>/.lora)")
    parser.add_argument("--checkpoints-dir", default=None, help="checkpoints the Merge tab offers and writes (default: the model's folder)")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser window")


def page_js() -> str:
    """javascript/lora_train.js wrapped for gradio's load hook (the webui loads it by itself)."""
    source = (Path(__file__).resolve().parents[2] / "javascript" / "lora_train.js").read_text(encoding="utf-8")
    return "() => {\n" + source + "\n}"


def starlette_compat() -> None:
    """gradio 3.41 calls `TemplateResponse(name, {"request": ...})`; starlette 1.x only takes the request first.
    Adapt the old call form (the webui's pinned fastapi 0.94 never needs this)."""
    from gradio import routes

    templates = routes.templates
    original = type(templates).TemplateResponse
    if getattr(original, "_lora_train_compat", False):
        return

    def template_response(self, *args, **kwargs):
        if args and isinstance(args[0], str) and len(args) > 1 and isinstance(args[1], dict) and "request" in args[1]:
            name, context, *rest = args
            try:
                return original(self, context["request"], name, context, *rest, **kwargs)
            except TypeError:
                pass
        return original(self, *args, **kwargs)

    template_response._lora_train_compat = True
    type(templates).TemplateResponse = template_response


def build_app(args):
    from ..ui.standalone import StandaloneHost
    from ..ui.tab import build_tab

    host = StandaloneHost(args.model, args.projects, args.lora_dir, args.checkpoints_dir, args.device)
    blocks = build_tab(host)
    with blocks:
        blocks.load(None, None, None, _js=page_js())
    blocks.title = "LoRA Train"
    return blocks, host


def run(args) -> int:
    starlette_compat()
    blocks, host = build_app(args)
    print(f"LoRA Train: model {host.model_info().name}, projects in {host.projects_root().resolve()}")
    blocks.queue(concurrency_count=4).launch(server_name="127.0.0.1", server_port=args.port,
                                             inbrowser=not args.no_browser, show_api=False)
    return 0
