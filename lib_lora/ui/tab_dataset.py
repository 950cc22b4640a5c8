"""Dataset sub-tab: import a folder, concept folders with their repeats, image check, duplicates, gallery."""

from __future__ import annotations

import re

import gradio as gr

from ..captions import caption_path, read_caption
from ..errors import BadInput
from . import projects
from .common import message, on


def concept_rows(project) -> list[list]:
    return [[c.folder.name, c.repeats, c.images] for c in project.concepts()] or [["", 0, 0]]


GALLERY_LIMIT = 200  # a gallery of thousands of full-size images would stall the browser


def gallery_label(project, limit: int = GALLERY_LIMIT) -> str:
    n = len(project.images())
    return f"Images and captions (the first {limit} of {n})" if n > limit else f"Images and captions ({n})"


def gallery_items(project, limit: int = GALLERY_LIMIT) -> list[tuple[str, str]]:
    items = []
    for image in project.images()[:limit]:
        cap = caption_path(image)
        items.append((str(image), read_caption(cap) if cap.is_file() else "(no caption)"))
    return items


# What to do about a finding with the tab's own buttons and fields; codes not here keep the report's neutral fix.
TAB_FIXES = {
    "missing_caption": "Tags > Tag images (mode skip), or click the image in Tags and write its caption; "
                       "without one the concept name is the caption",
    "empty_caption": "Tags > Tag images with mode skip, or write them in Tags",
    "activation_missing": "Tags > Apply activation tag puts it first in every caption",
    "activation_not_first": "Tags > Apply activation tag moves it first (Keep first N tags relies on that)",
    "interrupted_move": "Dataset > Move duplicates aside finishes it",
    "tokens_over_75": "shorten them, or set Processing > Caption tokens to 150 (or 225)",
    "tokens_over_150": "shorten them, or set Processing > Caption tokens to 225",
    "tokens_over_225": "shorten them: tokens past 225 are cut off even with Processing > Caption tokens 225",
    "too_small": "use larger originals; small images are upscaled and come out soft",
    "no_images": "Import a folder of images",
}
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")
SHOWN_PER_CHECK = 6


def check_report(project, settings: dict | None = None) -> str:
    """Markdown report: the image check (unreadable, too small, grayscale, missing or empty captions, activation tag
    missing, captions over 75 tokens, folder layout), one entry per kind of problem with its files and what to do
    in the tab, then what training would see (counts and buckets) with the project's saved Train settings
    (`settings`: TrainConfig values; resolution and buckets matter here)."""
    from ..dataset import Dataset, DatasetOptions
    from ..tagging.check import check_dataset

    if not project.images():
        raise BadInput(f"project {project.name!r} has no images yet: import a folder first")
    report = check_dataset(project.dataset, min_side=256, activation=project.meta.activation_tag or None)
    verdict = "nothing to fix" if not report.findings else f"{report.errors} error(s), {report.warnings} warning(s)"
    lines = [f"**{report.images} images** in {len(report.concepts)} concept folder(s): {verdict}", ""]
    for severity, title, fix, found in report.groups(TAB_FIXES):
        shown = [f"`{f.path}`" + (f" {_OBJECT_REPR.sub('', f.detail).strip()}" if f.detail else "")
                 for f in found[:SHOWN_PER_CHECK]]
        more = f", and {len(found) - SHOWN_PER_CHECK} more" if len(found) > SHOWN_PER_CHECK else ""
        lines.append(f"- **{severity}** {title} ({len(found)}): " + "; ".join(shown) + more
                     + (f"  \n  _what to do:_ {fix}" if fix else ""))
    settings = dict(settings or {"resolution": "512", "enable_bucket": True})
    settings["train_data_dir"] = str(project.dataset)
    buckets = "with aspect-ratio buckets" if settings.get("enable_bucket") else "without buckets"
    try:
        dataset = Dataset.build(DatasetOptions.from_config(settings))
        lines += ["", f"What training will use (resolution {settings.get('resolution')}, {buckets}; "
                      "from the Train settings last used):"]
        lines += [f"- {line}" for line in dataset.summary_lines()]
    except BadInput as exc:
        lines += ["", f"- **error** training cannot use this dataset: {exc}"]
    return "\n".join(lines)


def duplicates_report(project, result=None) -> str:
    from ..tagging.dedupe import find_duplicates

    result = result or find_duplicates(project.dataset)
    if not result.groups:
        return f"No near-duplicates among {result.scanned} images."
    lines = [f"{len(result.groups)} group(s) of near-duplicates among {result.scanned} images (the first of each "
             "group is kept; Move duplicates aside puts the others, with their captions, in dataset/_duplicates/, "
             "where training does not look):"]
    for group in result.groups:
        lines.append("- " + ", ".join(f"`{p.relative_to(project.dataset)}`" for p in group.members))
    return "\n".join(lines)


