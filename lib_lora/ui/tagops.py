"""Caption operations the Tags sub-tab offers, over a project's whole dataset, each saved at once and undoable.

Each operation is planned as pure text edits ({caption path: new text}) and written through
`lib_lora.captions.write_captions`, which journals the old contents so `undo` restores the batch byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from ..captions import (UndoConflict, caption_path, join_tags, read_caption, split_tags, undo_history, undo_last,
                        write_captions)
from ..errors import BadInput
from ..tagging import tag_ops


def captions_of(images: list[Path]) -> dict[Path, str]:
    """{caption file: text} for each image ('' when the caption file does not exist yet)."""
    out = {}
    for image in images:
        cap = caption_path(image)
        out[cap] = read_caption(cap) if cap.is_file() else ""
    return out


def frequency(images: list[Path]) -> list[tuple[str, int]]:
    """(tag, number of captions holding it), most common first; `long_hair`, `Long Hair` and `(long hair:1.2)`
    count as one tag (the engine's matching, the same as the CLI's `tags --freq`)."""
    return tag_ops.tag_frequency(split_tags(text) for text in captions_of(images).values())


def _edit(captions: dict[Path, str], fn) -> dict[Path, str]:
    return {p: join_tags(list(fn(tuple(split_tags(text))))) for p, text in captions.items()}


def plan_activation(captions: dict[Path, str], tag: str) -> dict[Path, str]:
    """Put `tag` first in every caption (moved there if it is elsewhere, in any spelling)."""
    tag = tag.strip()
    if not tag or "," in tag:
        raise BadInput("the activation tag must be one tag without commas")
    return _edit(captions, lambda tags: tag_ops.set_activation(tags, [tag]))


def plan_prune(captions: dict[Path, str], drop: list[str]) -> dict[Path, str]:
    drop_list = [t.strip() for d in drop for t in d.split(",") if t.strip()]
    if not drop_list:
        raise BadInput("name at least one tag to remove")
    return _edit(captions, lambda tags: tag_ops.prune(tags, drop_list))


def plan_replace(captions: dict[Path, str], old: str | list[str], new: str) -> dict[Path, str]:
    """Replace tag `old` (or several tags: a merge) by `new`, where the first of them was, keeping a weight;
    a `new` already present is kept once, not doubled; empty `new` removes them."""
    olds = [old] if isinstance(old, str) else list(old)
    sources = [t.strip() for o in olds for t in o.split(",") if t.strip()]
    new = new.strip()
    if not sources:
        raise BadInput("name the tag(s) to replace")
    if not new:
        return plan_prune(captions, sources)
    if "," in new:
        raise BadInput("replace them with one tag (no commas)")
    return _edit(captions, lambda tags: tag_ops.replace(tags, sources, new))


def apply(folder: Path, edits: dict[Path, str], label: str) -> int:
    """Write the edits (journaled); returns the number of captions changed."""
    entry = write_captions(folder, {str(p): text for p, text in edits.items()}, label)
    return entry.files if entry else 0


def save_caption(folder: Path, image: Path, text: str) -> bool:
    """Save one image's caption (journaled like batch edits); True when it changed."""
    return apply(folder, {caption_path(image): text.strip()}, f"edit {image.name}") > 0


class UndoNeedsConsent(BadInput):
    """Undo refused because captions were changed after the edit; `entry` names that edit (its journal file) for
    'Undo anyway', so the button forces back the edit the user was told about and never a newer one."""

    def __init__(self, message: str, entry: str):
        super().__init__(message)
        self.entry = entry


def undo(folder: Path, force: bool = False, only: str | None = None) -> str:
    """Undo the newest edit. A caption changed after it makes this refuse (UndoNeedsConsent, in the tab's words)
    unless `force`; with `only` (the refused edit's id) forcing happens only while that edit is still the newest."""
    if only is not None:
        history = undo_history(folder) if folder.is_dir() else []
        if not history or history[-1].journal.name != only:
            raise BadInput("the edit history changed since that undo was refused; nothing was restored: press Undo "
                           "again")
    try:
        entry = undo_last(folder, force=force)
    except UndoConflict as exc:
        names = [_shown(folder, p) for p in exc.changed]
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise UndoNeedsConsent(
            f"cannot undo '{exc.entry.label}': {len(names)} caption(s) were changed after it ({listed}); nothing "
            "was restored. Undo anyway puts the whole edit back and loses those later changes",
            exc.entry.journal.name) from None
    if entry is None:
        raise BadInput("nothing to undo")
    return f"undid '{entry.label}' ({entry.files} captions)"


def _shown(folder: Path, path: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return path.name


def history(folder: Path) -> list[str]:
    return [f"{e.label} ({e.files})" for e in reversed(undo_history(folder))] if folder.is_dir() else []
