"""Epoch / weight comparison through the webui's own X/Y/Z plot script with Prompt S/R, run in-process, and the
infotext that opens txt2img with the same plot ("Send to txt2img").

Prompt S/R needs its first value in the prompt, so the prompt's `<lora:...>` tag is rewritten to the first epoch
stem and the first weight; the X axis then swaps stems, the Y axis swaps `:W>` endings (epoch stems are
`name-01`, `name-02`, ..., none a substring of another).
"""

from __future__ import annotations

from ..errors import BadInput
from ..ui.compare import axes, grid_prompt, infotext  # noqa: F401  (re-exported: the tests and the API use them)
from ..ui.host import GridRequest, GridResult


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
