"""Caption edits over a folder: planned, written through the journal, undone byte for byte, never half-applied."""

import os
from pathlib import Path

import pytest

from lib_lora import captions, fsutil
from lib_lora.errors import BadInput
from lib_lora.tagging import edit as edits
from lib_lora.tagging.tag_ops import TagEdit
from tests.fixtures.images import make_dataset, pattern_image


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.txt"))}


@pytest.fixture
def dataset(tmp_path):
    root = make_dataset(tmp_path / "ds", {"mychar": 10, "style": 3}, per_concept=3)
    pattern_image(50).save(root / "10_mychar" / "nocap.png")
    (root / "10_mychar" / "001.txt").write_bytes("tag1, naïve, Long_Hair, long hair".encode("cp1252"))
    (root / "3_style" / "000.txt").write_text("a photo of a house by the sea", encoding="utf-8")
    return root


def make_read_only(folder: Path, monkeypatch) -> None:
    """Make `folder` refuse writes: chmod where that binds (not root), else fail creating files in it."""
    for path in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        path.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits: refuse at the point where every write starts
        real = fsutil.tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and (Path(dir).resolve() == folder.resolve() or folder.resolve() in Path(dir).resolve().parents):
                raise PermissionError(13, "Permission denied", str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(fsutil.tempfile, "mkstemp", refuse)


def test_list_captions_walks_concepts_and_skips_aside_folders(dataset):
    (dataset / "_duplicates" / "10_mychar").mkdir(parents=True)
    pattern_image(1).save(dataset / "_duplicates" / "10_mychar" / "x.png")
    pattern_image(2).save(dataset / ".hidden.png")
    items = edits.list_captions(dataset)
    names = [i.image.relative_to(dataset).as_posix() for i in items]
    assert names == ["10_mychar/000.png", "10_mychar/001.png", "10_mychar/002.png", "10_mychar/nocap.png",
                     "3_style/000.png", "3_style/001.png", "3_style/002.png"]
    by_name = dict(zip(names, items))
    assert by_name["10_mychar/nocap.png"].text is None
    assert by_name["10_mychar/001.png"].text == "tag1, naïve, Long_Hair, long hair"  # cp1252 read
    assert by_name["3_style/000.png"].tags == ("a photo of a house by the sea",)


def test_activation_plan_creates_missing_caption_and_skips_unchanged(dataset):
    (dataset / "10_mychar" / "000.txt").write_text("mychar,tag0,shared tag", encoding="utf-8")  # odd spacing, right order
    plan = edits.plan_tag_edit(dataset / "10_mychar", TagEdit(activation=("mychar",)))
    changed = {p.name: v for p, v in plan.changes.items()}
    assert "000.txt" not in changed  # already first: the file keeps its exact bytes
    assert changed["001.txt"] == ("tag1, naïve, Long_Hair, long hair", "mychar, tag1, naïve, Long_Hair, long hair")
    assert changed["nocap.txt"] == (None, "mychar")
    assert plan.created == 1 and plan.label == "activation mychar"
    # other edits never invent captions
    assert "nocap.txt" not in {p.name for p in edits.plan_tag_edit(dataset, TagEdit(sort=True)).changes}


def test_apply_then_undo_is_byte_exact_and_rewrites_as_utf8(dataset):
    before = snapshot(dataset)
    plan, entry = edits.edit_tags(dataset, TagEdit(dedupe=True, activation=("mychar",)))
    assert entry is not None and entry.files == len(plan.changes) == 5
    cap = dataset / "10_mychar" / "001.txt"
    assert cap.read_bytes() == "mychar, tag1, naïve, Long_Hair\n".encode("utf-8")
    assert (dataset / "3_style" / "000.txt").read_text(encoding="utf-8") == "mychar, a photo of a house by the sea\n"
    assert edits.undo(dataset).label == "dedupe; activation mychar"
    assert snapshot(dataset) == before
    assert not (dataset / "10_mychar" / "nocap.txt").exists()
    assert edits.undo(dataset) is None


def test_per_file_api_and_undo_order(dataset):
    image = dataset / "3_style" / "001.png"
    assert edits.get_caption(image) == "style, tag1, shared tag"
    assert edits.get_caption(dataset / "10_mychar" / "nocap.png") == ""
    edits.edit_tags(dataset, TagEdit(prune=("shared tag",)))
    assert edits.get_caption(image) == "style, tag1"
    entry = edits.set_caption(dataset, image, "  style, edited by hand  ")
    assert entry.label == "edit 001.png" and edits.get_caption(image) == "style, edited by hand"
    assert edits.set_caption(dataset, image, "style, edited by hand") is None  # no change, no undo step
    assert [e.label for e in edits.history(dataset)] == ["prune shared tag", "edit 001.png"]
    edits.undo(dataset)
    assert edits.get_caption(image) == "style, tag1"
    edits.undo(dataset)
    assert edits.get_caption(image) == "style, tag1, shared tag"
    with pytest.raises(BadInput, match="not inside"):
        edits.set_caption(dataset / "3_style", dataset / "10_mychar" / "000.png", "x")


def test_frequency_and_search(dataset):
    table = dict(edits.frequency(dataset))
    assert table["shared tag"] == 4 and table["Long_Hair"] == 1 and "long hair" not in table  # one tag, two spellings
    hits = [i.image.name for i in edits.search(dataset, "LONG HAIR")]
    assert hits == ["001.png"]
    assert [i.image.name for i in edits.search(dataset, "tag*")] == ["000.png", "001.png", "002.png", "001.png", "002.png"]


def test_bad_input(tmp_path, dataset):
    with pytest.raises(BadInput, match="does not exist"):
        edits.plan_tag_edit(tmp_path / "missing", TagEdit(sort=True))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a caption")
    with pytest.raises(BadInput, match="no images"):
        edits.plan_tag_edit(tmp_path / "empty", TagEdit(sort=True))
    with pytest.raises(BadInput, match="no edit"):
        edits.plan_tag_edit(dataset, TagEdit())
    with pytest.raises(BadInput, match="extension"):
        edits.list_captions(dataset, "../x")


def test_read_only_folder_changes_nothing(dataset, monkeypatch):
    before = snapshot(dataset)
    make_read_only(dataset, monkeypatch)
    try:
        with pytest.raises(BadInput, match="no caption was changed"):
            edits.edit_tags(dataset, TagEdit(activation=("mychar",)))
    finally:
        for p in [dataset, *dataset.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
    assert snapshot(dataset) == before
    assert not (dataset / captions.JOURNAL_DIR).exists()


def test_one_read_only_concept_rolls_back_the_whole_batch(dataset, monkeypatch):
    before = snapshot(dataset)
    make_read_only(dataset / "3_style", monkeypatch)  # 10_mychar is written first, then 3_style refuses
    try:
        with pytest.raises(BadInput) as info:
            edits.edit_tags(dataset, TagEdit(activation=("mychar",)))
    finally:
        (dataset / "3_style").chmod(0o755)
    message = str(info.value)
    assert "3_style" in message and "no caption was changed" in message and "\n" not in message
    assert snapshot(dataset) == before
    assert edits.history(dataset) == []


def test_interrupt_leaves_each_caption_old_or_new_and_undo_restores(dataset, monkeypatch):
    before = snapshot(dataset)
    plan = edits.plan_tag_edit(dataset, TagEdit(activation=("mychar",)))
    real = captions.atomic_write_text
    calls = []

    def interrupted(path, text):
        calls.append(path)
        if len(calls) == 4:  # the journal, then two captions, then Ctrl-C
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(captions, "atomic_write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        edits.apply_plan(dataset, plan)
    monkeypatch.setattr(captions, "atomic_write_text", real)
    after = snapshot(dataset)
    new = {p.relative_to(dataset).as_posix(): (n + "\n").encode() for p, (_, n) in plan.changes.items()}
    for name in set(before) | set(after):
        assert after.get(name) in (before.get(name), new.get(name))  # old or new, never a mix
    assert sum(after.get(n) == new[n] for n in new) == 2
    assert not list(dataset.rglob(".*.tmp"))
    edits.undo(dataset)
    assert snapshot(dataset) == before


def test_undo_after_renaming_a_concept_folder_restores_nothing_and_says_so(dataset):
    """Renaming 10_mychar to 5_mychar is how users change repeats; undo must not rebuild the old folder."""
    edits.edit_tags(dataset, TagEdit(activation=("ohwx",)))
    after = snapshot(dataset)
    (dataset / "10_mychar").rename(dataset / "5_mychar")
    with pytest.raises(BadInput, match=r"10_mychar.*(renamed|moved).*nothing was restored"):
        edits.undo(dataset)
    assert not (dataset / "10_mychar").exists()  # no ghost concept folder of captions
    assert snapshot(dataset) == {k.replace("10_mychar", "5_mychar"): v for k, v in after.items()}
    assert len(edits.history(dataset)) == 1  # kept: renaming the folder back makes the undo work
    (dataset / "5_mychar").rename(dataset / "10_mychar")
    assert edits.undo(dataset).label == "activation ohwx"
    assert not any(b"ohwx" in v for v in snapshot(dataset).values())


def test_undo_follows_the_dataset_when_the_whole_folder_moves(dataset, tmp_path):
    before = snapshot(dataset)
    edits.edit_tags(dataset, TagEdit(prune=("shared tag",)))
    moved = dataset.rename(tmp_path / "moved")
    assert edits.undo(moved) is not None
    assert snapshot(moved) == before


def test_undo_keeps_captions_edited_after_the_batch_unless_forced(dataset):
    """A caption fixed by hand (another editor, the webui's tag editor) after a batch is not silently reverted."""
    before = snapshot(dataset)
    edits.edit_tags(dataset, TagEdit(prune=("shared tag",)))
    hand = dataset / "3_style" / "001.txt"
    hand.write_text("style, tag1, fixed by hand", encoding="utf-8")
    after = snapshot(dataset)
    with pytest.raises(BadInput, match=r"changed after.*3_style/001\.txt.*nothing was restored.*--force"):
        edits.undo(dataset)
    assert snapshot(dataset) == after and len(edits.history(dataset)) == 1
    assert edits.undo(dataset, force=True) is not None
    assert snapshot(dataset) == before


def test_read_only_caption_file_stops_the_edit_and_changes_nothing(dataset):
    before = snapshot(dataset)
    locked = dataset / "3_style" / "001.txt"
    locked.chmod(0o444)
    with pytest.raises(BadInput, match=r"read-only.*3_style/001\.txt.*no caption was changed"):
        edits.edit_tags(dataset, TagEdit(activation=("ohwx",)))
    assert snapshot(dataset) == before and not edits.history(dataset)
    assert edits.edit_tags(dataset, TagEdit(prune=("nothing here",)))[1] is None  # unchanged files: no error
    locked.chmod(0o644)
    assert edits.edit_tags(dataset, TagEdit(activation=("ohwx",)))[1] is not None
