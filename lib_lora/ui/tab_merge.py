"""Merge sub-tab: a checkpoint plus LoRAs with weights -> a new checkpoint the host lists at once."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..errors import BadInput
from ..fsutil import check_name
from .common import message, on
from .host import MergeRequest
from .tab_test import parse_weights


def lora_choices(files: list[Path]) -> dict[str, Path]:
    """{what the dropdown shows: file}: the path below the common Lora folder (`mychar/mychar-03.safetensors`),
    not an absolute path that does not fit the box."""
    if not files:
        return {}
    import os

    base = Path(os.path.commonpath([str(p.parent) for p in files]))
    return {p.relative_to(base).as_posix(): p for p in files}


def build(ctx) -> None:
    host = ctx.host
    with gr.Row():
        checkpoint = gr.Dropdown(label="Checkpoint", choices=[], elem_id="lora_train_merge_checkpoint")
        refresh_btn = gr.Button("Refresh lists", elem_id="lora_train_merge_refresh")
    loras = gr.Dropdown(label="LoRA files (from the Lora folder)", choices=[], multiselect=True,
                        elem_id="lora_train_merge_loras")
    weights = gr.Textbox(label="Weights, one per LoRA in the order chosen (comma separated; one weight = all)",
                         value="1", elem_id="lora_train_merge_weights")
    with gr.Row():
        name = gr.Textbox(label="New checkpoint name (without extension)", elem_id="lora_train_merge_name")
        precision = gr.Dropdown(["fp16", "bf16", "fp32"], value="fp16", label="Save precision")
    merge_btn = gr.Button("Merge", variant="primary", elem_id="lora_train_merge_run")
    result = gr.HTML(elem_id="lora_train_merge_result")

    def lists():
        return {checkpoint: gr.update(choices=host.checkpoints()),
                loras: gr.update(choices=list(lora_choices(host.lora_files())))}

    on(refresh_btn.click, lists, {}, [checkpoint, loras], error_output=ctx.msg)
    ctx.on_project_change(lambda project_name: lists(), [checkpoint, loras], needs_project=False)

    def do_merge(checkpoint, loras, weights, name, precision):
        if not checkpoint:
            raise BadInput("choose a checkpoint")
        if not loras:
            raise BadInput("choose at least one LoRA file")
        w = parse_weights(weights) or (1.0,)
        if len(w) == 1:
            w = w * len(loras)
        if len(w) != len(loras):
            raise BadInput(f"{len(loras)} LoRA files but {len(w)} weights")
        known = lora_choices(host.lora_files())
        missing = [f for f in loras if f not in known]
        if missing:
            raise BadInput(f"{missing[0]} is not in the Lora folder any more: press Refresh lists")
        request = MergeRequest(checkpoint, tuple((str(known[f]), x) for f, x in zip(loras, w)),
                               check_name(name, "checkpoint name"), precision)
        ctx.service.check_idle_for("the merge")
        path = host.merge(request)
        return {result: message(f"saved {path}; it is in the checkpoint list now", "ok"), **lists()}

    on(merge_btn.click, do_merge, {"checkpoint": checkpoint, "loras": loras, "weights": weights, "name": name,
       "precision": precision}, [result, checkpoint, loras, ctx.msg], error_output=result)
