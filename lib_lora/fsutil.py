"""File-system helpers shared by every writer: atomic writes and safe names.

Every file we write (LoRA epochs, captions, configs, checkpoints) goes through `atomic_write`, so an interrupt,
a crash or a full disk leaves either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import BadInput

_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_BAD_CHARS = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


def check_name(name: str, what: str = "name") -> str:
    """Return `name` stripped if it is safe as one path component (a project or output name), else raise BadInput.

    Refused: empty, `.`/`..`, path separators, characters Windows forbids, `:` and `>` (they break `<lora:name:w>`),
    leading/trailing dots or spaces, and Windows device names.
    """
    cleaned = name.strip() if isinstance(name, str) else ""
    if not cleaned:
        raise BadInput(f"{what} is empty")
    if cleaned in (".", "..") or ".." in cleaned:
        raise BadInput(f"{what} {name!r} may not contain '..'")
    bad = _BAD_CHARS.search(cleaned)
    if bad:
        raise BadInput(f"{what} {name!r} may not contain {bad.group()!r} (no path separators or :*?\"<>|)")
    if cleaned.endswith(".") or cleaned.startswith("."):
        raise BadInput(f"{what} {name!r} may not start or end with '.'")
    if cleaned.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise BadInput(f"{what} {name!r} is a reserved device name on Windows")
    if len(cleaned) > 150:
        raise BadInput(f"{what} {name!r} is longer than 150 characters")
    return cleaned


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; on success fsync and rename it over `path`, on error remove it."""
    if mode not in ("wb", "w"):
        raise ValueError("atomic_open supports 'wb' and 'w' only")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if mode == "w" else {})) as fh:
            yield fh  # type: ignore[misc]
            fh.flush()
            os.fsync(fh.fileno())
        _give_default_mode(tmp, target)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _give_default_mode(tmp: str, target: Path) -> None:
    """mkstemp creates 0600 files; give the result the mode a plain open() would (or the replaced file's mode), so
    a webui running as another user can still read what we write."""
    try:
        mode = target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
    except OSError:
        pass


def _umask() -> int:
    """The process umask without changing it (os.umask would briefly alter it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, then rename)."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
