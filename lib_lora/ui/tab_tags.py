"""Tags sub-tab: taggers, tag frequency, activation tag, prune / replace, per-image captions, undo."""

from __future__ import annotations

import gradio as gr

from ..captions import caption_path, read_caption
from ..errors import BadInput
from . import tagops
from .common import message, on


def load_tagger(kind: str, threshold: float):
    """WD14 (onnxruntime) or BLIP (torch); the model files are found or fetched by lib_lora.tagging.models."""
    from ..tagging import models

    if kind.lower() == "wd14":
        from ..tagging.wd14 import Wd14Tagger

        return Wd14Tagger(models.locate_wd14(models.DEFAULT_WD14_REPO, None, None), float(threshold))
    if kind.lower() == "blip":
        from ..tagging.blip import BlipCaptioner

        return BlipCaptioner(models.locate_blip(models.DEFAULT_BLIP_REPO, None, None))
    raise BadInput(f"unknown tagger {kind!r}: choose WD14 or BLIP")


def run_tagger(project, kind: str, threshold: float, mode: str, host=None, progress=None) -> str:
    """Tag every image of the project in one undoable batch; the tagger is freed afterwards."""
    import contextlib
    import gc

    from ..tagging.runner import MODES, tag_folder

    if mode not in MODES:
        raise BadInput(f"mode must be one of {', '.join(MODES)}")
    if not project.images():
        raise BadInput("no images to tag: import a folder first")
    exclusive = host.exclusive(f"LoRA Train tagging {project.name}") if host is not None and hasattr(host, "exclusive") \
        else contextlib.nullcontext()
    with exclusive:
        tagger = load_tagger(kind, threshold)
        try:
            result = tag_folder(project.dataset, tagger, mode=mode, recursive=True, progress=progress)
        finally:
            del tagger
            gc.collect()
            with contextlib.suppress(Exception):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    text = f"tagged {len(result.tagged)} of {result.images} images, {len(result.written)} captions changed"
    if result.failed:
        text += f", {len(result.failed)} unreadable (first: {result.failed[0][0].name}: {result.failed[0][1]})"
    if result.interrupted:
        text += " (interrupted)"
    return text


