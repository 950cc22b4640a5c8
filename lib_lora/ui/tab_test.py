"""Test sub-tab: compare epochs and weights with a Prompt S/R grid, then hand the same plot to txt2img."""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr

from ..errors import BadInput
from . import tagops
from .common import message, on
from .host import GridRequest

_EPOCH = re.compile(r"^(?P<base>.+)-(?P<n>\d{2,})$")


def epoch_files(folder: Path, base: str) -> list[Path]:
    """`<base>-NN.safetensors` files in `folder`, by epoch number."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.glob("*.safetensors"):
        m = _EPOCH.match(p.stem)
        if m and m.group("base") == base:
            found.append((int(m.group("n")), p))
    return [p for _, p in sorted(found)]


def parse_weights(text: str) -> tuple[float, ...]:
    weights = []
    for part in str(text or "").replace(";", ",").split(","):
        if part.strip():
            try:
                w = float(part)
            except ValueError:
                raise BadInput(f"weight {part.strip()!r} is not a number") from None
            if not -4.0 <= w <= 4.0:
                raise BadInput(f"weight {w:g} is outside -4..4")
            weights.append(w)
    return tuple(weights)


def number(label: str, value, low: float, high: float) -> float:
    """A grid setting within its range, or BadInput naming it (gradio's own range check would not)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BadInput(f"{label}: {value!r} is not a number") from None
    if not low <= v <= high:
        raise BadInput(f"{label} must be between {low:g} and {high:g}, not {v:g}")
    return v


def default_prompt(stem: str, weight: float, activation: str, top_tags: list[str]) -> str:
    """`<lora:STEM:W>` then the activation tag and the most common tags (what the LoRA was trained on)."""
    parts = [f"<lora:{stem}:{weight:g}>"]
    if activation:
        parts.append(activation)
    parts += [t for t in top_tags if t != activation][:6]
    return ", ".join(parts)


def build(ctx) -> None:
    with gr.Row():
        epochs = gr.CheckboxGroup(label="Epochs to compare", choices=[], elem_id="lora_train_test_epochs")
        weights = gr.Textbox(value="0.5, 0.75, 1", label="Weights to compare (0 = without the LoRA, a baseline row; "
                             "empty = the prompt's weight only)",
                             elem_id="lora_train_test_weights")
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="lora_train_test_prompt")
    negative = gr.Textbox(label="Negative prompt", elem_id="lora_train_test_negative")
    with gr.Row():
        seed = gr.Number(value=1, label="Seed", precision=0, elem_id="lora_train_test_seed")
        steps = gr.Number(value=20, label="Steps", precision=0, elem_id="lora_train_test_steps")
        cfg_scale = gr.Number(value=7.0, label="CFG scale", elem_id="lora_train_test_cfg")
        width = gr.Number(value=512, label="Width", precision=0, elem_id="lora_train_test_width")
        height = gr.Number(value=512, label="Height", precision=0, elem_id="lora_train_test_height")
    with gr.Row():
        run_btn = gr.Button("Run comparison grid", variant="primary", elem_id="lora_train_test_run")
        send_btn = gr.Button("Send to txt2img", elem_id="lora_train_test_send")
    grid = gr.Image(label="Grid", type="pil", interactive=False, elem_id="lora_train_test_grid")
    infotext = gr.Textbox(label="Generation parameters", lines=3, interactive=False, elem_id="lora_train_test_infotext")
    ctx.host_register_send(send_btn, infotext)

    def stems_of(project):
        return [p.stem for p in epoch_files(ctx.host.lora_output_dir(project.name), project.name)]

    def on_project(project_name):
        project = ctx.project(project_name)
        stems = stems_of(project)
        top = [t for t, _ in tagops.frequency(project.images())[:8]]
        first = stems[0] if stems else f"{project.name}-01"
        size = ctx.default_size()
        return {
            epochs: gr.update(choices=stems, value=stems),
            prompt: default_prompt(first, project.meta.preferred_weight or 0.8, project.meta.activation_tag, top),
            width: size, height: size,
        }

    ctx.on_project_change(on_project, [epochs, prompt, width, height], settings=True)

    def epochs_now(project_name, chosen):
        """Epoch files written since the project was chosen (a training just finished) appear; the user's
        ticks are kept where the files still exist (all ticked when none were)."""
        if not project_name:
            return {}
        stems = stems_of(ctx.project(project_name))
        kept = [s for s in (chosen or []) if s in stems]
        return {epochs: gr.update(choices=stems, value=kept or stems)}

    ctx.on_data_change(epochs_now, {"project_name": ctx.selector, "chosen": epochs}, [epochs])

    def do_run(project_name, epochs, weights, prompt, negative, seed, steps, cfg_scale, width, height):
        project = ctx.project(project_name)
        chosen = sorted(epochs or [], key=lambda stem: (int(m.group("n")) if (m := _EPOCH.match(stem)) else 0, stem))
        if not chosen:
            raise BadInput("no epoch files chosen: train first, or tick the epochs to compare")
        request = GridRequest(
            lora_stems=tuple(chosen), weights=parse_weights(weights), prompt=prompt, negative_prompt=negative or "",
            seed=int(number("Seed", seed, -1, 2**32 - 1)), steps=int(number("Steps", steps, 1, 150)),
            cfg_scale=number("CFG scale", cfg_scale, 1, 30), width=int(number("Width", width, 64, 2048)),
            height=int(number("Height", height, 64, 2048)),
        )
        del project
        ctx.service.check_idle_for("the comparison grid")
        result = ctx.host.run_grid(request)
        return {grid: result.image, infotext: result.infotext,
                ctx.msg: message("grid ready" + (f" ({'; '.join(result.notes)})" if result.notes else ""), "ok")}

    on(run_btn.click, do_run, {"project_name": ctx.selector, "epochs": epochs, "weights": weights, "prompt": prompt,
       "negative": negative, "seed": seed, "steps": steps, "cfg_scale": cfg_scale, "width": width, "height": height},
       [grid, infotext, ctx.msg], error_output=ctx.msg)
