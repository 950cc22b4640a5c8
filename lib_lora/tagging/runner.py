"""Tag a dataset folder with any tagger: decode in threads while the model runs, then write every caption at once.

Why this shape:
- Decoding and resizing JPEGs (not the model) bounds tagging speed on a GPU, so images are decoded by a thread
  pool a few batches ahead while the main thread runs the model (PIL, numpy and onnxruntime / torch all release
  the GIL in their heavy parts).
- All captions of a run go through one `write_captions` call: one journal entry, so `undo_last` (the `tags --undo`
  command and the tab's Undo) puts the whole run back, byte for byte. An interrupt or a model failure still
  writes what was finished before re-raising / returning, and each file is replaced atomically.
- Writability is checked before the model loads, so a read-only folder costs seconds, not an hour of tagging.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from ..captions import (
    UndoEntry, caption_path, join_tags, locked_message, read_caption, read_only_files, split_tags, write_captions,
)
from ..errors import BadInput, LoraTrainError
from ..imagefiles import IMAGE_EXTENSIONS, iter_image_files
from .tag_ops import dedupe, tag_frequency, tag_key

MODES = ("append", "prepend", "overwrite", "skip")


class Tagger(Protocol):
    """What the runner needs from a tagger (Wd14Tagger, BlipCaptioner)."""

    name: str
    max_batch: int | None  # a model compiled for a fixed batch (1) caps --batch_size

    def prepare(self, path: Path) -> Any: ...  # decode + preprocess; called from worker threads

    def tag_batch(self, prepared: list[Any]) -> list[list[str]]: ...

    def close(self) -> None: ...


@dataclass
class TagPlan:
    """What a run will do, known before any model loads."""

    folder: Path
    mode: str
    caption_extension: str
    images: list[Path]
    to_tag: list[Path]
    skipped: list[Path]  # mode 'skip': the image already has a non-empty caption
    shared: list[tuple[Path, str]] = field(default_factory=list)  # images that share a caption file: not tagged


@dataclass
class TagRunResult:
    folder: Path
    images: int
    tagged: list[Path] = field(default_factory=list)  # images the model tagged
    written: list[Path] = field(default_factory=list)  # caption files that changed
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # unreadable images, not tagged
    no_tags: list[Path] = field(default_factory=list)  # nothing over threshold: caption left as it was
    frequency: list[tuple[str, int]] = field(default_factory=list)  # tags produced, most frequent first
    undo: UndoEntry | None = None
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def images_per_second(self) -> float:
        return len(self.tagged) / self.seconds if self.seconds > 0 else 0.0


ProgressFn = Callable[[int, int], None]  # (done, total)


def plan_tagging(
    folder: str | os.PathLike,
    mode: str = "append",
    caption_extension: str = ".txt",
    recursive: bool = False,
) -> TagPlan:
    """List the images to tag and check the folder can take the captions; raises BadInput with the reason."""
    if mode not in MODES:
        raise BadInput(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    if ext.lower() in IMAGE_EXTENSIONS or ext in (".", "") or any(c in ext for c in "/\\"):
        raise BadInput(f"caption extension {caption_extension!r} is not usable for caption files")
    root = Path(folder).expanduser()
    images = list(iter_image_files(root, recursive=recursive))  # BadInput if the folder does not exist
    if not images:
        where = " or its subfolders" if recursive else ""
        kinds = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
        hint = "" if recursive or not any(p.is_dir() for p in root.iterdir()) else "; use --recursive for subfolders"
        raise BadInput(f"no images in {root}{where} (looked for {kinds}){hint}")
    to_tag, skipped = [], []
    shared = _sharing_a_caption(images, ext)
    for image in images:
        cap = caption_path(image, ext)
        if mode == "skip" and cap.is_file() and read_caption(cap):
            skipped.append(image)
        elif image not in shared:
            to_tag.append(image)
    if to_tag:
        check_writable({root} | {p.parent for p in to_tag})
        locked = read_only_files(caption_path(p, ext) for p in to_tag)
        if locked:
            raise BadInput(f"{locked_message(root, locked)}; nothing was tagged or changed")
    return TagPlan(root, mode, ext, images, to_tag, skipped, sorted(shared.items()))


def _sharing_a_caption(images: list[Path], ext: str) -> dict[Path, str]:
    """Images whose caption file another image also reads (`1.png` + `1.jpg` -> `1.txt`), with the reason. Tagging
    them would give one of the two the other's tags, so they are listed instead (`check` reports them too)."""
    by_caption: dict[str, list[Path]] = {}
    for image in images:
        by_caption.setdefault(str(caption_path(image, ext)).casefold(), []).append(image)
    out = {}
    for group in by_caption.values():
        if len(group) > 1:
            names = " and ".join(sorted(p.name for p in group))
            cap = caption_path(group[0], ext).name
            for image in group:
                out[image] = f"{image}: {names} share {cap}; rename one so each image has its own caption"
    return out


