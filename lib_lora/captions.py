"""Caption files: reading whatever encoding users have, and writing batches that can always be undone.

Every caption change (tag edits, taggers, the tab's per-image editor) goes through `write_captions`: it first
records the old contents in an undo journal inside the dataset folder, then replaces each file atomically. An
interrupt therefore leaves every caption either old or new, and `undo_last` can always put the batch back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from .errors import BadInput
from .fsutil import atomic_write_bytes, atomic_write_text

JOURNAL_DIR = ".lora_train_undo"
_FALLBACK_ENCODINGS = ("utf-8", "cp1252", "latin-1")  # latin-1 accepts any byte, so reading never fails


class UndoConflict(BadInput):
    """Undo refused because captions were changed after the batch; `entry` is the refused batch, `changed` the
    caption files changed since (so a host can offer its own way to undo anyway: the CLI's --force, a tab button)."""

    def __init__(self, message: str, entry: "UndoEntry", changed: list[Path]):
        super().__init__(message)
        self.entry = entry
        self.changed = changed


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
    written: dict[str, str] = {}
    new: dict[Path, str] = {}
    keys: dict[Path, str] = {}
    for raw_path, text in edits.items():
        path = Path(raw_path)
        before = read_caption(path) if path.exists() else None
        if before == text.strip() and path.exists():
            continue
        key = keys[path] = _journal_key(root, path)
        old[key] = _raw_or_none(path)
        new[path] = text.strip()
        written[key] = _digest(_file_bytes(new[path]))
    if not new:
        return None
    locked = read_only_files(new)
    if locked:
        raise BadInput(f"{_locked_message(root, locked)}; no caption was changed")
    journal_dir = _journal_root(root)
    journal = journal_dir / f"{time.time_ns():020d}.json"
    try:
        atomic_write_text(journal, json.dumps({"label": label, "files": old, "written": written}, ensure_ascii=False))
    except OSError as exc:  # read-only folder or file system, full disk: nothing was written
        _remove_if_empty(journal_dir)
        raise BadInput(f"cannot write captions in {root}: {exc.strerror or exc}; no caption was changed") from exc
    done: list[Path] = []
    try:
        for path, text in new.items():
            atomic_write_text(path, text + "\n" if text else "")  # the bytes _file_bytes(text) gives
            done.append(path)
    except OSError as exc:
        # A caption folder that refuses writes half-way (a read-only concept folder, a full disk): put back the
        # ones already written so the batch is all-or-nothing, not just each file.
        restored = _restore(done, {path: old[keys[path]] for path in done})
        if restored:
            journal.unlink(missing_ok=True)
            _remove_if_empty(journal_dir)
            tail = "no caption was changed"
        else:
            tail = f"{len(done)} caption(s) were changed; run the undo to put them back"
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}; {tail}") from exc
    return UndoEntry(journal, label, len(new))


def read_only_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Existing files without the owner's write permission: captions the user locked. We never replace them, on
    any system (a rename would go over them on Linux and macOS; on Windows the replace fails half-way)."""
    out = []
    for raw in paths:
        path = Path(raw)
        try:
            if not path.stat().st_mode & stat.S_IWUSR:
                out.append(path)
        except OSError:  # missing: it will be created
            pass
    return sorted(out)


def _locked_message(root: Path, locked: list[Path]) -> str:
    names = ", ".join(_shown(root, p) for p in locked[:5]) + (" ..." if len(locked) > 5 else "")
    return f"{len(locked)} caption file(s) are read-only ({names}); make them writable to change them"


def _file_bytes(text: str) -> bytes:
    """What a caption file holds: the stripped text and one newline (an empty caption is an empty file)."""
    return (text + "\n").encode("utf-8") if text else b""


def _digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _journal_key(root: Path, path: Path) -> str:
    """The caption's path relative to the dataset folder, so the history follows the folder when it moves."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:  # outside the dataset folder (the engine never writes there; kept for safety)
        return str(path.resolve())


def _restore(paths: list[Path], old: dict[Path, str | None]) -> bool:
    """Put `paths` back to their journaled bytes; False when that fails too (the journal then stays for undo)."""
    try:
        for path in paths:
            encoded = old[path]
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


def undo_last(folder: str | os.PathLike, force: bool = False) -> UndoEntry | None:
    """Restore the captions changed by the most recent journaled batch; None when there is nothing to undo.

    Nothing is restored (BadInput, the history kept) when a caption's folder is gone (a concept folder renamed
    to change its repeats: restoring would rebuild the old folder with captions only), or, unless `force`, when a
    caption was changed after the batch (by hand or another tool): undo must not silently throw that work away.
    """
    root = Path(folder)
    history = undo_history(root)
    if not history:
        return None
    entry = history[-1]
    data = json.loads(entry.journal.read_text(encoding="utf-8"))
    files = {_journal_path(root, key): encoded for key, encoded in data["files"].items()}
    gone = sorted({_shown(root, path.parent) for path in files if not path.parent.is_dir()})
    if gone:
        raise BadInput(
            f"cannot undo '{entry.label}': folder {', '.join(gone[:3])} no longer exists (renamed or moved since?); "
            "nothing was restored and the undo history is kept: give the folder its old name to undo"
        )
    # Changed after the batch: neither what the batch wrote nor what it found (an interrupted batch leaves some
    # captions old; restoring those is a no-op, not a conflict).
    recorded = {_journal_path(root, key): digest for key, digest in data.get("written", {}).items()}
    changed = [
        path for path, digest in recorded.items()
        if _digest(_current_bytes(path)) not in (digest, _digest(_decoded(files[path])))
    ]
    if changed and not force:
        names = ", ".join(_shown(root, p) for p in sorted(changed)[:5]) + (" ..." if len(changed) > 5 else "")
        raise UndoConflict(
            f"cannot undo '{entry.label}': {len(changed)} caption(s) were changed after it ({names}); nothing was "
            "restored; undo with --force to put the whole batch back and lose those later changes",
            entry, sorted(changed),
        )
    for path, encoded in files.items():
        if encoded is None:
            if path.exists():
                path.unlink()
        else:
            atomic_write_bytes(path, base64.b64decode(encoded))
    entry.journal.unlink()
    _remove_if_empty(entry.journal.parent)  # no empty journal folder left behind once everything is undone
    return entry


def _journal_path(root: Path, key: str) -> Path:
    path = Path(key)
    return path if path.is_absolute() else root / path  # absolute: journals written before paths were relative


def _decoded(encoded: str | None) -> bytes | None:
    return None if encoded is None else base64.b64decode(encoded)


def _current_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def locked_message(root: str | os.PathLike, locked: list[Path]) -> str:
    """'N caption file(s) are read-only (a.txt, ...); make them writable to change them' (for the tagger's check)."""
    return _locked_message(Path(root), locked)


def _shown(root: Path, path: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix() or "."
    except ValueError:
        return str(path)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty, or not ours to remove
        pass
