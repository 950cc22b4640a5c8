from __future__ import annotations

import pytest

from lib_lora.errors import BadInput
from lib_lora.ui import projects, tagops
from tests.ui.conftest import make_images


@pytest.fixture
def dataset(tmp_path):
    project = projects.create_project(tmp_path, "p")
    images = make_images(project.dataset / "10_p", 3, captions=["cat, red, outdoors", "cat, blue", "dog, red"])
    return project, images


def test_frequency_counts_captions_not_occurrences(dataset):
    project, images = dataset
    assert tagops.frequency(images)[:2] == [("cat", 2), ("red", 2)]


def test_activation_prune_replace_then_undo_restores_bytes(dataset):
    project, images = dataset
    before = {p: p.with_suffix(".txt").read_bytes() for p in images}
    caps = tagops.captions_of(images)
    assert tagops.apply(project.dataset, tagops.plan_activation(caps, "mychar"), "activation") == 3
    assert images[0].with_suffix(".txt").read_text().strip() == "mychar, cat, red, outdoors"
    caps = tagops.captions_of(images)
    tagops.apply(project.dataset, tagops.plan_prune(caps, ["red"]), "prune")
    assert images[2].with_suffix(".txt").read_text().strip() == "mychar, dog"
    caps = tagops.captions_of(images)
    tagops.apply(project.dataset, tagops.plan_replace(caps, "dog", "cat"), "replace")
    assert images[2].with_suffix(".txt").read_text().strip() == "mychar, cat"
    assert tagops.history(project.dataset)[0].startswith("replace")
    for _ in range(3):
        tagops.undo(project.dataset)
    assert {p: p.with_suffix(".txt").read_bytes() for p in images} == before
    with pytest.raises(BadInput, match="nothing to undo"):
        tagops.undo(project.dataset)


def test_replace_merges_instead_of_doubling(dataset):
    project, images = dataset
    edits = tagops.plan_replace(tagops.captions_of(images), "blue", "cat")
    assert edits[images[1].with_suffix(".txt")] == "cat"


def test_bad_tag_operations_are_refused(dataset):
    project, images = dataset
    caps = tagops.captions_of(images)
    with pytest.raises(BadInput):
        tagops.plan_activation(caps, "a, b")
    with pytest.raises(BadInput):
        tagops.plan_prune(caps, [" ", ""])


def test_single_caption_save_is_undoable(dataset):
    project, images = dataset
    assert tagops.save_caption(project.dataset, images[0], "new caption ")
    assert images[0].with_suffix(".txt").read_text().strip() == "new caption"
    assert not tagops.save_caption(project.dataset, images[0], "new caption")
    tagops.undo(project.dataset)
    assert images[0].with_suffix(".txt").read_text() == "cat, red, outdoors"


def test_several_tags_merge_into_one_whatever_their_spelling(tmp_path):
    project = projects.create_project(tmp_path, "p")
    images = make_images(project.dataset / "10_p", 2, captions=["long_hair, (red hair:1.2), smile", "Long Hair, smile"])
    caps = tagops.captions_of(images)
    edits = tagops.plan_replace(caps, "long hair, red hair", "hair")
    assert list(edits.values()) == ["hair, smile", "hair, smile"]  # placed once, where the first of them was
    assert list(tagops.plan_prune(caps, ["long hair"]).values()) == ["(red hair:1.2), smile", "smile"]
    counts = {tag.lower().replace("_", " "): n for tag, n in tagops.frequency(images)}
    assert counts == {"long hair": 2, "smile": 2, "red hair": 1}
    with pytest.raises(BadInput, match="one tag"):
        tagops.plan_replace(caps, "smile", "a, b")


def test_undo_refused_for_a_later_edit_says_so_in_the_tabs_words_and_undo_anyway_restores(dataset):
    """The library's refusal told a tab user to use the CLI's --force; the tab offers 'Undo anyway' instead,
    bound to the edit it refused, so a newer edit made meanwhile is never the one forced back."""
    project, images = dataset
    before = images[0].with_suffix(".txt").read_bytes()
    tagops.apply(project.dataset, tagops.plan_prune(tagops.captions_of(images), ["red"]), "remove red")
    images[0].with_suffix(".txt").write_text("edited by hand after the batch")
    with pytest.raises(tagops.UndoNeedsConsent) as refused:
        tagops.undo(project.dataset)
    text = str(refused.value)
    assert "--force" not in text and "Undo anyway" in text and "000.txt" in text and "'remove red'" in text
    assert images[0].with_suffix(".txt").read_text() == "edited by hand after the batch"  # nothing restored
    assert "undid 'remove red'" in tagops.undo(project.dataset, force=True, only=refused.value.entry)
    assert images[0].with_suffix(".txt").read_bytes() == before
    assert images[2].with_suffix(".txt").read_text() == "dog, red"


def test_undo_anyway_refuses_when_the_history_moved_on(dataset):
    project, images = dataset
    tagops.apply(project.dataset, tagops.plan_prune(tagops.captions_of(images), ["red"]), "remove red")
    images[0].with_suffix(".txt").write_text("edited by hand")
    with pytest.raises(tagops.UndoNeedsConsent) as refused:
        tagops.undo(project.dataset)
    tagops.save_caption(project.dataset, images[1], "newer edit")  # a newer journal entry
    with pytest.raises(BadInput, match="press Undo again"):
        tagops.undo(project.dataset, force=True, only=refused.value.entry)
    assert images[1].with_suffix(".txt").read_text().strip() == "newer edit"
    assert images[0].with_suffix(".txt").read_text() == "edited by hand"
