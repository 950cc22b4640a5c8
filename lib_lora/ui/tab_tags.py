"""Tags sub-tab: taggers, tag frequency, activation tag, prune / replace, per-image captions, undo."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..captions import caption_path, read_caption
from ..errors import BadInput
from . import tagops
from .common import message, on


def locate_tagger_model(kind: str, model_dir: str = "", models_folder=None) -> Path:
    """The tagger's model folder: `model_dir` when given (a model downloaded before), else the host's models
    folder, downloaded there once. Runs before the queue lock is taken, so a download or a bad folder does not
    hold up generations, and a bad folder is reported at once, not after the running generation."""
    from ..tagging import models

    model_dir = str(model_dir or "").strip() or None
    kind = str(kind).lower()
    if kind not in ("wd14", "blip"):
        raise BadInput(f"unknown tagger {kind!r}: choose WD14 or BLIP")
    repo = models.DEFAULT_WD14_REPO if kind == "wd14" else models.DEFAULT_BLIP_REPO
    locate = models.locate_wd14 if kind == "wd14" else models.locate_blip
    try:
        return Path(locate(repo, model_dir, models_folder))
    except BadInput as exc:
        if model_dir or "cannot download" not in str(exc):
            raise
        target = models.repo_folder(models_folder or models.default_models_folder(), repo)
        raise BadInput(f"the {kind.upper()} model ({repo}) is not downloaded yet and cannot be downloaded now: "
                       f"put its files in {target} or enter a folder holding them under 'Model folder' "
                       f"({str(exc).split(' (')[0]})") from None


def load_tagger(kind: str, threshold: float, folder: Path):
    """WD14 (onnxruntime) or BLIP (torch) from its model folder."""
    if str(kind).lower() == "wd14":
        from ..tagging.wd14 import Wd14Tagger

        return Wd14Tagger(folder, float(threshold))
    from ..tagging.blip import BlipCaptioner

    return BlipCaptioner(folder)


def run_tagger(project, kind: str, threshold: float, mode: str, host=None, progress=None, model_dir: str = "") -> str:
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
    folder_of = getattr(host, "tagger_models_folder", None)
    folder = locate_tagger_model(kind, model_dir, folder_of() if callable(folder_of) else None)
    with exclusive:
        tagger = load_tagger(kind, threshold, folder)
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
        text += ", " + not_tagged(result.failed)
    if result.interrupted:
        text += " (interrupted)"
    return text


def not_tagged(failed: list[tuple[Path, str]]) -> str:
    """'3 images not tagged: 2 share a caption file (a.jpg and a.png share a.txt: rename one), 1 could not be read
    (b.png)'. The tagger's `failed` list holds both kinds; images that share a caption file are whole groups of
    one folder with the same caption path, which is how they are told apart here."""
    groups: dict[str, list[Path]] = {}
    for path, _ in failed:
        groups.setdefault(str(caption_path(path)).casefold(), []).append(path)
    shared = [sorted(g, key=lambda p: p.name) for g in groups.values() if len(g) > 1]
    in_shared = {p for g in shared for p in g}
    unreadable = [p for p, _ in failed if p not in in_shared]
    parts = []
    if shared:
        pairs = "; ".join(f"{' and '.join(p.name for p in g)} share {caption_path(g[0]).name}" for g in shared[:3])
        more = f"; {len(shared) - 3} more groups" if len(shared) > 3 else ""
        parts.append(f"{len(in_shared)} share a caption file ({pairs}{more}: rename one)")
    if unreadable:
        names = ", ".join(p.name for p in unreadable[:3]) + (f" and {len(unreadable) - 3} more"
                                                             if len(unreadable) > 3 else "")
        parts.append(f"{len(unreadable)} could not be read ({names})")
    return f"{len(failed)} image{'s' if len(failed) != 1 else ''} not tagged: " + ", ".join(parts)


def build(ctx) -> None:
    with gr.Row():
        tagger = gr.Dropdown(["WD14", "BLIP"], value="WD14", label="Tagger", elem_id="lora_train_tagger")
        threshold = gr.Slider(0.05, 0.95, value=0.35, step=0.05, label="Threshold (WD14)")
        mode = gr.Radio(["append", "prepend", "overwrite", "skip"], value="append",
                        label="Existing captions (skip = leave captioned images alone)")
    with gr.Row():
        model_dir = gr.Textbox(label="Model folder (optional: a tagger model downloaded before; empty = download "
                               "once into the models folder)", scale=4, elem_id="lora_train_tagger_model_dir")
        tag_btn = gr.Button("Tag images", elem_id="lora_train_tag_run", scale=1)
    with gr.Row():
        with gr.Column(scale=1):
            freq = gr.Dataframe(headers=["tag", "images"], datatype=["str", "number"], interactive=False,
                                label="Tag frequency (click a tag to add it to the tags to edit)",
                                elem_id="lora_train_tag_freq")
        with gr.Column(scale=1):
            activation = gr.Textbox(label="Activation tag (put first in every caption; becomes the LoRA's trigger)",
                                    elem_id="lora_train_activation")
            activation_btn = gr.Button("Apply activation tag", elem_id="lora_train_activation_apply")
            chosen = gr.Textbox(label="Tags to edit (comma separated)", elem_id="lora_train_edit_tags")
            with gr.Row():
                prune_btn = gr.Button("Remove them", elem_id="lora_train_prune")
            with gr.Row():
                new = gr.Textbox(label="Replace them with (one tag; several tags are merged into it)", scale=3,
                                 elem_id="lora_train_replace_new")
                replace_btn = gr.Button("Replace", scale=1, elem_id="lora_train_replace")
            with gr.Row():
                undo_btn = gr.Button("Undo last edit", elem_id="lora_train_undo")
                # shown only when Undo was refused because captions changed after the edit
                undo_force_btn = gr.Button("Undo anyway", variant="stop", visible=False,
                                           elem_id="lora_train_undo_force")
                refused_edit = gr.Textbox(visible=False, elem_id="lora_train_undo_refused")
                hist = gr.Textbox(label="Edit history (newest first)", lines=3, interactive=False,
                                  elem_id="lora_train_tag_history")
    gr.Markdown("Per-image captions: click an image and edit its caption; it is saved when you leave the box (or "
                "with Save / Ctrl+S). Alt+Left / Alt+Right move between images. Every edit can be undone.")
    with gr.Row(elem_id="lora_train_caption_editor"):
        thumbs = gr.Gallery(label="Images", columns=5, height=360, elem_id="lora_train_tag_gallery")
        with gr.Column():
            current = gr.Image(label="Image", type="filepath", interactive=False, height=256)
            image_path = gr.Textbox(label="File", interactive=False, elem_id="lora_train_caption_file")
            caption = gr.Textbox(label="Caption", lines=4, elem_id="lora_train_caption")
            save_btn = gr.Button("Save caption", elem_id="lora_train_caption_save")
            index = gr.Number(value=-1, visible=False, precision=0, elem_id="lora_train_caption_index")

    def texts(project_name, image_path=""):
        """What an edit of the captions changes: the table, the history and the open caption (re-read, so a
        Save after an Undo or a batch edit does not write back the old text)."""
        project = ctx.project(project_name)
        out = {
            freq: [list(r) for r in tagops.frequency(project.images())] or [["", 0]],
            activation: project.meta.activation_tag,
            hist: "\n".join(tagops.history(project.dataset)),
        }
        if image_path:
            cap = caption_path(project.dataset / image_path)
            out[caption] = read_caption(cap) if cap.is_file() else ""
        return out

    def refresh(project_name):
        project = ctx.project(project_name)
        return {**texts(project_name), thumbs: [str(p) for p in project.images()]}

    ctx.on_project_change(refresh, [freq, activation, hist, thumbs])
    # another project: its images, nothing of the previous project's open caption
    ctx.on_project_change(lambda project_name: {current: None, image_path: "", caption: "", index: -1},
                          [current, image_path, caption, index], settings=True)
    text_outs = [freq, activation, hist, caption, ctx.msg]

    def do_tag(project_name, tagger, threshold, mode, model_dir, image_path, progress=None):
        project = ctx.project(project_name)
        ctx.service.check_idle_for("tagging")
        report = (lambda done, total: progress((done, total), desc="tagging")) if progress is not None else None
        result = run_tagger(project, tagger, threshold, mode, ctx.host, report, model_dir)
        return {**texts(project_name, image_path), ctx.msg: message(result, "ok")}

    tagged = on(tag_btn.click, do_tag, {"project_name": ctx.selector, "tagger": tagger, "threshold": threshold,
                "mode": mode, "model_dir": model_dir, "image_path": image_path}, text_outs, error_output=ctx.msg,
                progress=True)
    ctx.refresh_after(tagged)

    def batch(project_name, image_path, planner, label, **kw):
        project = ctx.project(project_name)
        images = project.images()
        if not images:
            raise BadInput("no images in this project yet")
        edits = planner(tagops.captions_of(images), **kw)
        n = tagops.apply(project.dataset, edits, label)
        return project, {**texts(project_name, image_path), ctx.msg: message(f"{label}: {n} captions changed", "ok")}

    def do_activation(project_name, image_path, activation):
        project, out = batch(project_name, image_path, tagops.plan_activation, f"activation tag {activation.strip()}",
                             tag=activation)
        project.meta.activation_tag = activation.strip()
        project.save_meta()
        return out

    def do_prune(project_name, image_path, chosen):
        return batch(project_name, image_path, tagops.plan_prune, f"remove {chosen.strip()}", drop=[chosen])[1]

    def do_replace(project_name, image_path, chosen, new):
        if not new.strip():
            raise BadInput("enter the tag to replace them with (Remove them deletes them)")
        return batch(project_name, image_path, tagops.plan_replace, f"replace {chosen.strip()} -> {new.strip()}",
                     old=chosen, new=new)[1]

    base = {"project_name": ctx.selector, "image_path": image_path}
    on(activation_btn.click, do_activation, {**base, "activation": activation}, text_outs, error_output=ctx.msg)
    on(prune_btn.click, do_prune, {**base, "chosen": chosen}, text_outs, error_output=ctx.msg)
    on(replace_btn.click, do_replace, {**base, "chosen": chosen, "new": new}, text_outs, error_output=ctx.msg)

    undo_outs = [*text_outs, undo_force_btn, refused_edit]
    hidden = {undo_force_btn: gr.update(visible=False), refused_edit: ""}

    def do_undo(project_name, image_path):
        project = ctx.project(project_name)
        try:
            text = tagops.undo(project.dataset)
        except tagops.UndoNeedsConsent as exc:
            return {ctx.msg: message(str(exc), "error"), undo_force_btn: gr.update(visible=True),
                    refused_edit: exc.entry}
        return {**texts(project_name, image_path), ctx.msg: message(text, "ok"), **hidden}

    def do_undo_anyway(project_name, image_path, refused_edit):
        project = ctx.project(project_name)
        text = tagops.undo(project.dataset, force=True, only=refused_edit or None)
        return {**texts(project_name, image_path), ctx.msg: message(text + ", later changes discarded", "ok"),
                **hidden}

    on(undo_btn.click, do_undo, base, undo_outs, error_output=ctx.msg)
    forced = on(undo_force_btn.click, do_undo_anyway, {**base, "refused_edit": refused_edit}, undo_outs,
                error_output=ctx.msg)
    # whatever it answered, the offer was for one refusal: gone afterwards (a refusal of its own shows Undo again)
    forced.then(lambda: hidden, None, [undo_force_btn, refused_edit])
    ctx.on_project_change(lambda project_name: hidden, [undo_force_btn, refused_edit], settings=True)

    def pick_tag(chosen, evt: gr.SelectData):
        """A click on a tag in the table adds it to the tags to edit (once); a click on a count does nothing."""
        if not isinstance(evt.value, str) or not evt.value.strip():
            return gr.update()
        tags = [t.strip() for t in (chosen or "").split(",") if t.strip()]
        if evt.value.strip() not in tags:
            tags.append(evt.value.strip())
        return ", ".join(tags)

    freq.select(pick_tag, inputs=[chosen], outputs=[chosen])

    def select(project_name, evt: gr.SelectData):
        project = ctx.project(project_name)
        images = project.images()
        if not 0 <= evt.index < len(images):
            raise BadInput("that image is no longer in the dataset: choose the project again to reload the list")
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
        # a click on Save first leaves the caption box, which saved the edit already (do_keep)
        text = f"saved {image.name}" if changed else f"{image.name}: caption already saved"
        return {**texts(project_name, image_path), ctx.msg: message(text, "ok")}

    on(save_btn.click, do_save, {"project_name": ctx.selector, "image_path": image_path, "caption": caption},
       text_outs, error_output=ctx.msg)

    def do_keep(project_name, image_path, caption):
        """Leaving the caption box (another image, Alt+Right, another sub-tab) saves a changed caption, so an edit
        is never lost for want of a Save. The open caption is not an output: this answer may arrive after the
        next image was opened, and must not put this image's text into that image's box."""
        if not project_name or not image_path:
            return {}
        from .projects import project_image

        project = ctx.project(project_name)
        image = project_image(project, image_path)
        cap = caption_path(image)
        if (read_caption(cap) if cap.is_file() else "").strip() == (caption or "").strip():
            return {}
        if not tagops.save_caption(project.dataset, image, caption or ""):
            return {}
        return {**texts(project_name), ctx.msg: message(f"saved {image.name}", "ok")}

    on(caption.blur, do_keep, {"project_name": ctx.selector, "image_path": image_path, "caption": caption},
       [freq, activation, hist, ctx.msg], error_output=ctx.msg, show_progress="hidden")
