"""Caption files: reading whatever encoding users have, and writing batches that can always be undone.

Every caption change (tag edits, taggers, the tab's per-image editor) goes through `write_captions`: it first
records the old contents in an undo journal inside the dataset folder, then replaces each file atomically. An
interrupt therefore leaves every caption either old or new, and `undo_last` can always put the batch back.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import BadInput
from .fsutil import atomic_write_bytes, atomic_write_text

JOURNAL_DIR = ".lora_train_undo"
_FALLBACK_ENCODINGS = ("utf-8", "cp1252", "latin-1")  # latin-1 accepts any byte, so reading never fails


def read_caption(path: str | os.PathLike) -> str:
    """Return the caption text (stripped), decoding UTF-8 (with or without BOM), UTF-16 with BOM, else cp1252."""
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace").strip()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16").strip()
    for encoding in _FALLBACK_ENCODINGS:
        try:
            return data.decode(encoding).strip()
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1").strip()  # pragma: no cover - latin-1 always decodes


def caption_path(image: str | os.PathLike, extension: str = ".txt") -> Path:
    """The caption file beside an image (`001.png` -> `001.txt`)."""
    ext = extension if extension.startswith(".") else "." + extension
    return Path(image).with_suffix(ext)


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empties dropped (a BLIP sentence stays one 'tag')."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def join_tags(tags: list[str] | tuple[str, ...]) -> str:
    return ", ".join(tags)


@dataclass(frozen=True)
class UndoEntry:
    journal: Path
    label: str
    files: int


def _journal_root(folder: Path) -> Path:
    return folder / JOURNAL_DIR


def write_captions(folder: str | os.PathLike, edits: Mapping[str | os.PathLike, str], label: str) -> UndoEntry | None:
    """Write `edits` ({caption path: new text}) under dataset `folder`, journaled for `undo_last`.

    Only files whose content changes are written. Returns the journal entry, or None when nothing changed.
    """
    root = Path(folder)
    if not root.is_dir():
        raise BadInput(f"folder does not exist: {root}")
    old: dict[str, str | None] = {}
    new: dict[Path, str] = {}
    for raw_path, text in edits.items():
        path = Path(raw_path)
        before = read_caption(path) if path.exists() else None
        if before == text.strip() and path.exists():
            continue
        old[str(path.resolve())] = _raw_or_none(path)
        new[path] = text.strip()
    if not new:
        return None
    journal_dir = _journal_root(root)
    journal = journal_dir / f"{time.time_ns():020d}.json"
    try:
        atomic_write_text(journal, json.dumps({"label": label, "files": old}, ensure_ascii=False))
    except OSError as exc:  # read-only folder or file system, full disk: nothing was written
        _remove_if_empty(journal_dir)
        raise BadInput(f"cannot write captions in {root}: {exc.strerror or exc}; no caption was changed") from exc
    written: list[Path] = []
    try:
        for path, text in new.items():
            atomic_write_text(path, text + "\n" if text else "")
            written.append(path)
    except OSError as exc:
        # A caption folder that refuses writes half-way (a read-only concept folder, a full disk): put back the
        # ones already written so the batch is all-or-nothing, not just each file.
        restored = _restore(written, old)
        if restored:
            journal.unlink(missing_ok=True)
            _remove_if_empty(journal_dir)
            tail = "no caption was changed"
        else:
            tail = f"{len(written)} caption(s) were changed; run the undo to put them back"
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}; {tail}") from exc
    return UndoEntry(journal, label, len(new))


def _restore(paths: list[Path], old: dict[str, str | None]) -> bool:
    """Put `paths` back to their journaled bytes; False when that fails too (the journal then stays for undo)."""
    try:
        for path in paths:
            encoded = old[str(path.resolve())]
            if encoded is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(path, base64.b64decode(encoded))
    except OSError:
        return False
    return True


def _raw_or_none(path: Path) -> str | None:
    """The file's exact bytes (base64) for the journal, so undo restores it byte for byte; None if absent."""
    if not path.exists():
        return None
    return base64.b64encode(path.read_bytes()).decode("ascii")


def undo_history(folder: str | os.PathLike) -> list[UndoEntry]:
    """Journal entries, oldest first."""
    journal_dir = _journal_root(Path(folder))
    entries = []
    for journal in sorted(journal_dir.glob("*.json")) if journal_dir.is_dir() else []:
        data = json.loads(journal.read_text(encoding="utf-8"))
        entries.append(UndoEntry(journal, data.get("label", ""), len(data.get("files", {}))))
    return entries


def undo_last(folder: str | os.PathLike) -> UndoEntry | None:
    """Restore the captions changed by the most recent journaled batch; None when there is nothing to undo."""
    history = undo_history(folder)
    if not history:
        return None
    entry = history[-1]
    data = json.loads(entry.journal.read_text(encoding="utf-8"))
    for raw_path, encoded in data["files"].items():
        path = Path(raw_path)
        if encoded is None:
            if path.exists():
                path.unlink()
        else:
            atomic_write_bytes(path, base64.b64decode(encoded))
    entry.journal.unlink()
    _remove_if_empty(entry.journal.parent)  # no empty journal folder left behind once everything is undone
    return entry


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty, or not ours to remove
        pass
