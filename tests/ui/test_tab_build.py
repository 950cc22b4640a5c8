"""The tab builds under gradio 3.41.2 (run in both stacks), with the elements the browser tests and the
javascript rely on."""

from __future__ import annotations

import gradio as gr

from lib_lora.ui.tab import build_tab

ELEM_IDS = (
    "lora_train_project", "lora_train_create", "lora_train_new_name", "lora_train_msg", "lora_train_import_source",
    "lora_train_caption", "lora_train_caption_save", "lora_train_tag_gallery", "lora_train_start",
    "lora_train_interrupt", "lora_train_pause", "lora_train_poll", "lora_train_loss_plot", "lora_train_steps_line",
    "lora_train_max_train_epochs", "lora_train_train_batch_size", "lora_train_gradient_accumulation_steps",
    "lora_train_network_dim", "lora_train_test_run", "lora_train_merge_run", "lora_train_queue",
    "lora_train_samples", "lora_train_dupes_move", "lora_train_edit_tags", "lora_train_tagger_model_dir",
    "lora_train_undo_force",
)


def test_gradio_is_the_webui_pin():
    assert gr.__version__ == "3.41.2"


def test_tab_builds_with_every_named_element(host):
    blocks = build_tab(host)
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    missing = [i for i in ELEM_IDS if i not in ids]
    assert not missing
    # every Train field has a widget named after its config field
    from lib_lora.ui import fields

    assert all(f"lora_train_{f.name}" in ids for f in fields.FIELDS)


def test_tab_shows_a_missing_model_instead_of_failing(host):
    host.model = None
    blocks = build_tab(host)
    html = [b.value for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "lora_train_model"]
    assert "no model" in html[0]


def test_numbers_leave_range_checks_to_the_tab(host):
    """gradio's own check answers an out-of-range number with a toast that does not name the field; the tab's
    check names it ("Network rank (dim) must be between 1 and 1024, not 0")."""
    blocks = build_tab(host)
    numbers = [b for b in blocks.blocks.values() if isinstance(b, gr.Number)]
    assert numbers and all(b.minimum is None and b.maximum is None for b in numbers)
    dropdowns = [b for b in blocks.blocks.values() if isinstance(b, gr.Dropdown) and b.value is not None
                 and not b.multiselect]
    # gradio 3.41 shows an empty box for a number value among number choices (Caption tokens 75 / 150 / 225)
    assert all(b.value in b.choices and all(isinstance(c, str) for c in b.choices) for b in dropdowns)


def test_undo_anyway_is_hidden_until_an_undo_is_refused(host):
    blocks = build_tab(host)
    button = [b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "lora_train_undo_force"]
    assert len(button) == 1 and button[0].visible is False
