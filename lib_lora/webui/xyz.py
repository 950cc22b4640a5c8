"""Epoch / weight comparison through the webui's own X/Y/Z plot script with Prompt S/R, run in-process, and the
infotext that opens txt2img with the same plot ("Send to txt2img").

Prompt S/R needs its first value in the prompt, so the prompt's `<lora:...>` tag is rewritten to the first epoch
stem and the first weight; the X axis then swaps stems, the Y axis swaps `:W>` endings (epoch stems are
`name-01`, `name-02`, ..., none a substring of another).
"""

from __future__ import annotations

import json
import re

from ..errors import BadInput
from ..ui.host import GridRequest, GridResult

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


def _xyz_script():
    from modules import scripts

    runner = scripts.scripts_txt2img
    for script in getattr(runner, "selectable_scripts", []) or []:
        if script.title() == "X/Y/Z plot":
            if not getattr(script, "current_axis_options", None):
                raise BadInput("the X/Y/Z plot script is not initialised yet (open txt2img once)")
            return script
    raise BadInput("the webui's X/Y/Z plot script is not available")


def run_grid(request: GridRequest) -> GridResult:
    """Render the grid with the webui's sampler, holding the queue lock like any generation."""
    from contextlib import closing

    from modules import call_queue, processing, shared

    xyz = _xyz_script()
    labels = [o.label for o in xyz.current_axis_options]
    sr = labels.index("Prompt S/R")
    x_values, y_values = axes(request)
    prompt = grid_prompt(request)
    with call_queue.queue_lock:
        shared.state.begin(job="LoRA Train comparison")
        try:
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=shared.sd_model, outpath_samples=shared.opts.outdir_txt2img_samples,
                outpath_grids=shared.opts.outdir_txt2img_grids, prompt=prompt,
                negative_prompt=request.negative_prompt, seed=request.seed, steps=request.steps,
                sampler_name=request.sampler, cfg_scale=request.cfg_scale, width=request.width, height=request.height,
                do_not_save_samples=True,
            )
            with closing(p):
                processed = xyz.run(p, sr, x_values, [], sr if y_values else 0, y_values, [], 0, "", [],
                                    True, False, False, False, False, False, False, 0, False)
        finally:
            shared.state.end()
    if processed is None or not processed.images:
        raise BadInput("the X/Y/Z plot produced no image (see the console)")
    return GridResult(image=processed.images[0], infotext=infotext(request))


def register_send_button(button, infotext_component) -> None:
    """Make `button` paste `infotext_component`'s text into txt2img (script fields included)."""
    from modules import infotext_utils

    infotext_utils.register_paste_params_button(infotext_utils.ParamBinding(
        paste_button=button, tabname="txt2img", source_text_component=infotext_component,
    ))
