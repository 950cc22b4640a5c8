"""Caption operations the Tags sub-tab offers, over a project's whole dataset, each saved at once and undoable.

Each operation is planned as pure text edits ({caption path: new text}) and written through
`lib_lora.captions.write_captions`, which journals the old contents so `undo` restores the batch byte for byte.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..captions import caption_path, join_tags, read_caption, split_tags, undo_history, undo_last, write_captions
from ..errors import BadInput


def captions_of(images: list[Path]) -> dict[Path, str]:
    """{caption file: text} for each image ('' when the caption file does not exist yet)."""
    out = {}
    for image in images:
        cap = caption_path(image)
        out[cap] = read_caption(cap) if cap.is_file() else ""
    return out


def frequency(images: list[Path]) -> list[tuple[str, int]]:
    """(tag, number of captions holding it), most common first, then alphabetical."""
    counts: Counter = Counter()
    for text in captions_of(images).values():
        counts.update(set(split_tags(text)))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _tags(text: str) -> list[str]:
    return split_tags(text)


def plan_activation(captions: dict[Path, str], tag: str) -> dict[Path, str]:
    """Put `tag` first in every caption (moved there if it is elsewhere)."""
    tag = tag.strip()
    if not tag or "," in tag:
        raise BadInput("the activation tag must be one tag without commas")
    return {p: join_tags([tag] + [t for t in _tags(text) if t != tag]) for p, text in captions.items()}


def plan_prune(captions: dict[Path, str], drop: list[str]) -> dict[Path, str]:
    drop_set = {t.strip() for t in drop if t.strip()}
    if not drop_set:
        raise BadInput("name at least one tag to remove")
    return {p: join_tags([t for t in _tags(text) if t not in drop_set]) for p, text in captions.items()}


def plan_replace(captions: dict[Path, str], old: str, new: str) -> dict[Path, str]:
    """Replace tag `old` by `new` (empty `new` removes it; a `new` already present is merged, not doubled)."""
    old, new = old.strip(), new.strip()
    if not old:
        raise BadInput("name the tag to replace")
    out = {}
    for p, text in captions.items():
        result: list[str] = []
        for t in _tags(text):
            t = new if t == old else t
            if t and t not in result:
                result.append(t)
        out[p] = join_tags(result)
    return out


def apply(folder: Path, edits: dict[Path, str], label: str) -> int:
    """Write the edits (journaled); returns the number of captions changed."""
    entry = write_captions(folder, {str(p): text for p, text in edits.items()}, label)
    return entry.files if entry else 0


def save_caption(folder: Path, image: Path, text: str) -> bool:
    """Save one image's caption (journaled like batch edits); True when it changed."""
    return apply(folder, {caption_path(image): text.strip()}, f"edit {image.name}") > 0


def undo(folder: Path) -> str:
    entry = undo_last(folder)
    if entry is None:
        raise BadInput("nothing to undo")
    return f"undid '{entry.label}' ({entry.files} captions)"


def history(folder: Path) -> list[str]:
    return [f"{e.label} ({e.files})" for e in reversed(undo_history(folder))] if folder.is_dir() else []