def build(ctx) -> None:
    with gr.Row():
        tagger = gr.Dropdown(["WD14", "BLIP"], value="WD14", label="Tagger", elem_id="lora_train_tagger")
        threshold = gr.Slider(0.05, 0.95, value=0.35, step=0.05, label="Threshold (WD14)")
        mode = gr.Radio(["append", "prepend", "overwrite", "skip"], value="append",
                        label="Existing captions (skip = leave captioned images alone)")
        tag_btn = gr.Button("Tag images", elem_id="lora_train_tag_run")
    with gr.Row():
        with gr.Column(scale=1):
            freq = gr.Dataframe(headers=["tag", "images"], datatype=["str", "number"], interactive=False,
                                label="Tag frequency", elem_id="lora_train_tag_freq")
        with gr.Column(scale=1):
            activation = gr.Textbox(label="Activation tag (put first in every caption; becomes the LoRA's trigger)",
                                    elem_id="lora_train_activation")
            activation_btn = gr.Button("Apply activation tag")
            prune = gr.Textbox(label="Remove tags (comma separated)", elem_id="lora_train_prune")
            prune_btn = gr.Button("Remove")
            with gr.Row():
                old = gr.Textbox(label="Replace tag", elem_id="lora_train_replace_old")
                new = gr.Textbox(label="with (empty = remove)", elem_id="lora_train_replace_new")
            replace_btn = gr.Button("Replace")
            with gr.Row():
                undo_btn = gr.Button("Undo last edit", elem_id="lora_train_undo")
                hist = gr.Textbox(label="Edit history (newest first)", lines=3, interactive=False)
    gr.Markdown("Per-image captions: click an image, edit, then Save (Ctrl+S). Alt+Left / Alt+Right move between images.")
    with gr.Row(elem_id="lora_train_caption_editor"):
        thumbs = gr.Gallery(label="Images", columns=5, height=360, elem_id="lora_train_tag_gallery")
        with gr.Column():
            current = gr.Image(label="Image", type="filepath", interactive=False, height=256)
            image_path = gr.Textbox(label="File", interactive=False, elem_id="lora_train_caption_file")
            caption = gr.Textbox(label="Caption", lines=4, elem_id="lora_train_caption")
            save_btn = gr.Button("Save caption", elem_id="lora_train_caption_save")
            index = gr.Number(value=-1, visible=False, precision=0, elem_id="lora_train_caption_index")

    def refresh(project_name):
        project = ctx.project(project_name)
        images = project.images()
        return {
            freq: [list(r) for r in tagops.frequency(images)] or [["", 0]],
            activation: project.meta.activation_tag,
            hist: "\n".join(tagops.history(project.dataset)),
            thumbs: [str(p) for p in images],
        }

    ctx.on_project_change(refresh, [freq, activation, hist, thumbs])

    def do_tag(project_name, tagger, threshold, mode, progress=None):
        project = ctx.project(project_name)
        report = (lambda done, total: progress((done, total), desc="tagging")) if progress is not None else None
        result = run_tagger(project, tagger, threshold, mode, ctx.host, report)
        return {**refresh(project_name), ctx.msg: message(result, "ok")}

    tagged = on(tag_btn.click, do_tag, {"project_name": ctx.selector, "tagger": tagger, "threshold": threshold, "mode": mode},
       [freq, activation, hist, thumbs, ctx.msg], error_output=ctx.msg, progress=True)
    ctx.refresh_after(tagged)

    def batch(project_name, planner, label, **kw):
        project = ctx.project(project_name)
        images = project.images()
        if not images:
            raise BadInput("no images in this project yet")
        edits = planner(tagops.captions_of(images), **kw)
        n = tagops.apply(project.dataset, edits, label)
        return project, {**refresh(project_name), ctx.msg: message(f"{label}: {n} captions changed", "ok")}

    def do_activation(project_name, activation):
        project, out = batch(project_name, tagops.plan_activation, f"activation tag {activation.strip()}", tag=activation)
        project.meta.activation_tag = activation.strip()
        project.save_meta()
        return out

    outs = [freq, activation, hist, thumbs, ctx.msg]
    on(activation_btn.click, do_activation, {"project_name": ctx.selector, "activation": activation}, outs, error_output=ctx.msg)
    on(prune_btn.click, lambda project_name, prune: batch(project_name, tagops.plan_prune, f"remove {prune}", drop=prune.split(","))[1],
       {"project_name": ctx.selector, "prune": prune}, outs, error_output=ctx.msg)
    on(replace_btn.click, lambda project_name, old, new: batch(project_name, tagops.plan_replace, f"replace {old} -> {new}", old=old, new=new)[1],
       {"project_name": ctx.selector, "old": old, "new": new}, outs, error_output=ctx.msg)

    def do_undo(project_name):
        project = ctx.project(project_name)
        text = tagops.undo(project.dataset)
        return {**refresh(project_name), ctx.msg: message(text, "ok")}

    on(undo_btn.click, do_undo, {"project_name": ctx.selector}, outs, error_output=ctx.msg)

    def select(project_name, evt: gr.SelectData):
        project = ctx.project(project_name)
        images = project.images()
        if not 0 <= evt.index < len(images):
            raise BadInput("that image is no longer in the dataset")
        image = images[evt.index]
        cap = caption_path(image)
        return {current: str(image), image_path: str(image.relative_to(project.dataset)),
                caption: read_caption(cap) if cap.is_file() else "", index: evt.index}

    def select_handler(project_name, evt: gr.SelectData):
        try:
            return select(project_name, evt)
        except BadInput as exc:
            return {ctx.msg: message(str(exc), "error")}

    thumbs.select(select_handler, inputs=[ctx.selector], outputs=[current, image_path, caption, index, ctx.msg])

    def do_save(project_name, image_path, caption):
        project = ctx.project(project_name)
        if not image_path:
            raise BadInput("click an image first")
        from .projects import project_image

        image = project_image(project, image_path)
        changed = tagops.save_caption(project.dataset, image, caption)
        return {**refresh(project_name), ctx.msg: message(f"saved {image.name}" if changed else "no change", "ok")}

    on(save_btn.click, do_save, {"project_name": ctx.selector, "image_path": image_path, "caption": caption},
       outs, error_output=ctx.msg)
