"""Small gradio helpers shared by the sub-tabs: named handlers, error display, messages.

Why named handlers: gradio passes input values by position; `on()` turns them back into keyword arguments from
the same dict the inputs were listed from, so a handler reads `values["network_dim"]`, never `args[17]`.
Handlers return `{component: value}` dicts, so outputs are matched by component, not by position either.
"""

from __future__ import annotations

import html
import traceback
from typing import Any, Callable, Mapping

from ..errors import LoraTrainError


def message(text: str, kind: str = "info") -> str:
    """HTML for the tab's message line: info, ok, warn or error (error is red, and what the tests look for)."""
    css = {"info": "lt-info", "ok": "lt-ok", "warn": "lt-warn", "error": "lt-error"}[kind]
    return f"<div class='lora-train-msg {css}'>{html.escape(text)}</div>"


def on(event, fn: Callable[..., Mapping], inputs: Mapping[str, Any], outputs, error_output=None,
       progress: bool = False, **kwargs):
    """Wire `event` so `fn(**{name: value})` is called; a LoraTrainError becomes a red message in `error_output`.

    `outputs` is a list of components; `fn` returns a dict {component: value} for the ones it changes.
    With `progress=True`, `fn` also gets `progress=` (gradio's progress bar over the outputs).
    """
    names = list(inputs)
    components = [inputs[n] for n in names]
    outs = list(outputs)
    if error_output is not None and error_output not in outs:
        outs.append(error_output)

    def call(values, extra):
        try:
            result = fn(**dict(zip(names, values)), **extra) or {}
        except LoraTrainError as exc:
            if error_output is None:
                raise
            return {error_output: message(str(exc), "error")}
        except Exception as exc:  # a bug: say so in the tab instead of a silent spinner
            traceback.print_exc()
            if error_output is None:
                raise
            return {error_output: message(f"internal error: {type(exc).__name__}: {exc}", "error")}
        return result

    if progress:
        import gradio as gr

        def handler(*values, progress=gr.Progress()):
            return call(values, {"progress": progress})
    else:
        def handler(*values):
            return call(values, {})

    return event(handler, inputs=components, outputs=outs, **kwargs)
