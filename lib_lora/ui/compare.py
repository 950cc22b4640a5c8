"""Epoch / weight comparison as Prompt S/R values and webui infotext, shared by the webui's X/Y/Z run, the
standalone grid and "Send to txt2img". Pure text; no webui import.

Prompt S/R needs its first value in the prompt, so the prompt's `<lora:...>` tag is rewritten to the first epoch
stem and the first weight; the X axis then swaps stems, the Y axis swaps `:W>` endings (epoch stems are
`name-01`, `name-02`, ..., none a substring of another).
"""

from __future__ import annotations

import json
import re

from ..errors import BadInput
from .host import GridRequest

_LORA_TAG = re.compile(r"<lora:[^:>]+(:[^>]*)?>")


def fmt_weight(w: float) -> str:
    return f"{w:g}"


def grid_prompt(request: GridRequest) -> str:
    """The prompt with exactly one `<lora:FIRST_STEM:FIRST_WEIGHT>` (replacing the first lora tag, or prepended)."""
    if not request.lora_stems:
        raise BadInput("choose at least one epoch")
    weight = request.weights[0] if request.weights else None
    if weight is None:
        match = _LORA_TAG.search(request.prompt or "")
        weight = float(match.group(1)[1:]) if match and match.group(1) and _is_float(match.group(1)[1:]) else 1.0
    tag = f"<lora:{request.lora_stems[0]}:{fmt_weight(weight)}>"
    prompt = request.prompt or ""
    if _LORA_TAG.search(prompt):
        return _LORA_TAG.sub(lambda m, _t=[tag]: _t.pop() if _t else "", prompt, count=1)
    return f"{tag}, {prompt}" if prompt.strip() else tag


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def axes(request: GridRequest) -> tuple[str, str]:
    """(X values, Y values) as Prompt S/R CSV strings; Y is '' when only one weight is compared."""
    x = ", ".join(request.lora_stems)
    y = ", ".join(f":{fmt_weight(w)}>" for w in request.weights) if len(request.weights) > 1 else ""
    return x, y


def infotext(request: GridRequest) -> str:
    """Generation parameters in the webui's infotext form, with the X/Y/Z script settings."""
    x, y = axes(request)
    pairs = [("Steps", request.steps), ("Sampler", request.sampler), ("CFG scale", request.cfg_scale),
             ("Seed", request.seed), ("Size", f"{request.width}x{request.height}"), ("Script", "X/Y/Z plot"),
             ("X Type", "Prompt S/R"), ("X Values", x)]
    if y:
        pairs += [("Y Type", "Prompt S/R"), ("Y Values", y)]
    text = grid_prompt(request)
    if request.negative_prompt:
        text += f"\nNegative prompt: {request.negative_prompt}"

    def quote(v) -> str:
        v = str(v)
        return json.dumps(v) if any(c in v for c in ",:\n\"") else v

    return text + "\n" + ", ".join(f"{k}: {quote(v)}" for k, v in pairs)
