"""The tab's own event handlers, called as gradio calls them (the values of the inputs in order), on a built tab:
what a click changes on disk and in the widgets, without a browser."""

from __future__ import annotations

from lib_lora.ui import projects, tagops
from lib_lora.ui.tab import build_tab
from tests.ui.conftest import make_images


def fire(blocks, elem_id: str, trigger: str, *values) -> dict:
    """Run the first handler of `trigger` on the element `elem_id`; {elem_id or label: value} of what it returned."""
    comp = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)
    for i, dep in enumerate(blocks.dependencies):
        if comp._id in dep["targets"] and dep["trigger"] == trigger:
            out = blocks.fns[i].fn(*values)
            return {getattr(k, "elem_id", None) or k.label: v for k, v in out.items()}
    raise AssertionError(f"no {trigger} handler on {elem_id}")


def test_a_refused_undo_offers_undo_anyway_which_puts_the_edit_back(host):
    project = projects.create_project(host.projects_root(), "p")
    images = make_images(project.dataset / "10_p", 3, captions=["cat, red", "dog, red"])
    tagops.apply(project.dataset, tagops.plan_prune(tagops.captions_of(images), ["red"]), "remove red")
    images[0].with_suffix(".txt").write_text("typed by hand")
    blocks = build_tab(host)
    refused = fire(blocks, "lora_train_undo", "click", "p", "")
    assert "lt-error" in refused["lora_train_msg"] and "Undo anyway" in refused["lora_train_msg"]
    assert "--force" not in refused["lora_train_msg"]
    assert refused["lora_train_undo_force"]["visible"] is True
    assert images[0].with_suffix(".txt").read_text() == "typed by hand"
    done = fire(blocks, "lora_train_undo_force", "click", "p", "", refused["lora_train_undo_refused"])
    assert "undid 'remove red'" in done["lora_train_msg"].replace("&#x27;", "'")
    assert done["lora_train_undo_force"]["visible"] is False
    assert [p.with_suffix(".txt").read_text() for p in images] == ["cat, red", "dog, red", "cat, red"]


def load_page(blocks) -> dict:
    """What the page's load event sets (a browser reload)."""
    for i, dep in enumerate(blocks.dependencies):
        if dep["trigger"] == "load":
            out = blocks.fns[i].fn()
            return {getattr(k, "elem_id", None) or k.label: v for k, v in out.items()}
    raise AssertionError("no load handler")


def test_a_page_reload_comes_back_with_the_last_chosen_project(host):
    """The choice was lost on reload (the load event set the project to none)."""
    root = host.projects_root()
    for name in ("a", "b"):
        make_images(projects.create_project(root, name).dataset / f"10_{name}", 1)
    blocks = build_tab(host)
    assert load_page(blocks)["lora_train_project"]["value"] is None  # nothing chosen yet
    fire(blocks, "lora_train_project", "change", "b")
    assert load_page(build_tab(host))["lora_train_project"]["value"] == "b"  # also after a restart
    import shutil

    shutil.rmtree(root / "b")  # a project deleted meanwhile: none chosen, no error
    assert load_page(blocks)["lora_train_project"]["value"] is None