def check_writable(folders: Iterable[Path]) -> None:
    """Create and delete a temp file in each folder: the one test that sees read-only mounts, ACLs and flags."""
    for folder in sorted(set(folders)):
        try:
            fd, tmp = tempfile.mkstemp(prefix=".lora_train_write_test.", dir=folder)
            os.close(fd)
            os.unlink(tmp)
        except OSError as exc:
            raise BadInput(
                f"cannot write captions in {folder}: {exc.strerror or exc}; nothing was tagged or changed"
            ) from exc


def iter_tagged(
    paths: Sequence[Path],
    tagger: Tagger,
    batch_size: int = 8,
    workers: int | None = None,
    prefetch_batches: int = 2,
) -> Iterator[tuple[Path, list[str] | None, str | None]]:
    """Yield (image, tags, None) or (image, None, error) in input order.

    `workers=0` decodes in the calling thread (the one-at-a-time baseline); otherwise a pool of `workers`
    threads (default: CPU count, at most 8) keeps `prefetch_batches` batches decoded ahead of the model.
    """
    if batch_size < 1:
        raise BadInput(f"--batch_size must be at least 1, got {batch_size}")
    if tagger.max_batch:
        batch_size = min(batch_size, tagger.max_batch)
    if workers == 0:
        yield from _iter_sequential(paths, tagger, batch_size)
        return
    workers = workers or min(8, os.cpu_count() or 1)
    ahead = batch_size * (prefetch_batches + 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tag-decode")
    pending: deque[tuple[Path, Future]] = deque()
    todo = iter(paths)
    exhausted = False

    def fill() -> None:
        nonlocal exhausted
        while not exhausted and len(pending) < ahead:
            path = next(todo, None)
            if path is None:
                exhausted = True
            else:
                pending.append((path, pool.submit(_prepare, tagger, path)))

    batch: list[tuple[Path, Any]] = []
    try:
        fill()
        while pending:
            path, future = pending.popleft()
            prepared, error = future.result()
            fill()
            if error is not None:
                yield path, None, error
                continue
            batch.append((path, prepared))
            if len(batch) == batch_size:
                yield from _run_batch(tagger, batch)  # the pool keeps decoding the next batches meanwhile
                batch = []
        if batch:
            yield from _run_batch(tagger, batch)
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True)


def _iter_sequential(paths, tagger, batch_size):
    batch = []
    for path in paths:
        prepared, error = _prepare(tagger, path)
        if error is not None:
            yield path, None, error
            continue
        batch.append((path, prepared))
        if len(batch) == batch_size:
            yield from _run_batch(tagger, batch)
            batch = []
    if batch:
        yield from _run_batch(tagger, batch)


def _prepare(tagger: Tagger, path: Path) -> tuple[Any, str | None]:
    """Decode one image; a file that cannot be read is reported, not fatal (the rest still get tagged)."""
    try:
        return tagger.prepare(path), None
    except LoraTrainError as exc:
        return None, str(exc)
    except (OSError, ValueError, MemoryError) as exc:
        return None, f"cannot read image {path}: {exc}"
    except Exception as exc:  # PIL's DecompressionBombError and friends
        if type(exc).__module__.startswith("PIL"):
            return None, f"cannot read image {path}: {exc}"
        raise


def _run_batch(tagger: Tagger, batch: list[tuple[Path, Any]]):
    results = _tag_splitting_on_oom(tagger, [prepared for _, prepared in batch])
    for (path, _), tags in zip(batch, results):
        yield path, tags, None


