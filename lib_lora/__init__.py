"""sd-webui LoRA Train: the engine behind the "LoRA Train" tab, the CLI and the tests.

Importing this package must stay cheap and must never import the webui (`modules.*`), torch-heavy
submodules or gradio: the webui imports it at script-load time, before any model exists.
"""

__version__ = "0.1.0"
