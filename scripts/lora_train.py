"""LoRA Train: registers the tab, its settings and its API routes. All the work is in the `lib_lora` package;
this file only connects it to the webui (it must not be named like the built-in Lora's modules)."""

import os
import sys

_EXT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXT_DIR not in sys.path:
    sys.path.insert(0, _EXT_DIR)

from modules import script_callbacks  # noqa: E402

from lib_lora.webui import app  # noqa: E402

script_callbacks.on_ui_tabs(app.on_ui_tabs)
script_callbacks.on_ui_settings(app.on_ui_settings)
script_callbacks.on_app_started(app.on_app_started)
