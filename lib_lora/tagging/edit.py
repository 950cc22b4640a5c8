"""Caption edits over a dataset folder: plan first ({caption path: new text}), then write through
`lib_lora.captions.write_captions`, so every operation is atomic per file, all-or-nothing per batch, and undoable.

Also the per-file API the tab calls (list images with their captions, get / set one caption). All of them journal
into the dataset folder they are given, so `undo(folder)` steps back through batch edits and single-caption edits
alike, newest first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..captions import UndoEntry, caption_path, join_tags, read_caption, split_tags, undo_history, undo_last, write_captions
from ..errors import BadInput
from .dedupe import dataset_images
from .tag_ops import TagEdit, has_tag, tag_frequency


@dataclass(frozen=True)
class CaptionFile:
    image: Path
    caption: Path
    text: str | None  # None: the image has no caption file

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(split_tags(self.text or ""))


@dataclass
class EditPlan:
    """What an edit would write: caption path -> (old text or None when the file is new, new text)."""

    label: str
    changes: dict[Path, tuple[str | None, str]] = field(default_factory=dict)

    @property
    def created(self) -> int:
        return sum(1 for old, _ in self.changes.values() if old is None)


def _extension(caption_extension: str) -> str:
    ext = caption_extension.strip()
    if not ext or ext in (".", "..") or "/" in ext or "\\" in ext:
        raise BadInput(f"caption extension {caption_extension!r} is not a file extension like .txt")
    return ext if ext.startswith(".") else "." + ext


def list_captions(folder: str | os.PathLike, caption_extension: str = ".txt") -> list[CaptionFile]:
    """Every image under `folder` (concept subfolders included) with its caption text (None if it has none)."""
    ext = _extension(caption_extension)
    items = []
    for image in dataset_images(folder):
        cap = caption_path(image, ext)
        try:
            text = read_caption(cap) if cap.is_file() else None
        except OSError as exc:
            raise BadInput(f"cannot read caption {cap}: {exc.strerror or exc}") from exc
        items.append(CaptionFile(image, cap, text))
    return items


def _require_images(folder: str | os.PathLike, items: Sequence[CaptionFile]) -> None:
    if not items:
        raise BadInput(f"no images in {folder} (looked for .png .jpg .jpeg .webp .bmp, concept subfolders included)")


def get_caption(image: str | os.PathLike, caption_extension: str = ".txt") -> str:
    """The caption of one image ('' when it has none)."""
    cap = caption_path(image, _extension(caption_extension))
    return read_caption(cap) if cap.is_file() else ""


def set_captions(
    folder: str | os.PathLike, texts: Mapping[str | os.PathLike, str], caption_extension: str = ".txt", label: str = ""
) -> UndoEntry | None:
    """Write captions for the given images ({image path: text}), journaled in `folder`; None if nothing changed."""
    ext = _extension(caption_extension)
    root = Path(folder)
    edits = {}
    for image, text in texts.items():
        image = Path(image)
        if root.resolve() not in image.resolve().parents:
            raise BadInput(f"{image} is not inside the dataset folder {root}")
        edits[caption_path(image, ext)] = text
    names = ", ".join(Path(i).name for i in list(texts)[:3]) + (" ..." if len(texts) > 3 else "")
    return write_captions(root, edits, label or f"edit {names}")


def set_caption(
    folder: str | os.PathLike, image: str | os.PathLike, text: str, caption_extension: str = ".txt"
) -> UndoEntry | None:
    """Write one image's caption (the tab's editor), undoable like a batch edit."""
    return set_captions(folder, {image: text}, caption_extension, f"edit {Path(image).name}")


def plan_tag_edit(folder: str | os.PathLike, edit: TagEdit, caption_extension: str = ".txt") -> EditPlan:
    """The captions `edit` would change. Images without a caption get one only from an activation tag."""
    if edit.is_empty():
        raise BadInput("no edit given (use --activation, --prune, --replace, --dedupe or --sort)")
    items = list_captions(folder, caption_extension)
    _require_images(folder, items)
    plan = EditPlan(edit.label())
    for item in items:
        if item.text is None and not edit.activation:
            continue
        new = edit.apply(item.tags)
        if new != item.tags or item.text is None:
            plan.changes[item.caption] = (item.text, join_tags(new))
    return plan


def apply_plan(folder: str | os.PathLike, plan: EditPlan) -> UndoEntry | None:
    """Write a plan (journaled, all-or-nothing); None when it changes nothing."""
    return write_captions(folder, {path: new for path, (_, new) in plan.changes.items()}, plan.label)


def edit_tags(folder: str | os.PathLike, edit: TagEdit, caption_extension: str = ".txt") -> tuple[EditPlan, UndoEntry | None]:
    plan = plan_tag_edit(folder, edit, caption_extension)
    return plan, apply_plan(folder, plan)


def undo(folder: str | os.PathLike, force: bool = False) -> UndoEntry | None:
    """Put back the captions of the most recent edit in `folder`; None when there is nothing to undo.

    BadInput (nothing restored) when a caption was changed after that edit, unless `force`; see `undo_last`."""
    root = Path(folder)
    if not root.is_dir():
        raise BadInput(f"folder does not exist: {root}")
    try:
        return undo_last(root, force=force)
    except OSError as exc:
        raise BadInput(f"cannot undo in {root}: {exc.strerror or exc}; the undo history is kept") from exc


def history(folder: str | os.PathLike) -> list[UndoEntry]:
    return undo_history(folder)


def frequency(folder: str | os.PathLike, caption_extension: str = ".txt") -> list[tuple[str, int]]:
    """Tag frequency over the folder's captions: (tag, captions holding it), most frequent first."""
    items = list_captions(folder, caption_extension)
    _require_images(folder, items)
    return tag_frequency(item.tags for item in items)


def search(folder: str | os.PathLike, pattern: str, caption_extension: str = ".txt") -> list[CaptionFile]:
    """Images whose caption holds a tag matching `pattern` (spelling-insensitive; `*` and `?` allowed)."""
    if not pattern.strip():
        raise BadInput("--search needs a tag")
    items = list_captions(folder, caption_extension)
    _require_images(folder, items)
    return [item for item in items if has_tag(item.tags, pattern)]


def diff_lines(plan: EditPlan, root: str | os.PathLike) -> list[str]:
    """A readable preview: each changed caption with its old and new text."""
    base = Path(root).resolve()
    lines = []
    for path, (old, new) in sorted(plan.changes.items()):
        try:
            shown = path.resolve().relative_to(base)
        except ValueError:
            shown = path
        lines.append(f"{shown}")
        lines.append(f"  - {old if old is not None else '(no caption file)'}")
        lines.append(f"  + {new}")
    return lines
