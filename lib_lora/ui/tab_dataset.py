"""Dataset sub-tab: import a folder, concept folders with their repeats, image check, duplicates, gallery."""

from __future__ import annotations

import gradio as gr

from ..captions import caption_path, read_caption
from ..errors import BadInput
from . import projects
from .common import message, on


def concept_rows(project) -> list[list]:
    return [[c.folder.name, c.repeats, c.images] for c in project.concepts()] or [["", 0, 0]]


def gallery_items(project, limit: int = 200) -> list[tuple[str, str]]:
    items = []
    for image in project.images()[:limit]:
        cap = caption_path(image)
        items.append((str(image), read_caption(cap) if cap.is_file() else "(no caption)"))
    return items


def check_report(project, resolution: str = "512") -> str:
    """Markdown report: the image check (unreadable, too small, grayscale, missing or empty captions, activation tag
    missing, captions over 75 tokens, folder layout), then what training would see (counts and buckets)."""
    from ..dataset import Dataset, DatasetOptions
    from ..tagging.check import CHECKS, check_dataset

    if not project.images():
        raise BadInput(f"project {project.name!r} has no images yet: import a folder first")
    report = check_dataset(project.dataset, min_side=256, activation=project.meta.activation_tag or None)
    lines = [f"**{report.images} images** in {len(report.concepts)} concept folder(s): "
             f"{report.errors} error(s), {report.warnings} warning(s)", ""]
    for f in report.findings:
        severity, title, fix = CHECKS[f.code]
        lines.append(f"- **{severity}** {title}: `{f.path}` {f.detail}" + (f" ({fix})" if fix else ""))
    try:
        dataset = Dataset.build(DatasetOptions.from_config(
            {"train_data_dir": str(project.dataset), "resolution": resolution, "enable_bucket": True}))
        lines += ["", "What training will use:"] + [f"- {line}" for line in dataset.summary_lines()]
    except BadInput as exc:
        lines += ["", f"- **error** training cannot use this dataset: {exc}"]
    return "\n".join(lines)


def duplicates_report(project) -> str:
    from ..tagging.dedupe import find_duplicates

    result = find_duplicates(project.dataset)
    if not result.groups:
        return f"No near-duplicates among {result.scanned} images."
    lines = [f"{len(result.groups)} group(s) of near-duplicates among {result.scanned} images (first = kept):"]
    for group in result.groups:
        lines.append("- " + ", ".join(str(p.relative_to(project.dataset)) for p in group.members))
    return "\n".join(lines)


def build(ctx) -> None:
    """Widgets of the Dataset sub-tab; `ctx` is the Tab holding the shared project selector and message line."""
    with gr.Row():
        source = gr.Textbox(label="Folder to import (images and same-named .txt captions are copied)", scale=4,
                            elem_id="lora_train_import_source")
        import_btn = gr.Button("Import", elem_id="lora_train_import")
    with gr.Row():
        concepts = gr.Dataframe(headers=["concept folder", "repeats", "images"], datatype=["str", "number", "number"],
                                label="Concept folders (repeats = the number in the folder name)", interactive=False,
                                elem_id="lora_train_concepts")
        with gr.Column():
            concept = gr.Textbox(label="Concept folder", elem_id="lora_train_concept_folder")
            repeats = gr.Number(label="Repeats", value=10, precision=0, elem_id="lora_train_repeats")
            repeats_btn = gr.Button("Set repeats")
    with gr.Row():
        check_btn = gr.Button("Check images", elem_id="lora_train_check")
        dupes_btn = gr.Button("Find duplicates", elem_id="lora_train_dupes")
    report = gr.Markdown(elem_id="lora_train_report")
    gallery = gr.Gallery(label="Images and captions", columns=6, height=360, elem_id="lora_train_dataset_gallery")

    def refresh(project_name):
        project = ctx.project(project_name)
        return {concepts: concept_rows(project), gallery: gallery_items(project)}

    ctx.on_project_change(refresh, [concepts, gallery])

    def do_import(project_name, source, concept):
        project = ctx.project(project_name)
        n = projects.import_folder(project, source, concept or None)
        return {**refresh(project_name), ctx.msg: message(f"imported {n} images into {project.name}", "ok")}

    imported = on(import_btn.click, do_import, {"project_name": ctx.selector, "source": source, "concept": concept},
       [concepts, gallery, ctx.msg], error_output=ctx.msg)
    ctx.refresh_after(imported)

    def do_repeats(project_name, concept, repeats):
        project = ctx.project(project_name)
        target = projects.set_repeats(project, concept, repeats)
        return {**refresh(project_name), concept_box: target.name, ctx.msg: message(f"renamed to {target.name}", "ok")}

    concept_box = concept
    renamed = on(repeats_btn.click, do_repeats, {"project_name": ctx.selector, "concept": concept, "repeats": repeats},
       [concepts, gallery, concept, ctx.msg], error_output=ctx.msg)
    ctx.refresh_after(renamed)
    on(check_btn.click, lambda project_name: {report: check_report(ctx.project(project_name))},
       {"project_name": ctx.selector}, [report], error_output=ctx.msg)
    on(dupes_btn.click, lambda project_name: {report: duplicates_report(ctx.project(project_name))},
       {"project_name": ctx.selector}, [report], error_output=ctx.msg)