def move_duplicates(project) -> str:
    """Move every duplicate but the kept one of each group (with its caption) into dataset/_duplicates/."""
    from ..tagging.dedupe import find_duplicates, finish_interrupted_moves, move_duplicates as move

    finished = finish_interrupted_moves(project.dataset)
    result = find_duplicates(project.dataset)
    moves = move(project.dataset, result.groups) if result.groups else []
    images = sum(1 for m in moves if not m.copy and m.source.suffix.lower() != ".txt")
    if not moves and not finished:
        return f"no near-duplicates among {result.scanned} images: nothing moved"
    return (f"moved {images} duplicate image(s) with their captions to {project.dataset / '_duplicates'}"
            + (f" (and finished an interrupted move of {finished} file(s))" if finished else ""))


def build(ctx) -> None:
    """Widgets of the Dataset sub-tab; `ctx` is the Tab holding the shared project selector and message line."""
    with gr.Row():
        source = gr.Textbox(label="Folder to import (images and same-named .txt captions are copied into the "
                            "concept folder below, else the first one; nothing is overwritten)", scale=4,
                            elem_id="lora_train_import_source")
        import_btn = gr.Button("Import", elem_id="lora_train_import")
    with gr.Row():
        concepts = gr.Dataframe(headers=["concept folder", "repeats", "images"], datatype=["str", "number", "number"],
                                label="Concept folders (repeats = the number in the folder name)", interactive=False,
                                elem_id="lora_train_concepts")
        with gr.Column():
            concept = gr.Textbox(label="Concept folder (click one in the table; for Import: the folder images go to, "
                                 "a new N_name makes a new concept)", elem_id="lora_train_concept_folder")
            repeats = gr.Number(label="Repeats", value=10, precision=0, elem_id="lora_train_repeats")
            repeats_btn = gr.Button("Set repeats")
    with gr.Row():
        check_btn = gr.Button("Check images", elem_id="lora_train_check")
        dupes_btn = gr.Button("Find duplicates", elem_id="lora_train_dupes")
        move_btn = gr.Button("Move duplicates aside", elem_id="lora_train_dupes_move")
    report = gr.Markdown(elem_id="lora_train_report")
    gallery = gr.Gallery(label="Images and captions", columns=6, height=360,
                         elem_id="lora_train_dataset_gallery")

    def refresh(project_name):
        project = ctx.project(project_name)
        return {concepts: concept_rows(project),
                gallery: gr.update(value=gallery_items(project), label=gallery_label(project))}

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

    def fill_concept(project_name, evt: gr.SelectData):
        """A click in the concept table fills the concept folder and its repeats."""
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        try:
            found = ctx.project(project_name).concepts()
        except BadInput as exc:
            return {ctx.msg: message(str(exc), "error")}
        if not isinstance(row, int) or not 0 <= row < len(found):
            return {}
        return {concept_box: found[row].folder.name, repeats: found[row].repeats}

    concepts.select(fill_concept, inputs=[ctx.selector], outputs=[concept, repeats, ctx.msg])

    def first_concept(project_name):
        """Another project: its first concept folder and repeats in the boxes (not the previous project's)."""
        found = ctx.project(project_name).concepts()
        return {concept_box: found[0].folder.name if found else "", repeats: found[0].repeats if found else 10}

    ctx.on_project_change(first_concept, [concept, repeats], settings=True)
    renamed = on(repeats_btn.click, do_repeats, {"project_name": ctx.selector, "concept": concept, "repeats": repeats},
       [concepts, gallery, concept, ctx.msg], error_output=ctx.msg)
    ctx.refresh_after(renamed)
    def do_check(project_name):
        project = ctx.project(project_name)
        from . import fields

        try:
            settings = fields.to_config_values(ctx.service.saved_values(project))
        except BadInput:
            settings = None  # a hand-edited project.toml the tab cannot read: the check still runs
        return {report: check_report(project, settings)}

    on(check_btn.click, do_check, {"project_name": ctx.selector}, [report], error_output=ctx.msg)
    on(dupes_btn.click, lambda project_name: {report: duplicates_report(ctx.project(project_name))},
       {"project_name": ctx.selector}, [report], error_output=ctx.msg)

    def do_move(project_name):
        project = ctx.project(project_name)
        text = move_duplicates(project)
        return {**refresh(project_name), report: "", ctx.msg: message(text, "ok")}

    moved = on(move_btn.click, do_move, {"project_name": ctx.selector}, [concepts, gallery, report, ctx.msg],
               error_output=ctx.msg)
    ctx.refresh_after(moved)
