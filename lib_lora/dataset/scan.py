"""Reading a dataset folder: `N_concept` sub-folders, their images and captions, and what had to be left out.

This is the only part of the dataset that walks folders. Every image is decoded once here (`imagefiles.image_size`:
JPEGs at reduced scale, the size as `open_image_rgb` returns it after EXIF rotation): a broken file is found and
listed before training starts, never half-way through an epoch, and buckets use the size after rotation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..captions import caption_path, read_caption
from ..errors import BadInput, IncompatibleFile
from ..imagefiles import TOOL_FOLDERS, image_size, is_image_file, iter_image_files

Size = tuple[int, int]
_CONCEPT = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class ImageEntry:
    path: Path
    key: str  # "<root>/<folder>/<file>", unique within one dataset (root: train, reg or validation)
    folder: str  # the concept folder's name, e.g. "10_mychar" (the key of ss_tag_frequency / ss_dataset_dirs)
    concept: str  # "mychar"
    repeats: int  # from the folder name
    is_reg: bool
    caption: str  # first line of the caption file, or the concept name when there is none
    caption_missing: bool
    size: Size  # (width, height) after EXIF rotation


@dataclass(frozen=True)
class Concept:
    folder: Path
    name: str
    repeats: int
    is_reg: bool
    images: tuple[ImageEntry, ...]

    @property
    def captions_missing(self) -> int:
        return sum(1 for e in self.images if e.caption_missing)


@dataclass(frozen=True)
class Subset:
    """One image folder of an sd-scripts dataset config (`[[datasets.subsets]]`, DreamBooth style): images directly
    in `image_dir`; the folder's name decides nothing (repeats and class tokens are given here)."""

    image_dir: str
    num_repeats: int = 1
    class_tokens: str | None = None  # caption of images without a caption file (None: an empty caption)
    is_reg: bool = False
    caption_extension: str | None = None  # None: DatasetOptions.caption_extension
    name: str = ""  # how messages name it, e.g. "subset 2 of [[datasets]] 1"


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass(frozen=True)
class ScanResult:
    concepts: tuple[Concept, ...]
    skipped: tuple[Skipped, ...]  # images that cannot be used (broken, unreadable caption)
    ignored: tuple[Skipped, ...]  # folders without a repeat count, images outside concept folders

    @property
    def images(self) -> tuple[ImageEntry, ...]:
        return tuple(e for c in self.concepts for e in c.images)


def parse_concept_folder(name: str) -> tuple[int, str] | None:
    """"10_my_char" -> (10, "my_char"); None when the name does not start with a repeat count."""
    match = _CONCEPT.match(name)
    if not match:
        return None
    return int(match.group(1)), match.group(2)


def read_image_caption(image: Path, extension: str) -> str | None:
    """The caption beside `image` (first line, stripped), or None when there is no file or it is empty."""
    path = caption_path(image, extension)
    if not path.is_file():
        return None
    text = read_caption(path)
    first = text.splitlines()[0].strip() if text else ""
    return first or None


# (path, modification time, bytes) -> (width, height), or the reason it cannot be read. The tab's live step count
# asks on every keystroke which images training will use; decoding each again would make typing lag.
_CHECKED: dict[tuple[str, int, int], Size | str] = {}
_CHECKED_MAX = 100_000


def checked_image_size(path: Path) -> Size:
    """`image_size` (the whole file decoded once), remembered until the file changes. Raises IncompatibleFile for
    an unreadable image, again from memory when asked again."""
    try:
        st = path.stat()
    except OSError as exc:
        raise IncompatibleFile(f"cannot read image {path}: {exc.strerror or exc}") from exc
    key = (str(path), st.st_mtime_ns, st.st_size)
    known = _CHECKED.get(key)
    if known is None:
        try:
            known = image_size(path)
        except IncompatibleFile as exc:
            known = _cause(exc)
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = known
    if isinstance(known, str):
        raise IncompatibleFile(f"cannot read image {path}: {known}") from OSError(known)
    return known


def usable_image_count(folder: Path) -> tuple[int, int]:
    """(images the scan will use, unreadable ones) in one concept folder, by the scan's own test."""
    usable = unreadable = 0
    for path in iter_image_files(folder):
        try:
            checked_image_size(path)
        except IncompatibleFile:
            unreadable += 1
        else:
            usable += 1
    return usable, unreadable