def is_out_of_memory(exc: BaseException) -> bool:
    """torch ('CUDA out of memory'), onnxruntime ('Failed to allocate memory') and plain MemoryError."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "failed to allocate memory" in text


def _tag_splitting_on_oom(tagger: Tagger, prepared: list[Any]) -> list[list[str]]:
    """Run a batch; when it does not fit in memory, run its halves instead (down to one image)."""
    try:
        return tagger.tag_batch(prepared)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        if len(prepared) == 1:
            raise BadInput(
                f"out of memory tagging a single image ({str(exc).strip().splitlines()[0][:200]}); "
                "close other GPU work, use --device cpu or a smaller model"
            ) from exc
    half = len(prepared) // 2
    return _tag_splitting_on_oom(tagger, prepared[:half]) + _tag_splitting_on_oom(tagger, prepared[half:])


def merge_caption(old: str, new_tags: Sequence[str], mode: str) -> str:
    """The caption after tagging. append / prepend keep the old text as written and add only tags it lacks."""
    if mode == "overwrite" or not old:
        return join_tags(list(new_tags))
    # Training reads the first line only (as sd-scripts does): new tags go there, later lines (notes) stay as they are.
    first, _, rest = old.replace("\r\n", "\n").partition("\n")
    have = {tag_key(t) for t in split_tags(first)}
    fresh = [t for t in new_tags if tag_key(t) not in have]
    if not fresh:
        return old
    old_text = first.strip().strip(",").strip()
    line = f"{old_text}, {join_tags(fresh)}" if mode == "append" else f"{join_tags(fresh)}, {old_text}"
    return line.strip(", ") + (f"\n{rest}" if rest else "")


def run_plan(
    plan: TagPlan,
    tagger: Tagger,
    batch_size: int = 8,
    exclude: Iterable[str] = (),
    workers: int | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TagRunResult:
    """Tag `plan.to_tag` and write all changed captions in one undoable batch.

    Ctrl-C or `should_stop()` (checked after every image) ends the run early: what was tagged so far is still
    written and `interrupted` is set.
    """
    excluded = {tag_key(t) for t in exclude if t.strip()}
    result = TagRunResult(plan.folder, len(plan.images), skipped=list(plan.skipped), failed=list(plan.shared))
    produced: list[list[str]] = []
    made: dict[Path, tuple[Path, list[str]]] = {}  # caption file -> (its image, the tags the image got)
    edits: dict[Path, str] = {}
    total = len(plan.to_tag)
    start = time.perf_counter()
    failure: BaseException | None = None
    try:
        for done, (path, tags, error) in enumerate(iter_tagged(plan.to_tag, tagger, batch_size, workers), 1):
            if error is not None:
                result.failed.append((path, error))
            else:
                result.tagged.append(path)
                kept = list(dedupe([t for t in tags or [] if tag_key(t) not in excluded]))
                produced.append(kept)
                if not kept:
                    result.no_tags.append(path)
                else:
                    made[caption_path(path, plan.caption_extension)] = (path, kept)
            if progress:
                progress(done, total)
            if should_stop and should_stop():
                result.interrupted = True
                break
    except KeyboardInterrupt:
        result.interrupted = True
    except BaseException as exc:  # a model failure must not throw away the captions already made
        failure = exc
    result.seconds = time.perf_counter() - start
    # Merged with the captions as they are now, not as they were when each image was tagged: a caption the user
    # edited during a long run (in the tab) keeps that edit, and in 'skip' mode one captioned meanwhile is left alone.
    for cap, (image, kept) in made.items():
        try:
            old = read_caption(cap) if cap.is_file() else ""
        except OSError as exc:  # e.g. its permissions changed meanwhile: the other captions are still written
            result.failed.append((image, f"cannot read caption {cap}: {exc.strerror or exc}"))
            continue
        if plan.mode == "skip" and old:
            continue
        new = merge_caption(old, kept, plan.mode)
        if new != old:
            edits[cap] = new
    if edits:
        result.undo = write_captions(plan.folder, edits, f"tag {tagger.name} ({plan.mode})")
        result.written = sorted(edits)
    result.frequency = tag_frequency(produced)
    if failure is not None:
        raise failure
    if total and not result.tagged and result.failed and not result.interrupted:
        first = result.failed[0][1]
        raise BadInput(f"none of the {len(result.failed)} images could be read (first: {first})")
    return result


def tag_folder(
    folder: str | os.PathLike,
    tagger: Tagger,
    mode: str = "append",
    caption_extension: str = ".txt",
    recursive: bool = False,
    batch_size: int = 8,
    exclude: Iterable[str] = (),
    workers: int | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TagRunResult:
    """Plan + run in one call (the Python API the tab uses)."""
    plan = plan_tagging(folder, mode, caption_extension, recursive)
    return run_plan(plan, tagger, batch_size, exclude, workers, progress, should_stop)
