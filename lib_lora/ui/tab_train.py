"""Train sub-tab: settings grouped as the guides teach them, live step count, presets, imports, the job queue,
Start / Pause / Interrupt and a live loss plot."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from ..errors import BadInput
from ..fsutil import check_name
from . import fields
from .common import message, on
from .jobs import PAUSED, RUNNING


def _widget(f: fields.UiField):
    # the tab's own words where the engine's help speaks of command-line options
    info = f.info or fields.config_info(f.name).get("help", "")
    elem_id = f"lora_train_{f.name}"
    if f.widget == "checkbox":
        return gr.Checkbox(value=f.default, label=f.label, info=info, elem_id=elem_id)
    if f.widget == "dropdown":
        return gr.Dropdown(choices=fields.choices(f), value=f.default, label=f.label, info=info, elem_id=elem_id)
    # no minimum / maximum on the Numbers: gradio would refuse an out-of-range value with a toast that does not
    # name the field; fields.to_config_values refuses it with the field's label and range in the message line
    if f.widget == "int":
        return gr.Number(value=f.default, label=f.label, info=info, precision=0, elem_id=elem_id)
    if f.widget == "number":
        return gr.Number(value=f.default, label=f.label, info=info, elem_id=elem_id)
    lines = 3 if f.widget == "textarea" else 1
    return gr.Textbox(value=f.default, label=f.label, info=info, lines=lines, elem_id=elem_id)


def steps_html(text: str, repeated: int, lhs: str = "") -> str:
    """The steps line; `data-repeated` and `data-lhs` (the images x repeats part) let javascript/lora_train.js
    recompute the rest while the user types, before the server answers."""
    return (f"<div class='lora-train-msg lt-info' data-repeated='{int(repeated)}' data-lhs='{html.escape(lhs, quote=True)}'>"
            f"<span class='lora-train-live-steps'>{html.escape(text)}</span></div>")


DEFAULTS_PRESET = "(first-LoRA defaults)"


def preset_names(folder: Path) -> list[str]:
    """Saved presets, after the built-in one that puts every field back to the first-LoRA defaults."""
    return [DEFAULTS_PRESET] + (sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else [])


def loss_plot(job) -> str:
    from .lossplot import loss_svg

    return loss_svg(list(job.losses) if job else [], f"Loss of {job.project}" if job else "Loss")


QUEUE_HEADERS = ["project", "status", "step", "epoch", "loss", "message", "job"]


def queue_rows(jobs) -> list[list]:
    """Newest first; the message (why a run failed) before the job id, so a narrow table still shows it."""
    return [[j.project, j.status, f"{j.step}/{j.total_steps}", f"{j.epoch}/{j.epochs}",
             "" if j.loss is None else f"{j.loss:.4f}", j.message, j.id] for j in reversed(jobs)] or [[""] * 7]


def files_text(job) -> str:
    """Where the epochs went, then one line per file with the loader check."""
    if job is None or not (job.files or job.earlier_run):
        return ""
    lines = [job.earlier_run] if job.earlier_run else []
    if not job.files:
        return lines[0]
    lines.append(f"in {Path(job.files[0]).parent}:")
    for i, f in enumerate(job.files):
        check = job.checks[i] if i < len(job.checks) else ""
        lines.append(f"{Path(f).name}: {check}" if check else Path(f).name)
    return "\n".join(lines)


def sample_items(job, limit: int = 12) -> list[tuple[str, str]]:
    """The newest preview images of a run, newest first, captioned with their file name (epoch in it)."""
    if job is None:
        return []
    import re

    def label(path: str) -> str:
        m = re.search(r"_(e?)(\d+)_(\d+)$", Path(path).stem)  # sd-scripts' <name>_eNNNNNN_II.png, <name>_NNNNNN_II.png
        what = "epoch" if m and m.group(1) else "step"
        return f"{what} {int(m.group(2))}, prompt {int(m.group(3)) + 1}" if m else Path(path).stem

    return [(p, label(p)) for p in reversed(job.samples[-limit:]) if Path(p).is_file()]


def import_settings(path: str):
    """A kohya_ss GUI .json or an sd-scripts .toml -> TrainConfig, with notes on what was ignored."""
    notes: list[str] = []
    p = Path(path)
    if p.suffix.lower() == ".json":
        from ..train.kohya_ss import load_kohya_ss_json

        return load_kohya_ss_json(p, notes), notes
    if p.suffix.lower() == ".toml":
        from ..train.config_io import load_config_file

        return load_config_file(p, notes), notes
    raise BadInput(f"{p.name}: import a kohya_ss .json or an sd-scripts .toml file")


def build(ctx) -> None:
    service = ctx.service
    widgets: dict[str, gr.components.Component] = {}
    steps_line = gr.HTML("", elem_id="lora_train_steps_line")
    with gr.Row(elem_id="lora_train_settings_row"):
        with gr.Column(scale=3):  # settings, in the order guides teach them
            for row in (fields.GROUPS[:2], fields.GROUPS[2:4], fields.GROUPS[4:]):
                with gr.Row():
                    for group in row:
                        with gr.Column():
                            with gr.Accordion(group, open=group not in ("Samples", "Advanced"),
                                              elem_id=f"lora_train_group_{group.lower()}"):
                                for f in fields.FIELDS:
                                    if f.group == group:
                                        widgets[f.name] = _widget(f)
            with gr.Accordion("Presets and imports", open=False, elem_id="lora_train_presets"):
                with gr.Row():
                    preset = gr.Dropdown(preset_names(ctx.host.presets_dir()), label="Preset", elem_id="lora_train_preset")
                    load_btn = gr.Button("Load preset")
                with gr.Row():
                    preset_name = gr.Textbox(label="Save as preset", elem_id="lora_train_preset_name")
                    save_btn = gr.Button("Save preset")
                upload = gr.File(label="Import kohya_ss .json / sd-scripts .toml", file_types=[".json", ".toml"],
                                 elem_id="lora_train_import_config")
        with gr.Column(scale=2, elem_id="lora_train_run_column"):  # the run: buttons, status, loss plot, previews
            with gr.Row():
                start_btn = gr.Button("Start training", variant="primary", elem_id="lora_train_start")
                pause_btn = gr.Button("Pause / Resume", elem_id="lora_train_pause")
                interrupt_btn = gr.Button("Interrupt", elem_id="lora_train_interrupt")
                poll_btn = gr.Button("Refresh", elem_id="lora_train_poll")
            status = gr.HTML("", elem_id="lora_train_status")
            plot = gr.HTML(loss_plot(None), elem_id="lora_train_loss_plot")
            samples = gr.Gallery(label="Previews (Samples settings)", columns=4, height=220,
                                 elem_id="lora_train_samples")
            files = gr.Textbox(label="Saved epochs and the Lora loader check (each file loaded back into the model)", lines=5, interactive=False,
                               elem_id="lora_train_files")
    queue_table = gr.Dataframe(headers=QUEUE_HEADERS, interactive=False, wrap=True,
                               label="Queue (runs go one after another; a failed run does not stop the rest)",
                               elem_id="lora_train_queue")

    names = list(widgets)

    def values_update(values: dict) -> dict:
        return {widgets[k]: v for k, v in values.items() if k in widgets}

    def on_project(project_name):
        project = ctx.project(project_name)
        values = service.saved_values(project)
        return {**values_update(values), steps_line: steps_html(*service.steps_line(project_name, values))}

    ctx.on_project_change(on_project, [*widgets.values(), steps_line], settings=True)

    steps_inputs = {"project_name": ctx.selector, **{k: widgets[k] for k in
                    ("max_train_epochs", "train_batch_size", "gradient_accumulation_steps", "validation_split")}}

    def do_steps(project_name, **values):
        return {steps_line: steps_html(*service.steps_line(project_name, values))}

    ctx.on_data_change(do_steps, steps_inputs, [steps_line])

    for key in ("max_train_epochs", "train_batch_size", "gradient_accumulation_steps", "validation_split"):
        on(widgets[key].change, do_steps, steps_inputs, [steps_line], error_output=steps_line, show_progress="hidden")

    def do_start(project_name, **values):
        job = service.start(project_name, values)
        ahead = [j for j in service.queue.jobs() if j is not job and j.status in ("queued", "running", "paused")]
        text = f"queued {job.id} for {job.project}" + (f" behind {len(ahead)} other run(s)" if ahead else "")
        if job.warnings:
            return {ctx.msg: message(text + "; note: " + "; ".join(job.warnings), "warn"), **poll()}
        return {ctx.msg: message(text, "ok"), **poll()}

    all_inputs = {"project_name": ctx.selector, **widgets}
    poll_outputs = [status, plot, samples, files, queue_table]
    on(start_btn.click, do_start, all_inputs, [ctx.msg, *poll_outputs], error_output=ctx.msg)

    def do_save_preset(preset_name, **values):
        name = check_name(preset_name, "preset name")
        if name == DEFAULTS_PRESET:
            raise BadInput(f"{DEFAULTS_PRESET} is the built-in preset: choose another name")
        from ..train.config_io import dump_toml
        from ..fsutil import atomic_write_text

        cfg = fields.build_config(values, {})
        atomic_write_text(ctx.host.presets_dir() / f"{name}.toml", dump_toml(cfg, only_changed=True))
        return {preset: gr.update(choices=preset_names(ctx.host.presets_dir()), value=name),
                ctx.msg: message(f"saved preset {name}", "ok")}

    on(save_btn.click, do_save_preset, {"preset_name": preset_name, **widgets}, [preset, ctx.msg], error_output=ctx.msg)

    def do_load_preset(preset):
        if not preset:
            raise BadInput("choose a preset")
        if preset == DEFAULTS_PRESET:
            return {**values_update(fields.defaults()), ctx.msg: message("every setting is back to its first-LoRA default", "ok")}
        from ..train.config_io import load_toml

        path = ctx.host.presets_dir() / f"{check_name(preset, 'preset name')}.toml"
        if not path.is_file():
            raise BadInput(f"preset {preset!r} does not exist")
        cfg = load_toml(path)
        return {**values_update(fields.from_config(cfg)), ctx.msg: message(f"loaded preset {preset}", "ok")}

    on(load_btn.click, do_load_preset, {"preset": preset}, [*widgets.values(), ctx.msg], error_output=ctx.msg)

    def do_import(upload):
        if upload is None:
            return {}
        path = getattr(upload, "name", upload)
        cfg, notes = import_settings(path)
        text = (f"imported {Path(path).name}; settings the file leaves out take sd-scripts' defaults"
                + (f" ({'; '.join(notes)})" if notes else ""))
        return {**values_update(fields.from_config(cfg)), ctx.msg: message(text, "ok")}

    on(upload.upload, do_import, {"upload": upload}, [*widgets.values(), ctx.msg], error_output=ctx.msg)

    def poll() -> dict:
        jobs = service.queue.jobs()
        current = service.queue.current() or (jobs[-1] if jobs else None)
        if current is None:
            text, kind = "no training yet", "info"
        else:
            text = current.summary()
            kind = {"failed": "error", "done": "ok", "interrupted": "warn"}.get(current.status, "info")
        return {status: message(text, kind), plot: loss_plot(current), samples: sample_items(current),
                files: files_text(current), queue_table: queue_rows(jobs)}

    # polled every 2 s by javascript/lora_train.js: no progress overlay over the outputs each time
    on(poll_btn.click, lambda: poll(), {}, poll_outputs, error_output=ctx.msg, show_progress="hidden")

    def do_interrupt():
        job = service.queue.interrupt()
        if job is None:
            raise BadInput("no training is running")
        return {ctx.msg: message(f"interrupting {job.id}; the epochs saved so far are kept", "warn"), **poll()}

    on(interrupt_btn.click, do_interrupt, {}, [ctx.msg, *poll_outputs], error_output=ctx.msg)

    def do_pause():
        job = service.queue.current()
        if job is None or job.status not in (RUNNING, PAUSED):
            raise BadInput("no training is running")
        if job.control.paused:
            job.control.unpause()
            text = f"resuming {job.id}"
        else:
            job.control.pause()
            text = f"pausing {job.id} at the next step: the model is free for generation until you resume"
        return {ctx.msg: message(text, "info"), **poll()}

    on(pause_btn.click, do_pause, {}, [ctx.msg, *poll_outputs], error_output=ctx.msg)
    ctx.train_widgets = widgets
    ctx.field_names = names