def _scan_folder(folder: Path, root_tag: str, repeats: int, concept: str, is_reg: bool, caption_extension: str,
                 skipped: list[Skipped]) -> Concept:
    images = []
    for path in iter_image_files(folder):
        try:
            size = checked_image_size(path)
            caption = read_image_caption(path, caption_extension)
        except IncompatibleFile as exc:
            skipped.append(Skipped(path, f"unreadable image ({_cause(exc)})"))
            continue
        except OSError as exc:
            skipped.append(Skipped(path, f"unreadable caption ({exc.strerror or exc})"))
            continue
        images.append(
            ImageEntry(
                path=path,
                key=f"{root_tag}/{folder.name}/{path.name}",
                folder=folder.name,
                concept=concept,
                repeats=repeats,
                is_reg=is_reg,
                caption=caption if caption is not None else concept,
                caption_missing=caption is None,
                size=size,
            )
        )
    return Concept(folder, concept, repeats, is_reg, tuple(images))


def _cause(exc: IncompatibleFile) -> str:
    cause = exc.__cause__
    return str(cause) if cause is not None else str(exc)


def scan_root(root: str | Path, caption_extension: str = ".txt", is_reg: bool = False,
              root_tag: str | None = None) -> ScanResult:
    """Scan `root`'s `N_concept` folders (train_data_dir or reg_data_dir layout). Raises BadInput when `root`
    is missing; an empty result is for the caller to judge (it knows whether the folder was required)."""
    root = Path(root)
    if not root.is_dir():
        what = "reg_data_dir" if is_reg else "train_data_dir"
        raise BadInput(f"{what} does not exist or is not a folder: {root}")
    tag = root_tag or ("reg" if is_reg else "train")
    concepts: list[Concept] = []
    skipped: list[Skipped] = []
    ignored: list[Skipped] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or (entry.name in TOOL_FOLDERS and entry.is_dir()):
            continue  # hidden, or made by our own tools (duplicates moved aside): not the user's to name
        if entry.is_file():
            if is_image_file(entry):
                ignored.append(Skipped(entry, "image outside an N_concept folder (move it into e.g. 10_concept/)"))
            continue
        if not entry.is_dir():
            continue
        parsed = parse_concept_folder(entry.name)
        if parsed is None:
            ignored.append(Skipped(entry, "folder name has no repeat count (name it N_concept, e.g. 10_mychar)"))
            continue
        repeats, concept = parsed
        if repeats < 1:
            ignored.append(Skipped(entry, "repeat count 0 (the folder would never be used)"))
            continue
        concepts.append(_scan_folder(entry, tag, repeats, concept, is_reg, caption_extension, skipped))
    return ScanResult(tuple(concepts), tuple(skipped), tuple(ignored))


def scan_validation_dir(root: str | Path, caption_extension: str = ".txt") -> ScanResult:
    """A validation folder: images directly in it (caption from their files, else empty) and/or sub-folders
    (`N_` prefixes allowed and ignored: validation images are seen once). Raises BadInput when missing."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"validation_data_dir does not exist or is not a folder: {root}")
    skipped: list[Skipped] = []
    concepts = []
    top = _scan_folder(root, "validation", 1, "", False, caption_extension, skipped)
    if top.images:
        concepts.append(top)
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in TOOL_FOLDERS:
            parsed = parse_concept_folder(entry.name)
            concept = parsed[1] if parsed else entry.name
            found = _scan_folder(entry, "validation", 1, concept, False, caption_extension, skipped)
            if found.images:
                concepts.append(found)
    return ScanResult(tuple(concepts), tuple(skipped), ())


def scan_subsets(subsets, caption_extension: str = ".txt") -> tuple[ScanResult, ScanResult]:
    """(training, reg) scans of dataset-config subsets. Raises BadInput naming the subset when its image_dir is
    missing; a subset without images is listed in `ignored` (sd-scripts skips it with a warning)."""
    results: dict[bool, tuple[list[Concept], list[Skipped], list[Skipped]]] = {False: ([], [], []), True: ([], [], [])}
    keys_used: set[tuple[str, str]] = set()
    for n, sub in enumerate(subsets, 1):
        folder = Path(sub.image_dir)
        label = sub.name or f"subset {n}"
        if not folder.is_dir():
            raise BadInput(f"{label}: image_dir does not exist or is not a folder: {folder}")
        tag = "reg" if sub.is_reg else "train"
        if (tag, folder.name) in keys_used:  # two image_dirs with one name: keep image keys (seeds, caches) apart
            tag = f"{tag}{n}"
        keys_used.add((tag, folder.name))
        concepts, skipped, ignored = results[sub.is_reg]
        concept = _scan_folder(folder, tag, sub.num_repeats, sub.class_tokens or "", sub.is_reg,
                               sub.caption_extension or caption_extension, skipped)
        if concept.images:
            concepts.append(concept)
        else:
            ignored.append(Skipped(folder, f"{label} holds no readable image directly in image_dir"))
    return tuple(ScanResult(tuple(c), tuple(s), tuple(i)) for c, s, i in (results[False], results[True]))
