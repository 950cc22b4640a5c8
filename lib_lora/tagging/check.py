"""Pre-flight dataset check: every problem a training run would trip over (or silently work around), found before
the run, each with the file it is in and a one-line fix.

Why here and not in the dataset loader: the loader skips what it cannot use (a folder without `N_`, a GIF, a
caption past 75 tokens) and training goes on with a different dataset than the user thinks. The check names it.
It works on a dataset root holding `N_concept` folders or on one flat folder of images.
"""

from __future__ import annotations

import io
import os
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..captions import read_caption, split_tags
from ..dataset.scan import parse_concept_folder
from ..errors import BadInput, LoraTrainError
from ..imagefiles import IMAGE_EXTENSIONS, TOOL_FOLDERS
from .dedupe import DUPLICATES_DIR, MOVE_JOURNAL
from .tag_ops import parse_tag_list, tag_key

# code -> (severity, title, fix). Order here is the order of the report. The fix says what to do without naming a
# command or a button: the same report is read in a terminal and in the tab. A host adds its own words for the
# codes it has a tool for (`fix_for(code, host_fixes)`: lib_lora/cli/check.py, lib_lora/ui/tab_dataset.py).
CHECKS: dict[str, tuple[str, str, str]] = {
    "no_images": ("error", "no images to train on", "put .png/.jpg/.webp images in N_concept folders (e.g. 10_mychar)"),
    "unreadable": ("error", "unreadable or truncated images", "re-export or delete these files; they cannot be decoded"),
    "same_stem": ("error", "images that share one caption file", "rename so each image has its own name: 1.png and 1.jpg both read 1.txt"),
    "interrupted_move": ("warning", "an interrupted duplicate move", "move the duplicates aside again: the move finishes first (images and captions stay paired)"),
    "no_repeats_prefix": ("warning", "concept folders without the N_ repeats prefix", "rename to e.g. 10_name (10 = repeats); trainers that follow sd-scripts skip these folders"),
    "loose_images": ("warning", "images beside the concept folders", "move them into an N_concept folder; images in the dataset root are not trained"),
    "nested_images": ("warning", "images in folders inside a concept folder", "move them up into the concept folder; subfolders are not read"),
    "zero_repeats": ("warning", "concept folders with 0 repeats", "rename with a repeat count of 1 or more"),
    "empty_concept": ("warning", "concept folders without images", "add images or remove the folder"),
    "unsupported_format": ("warning", "files in formats training skips", "convert them to PNG or JPG"),
    "too_small": ("warning", "images smaller than the minimum side", "use larger originals; small images are upscaled and come out soft"),
    "too_large": ("warning", "very large images", "downscale to about 2048 px on the long side; huge images slow caching and use RAM"),
    "animated": ("warning", "animated images", "only the first frame is used; export the frame you want as PNG"),
    "transparency": ("warning", "images with transparent pixels", "flatten them on the background you want; transparent areas are trained as white"),
    "grayscale": ("warning", "grayscale images", "the LoRA may learn grayscale: tag them 'monochrome, greyscale' or remove them"),
    "missing_caption": ("warning", "images without a caption", "caption them with a tagger or by hand; without one the folder name is the caption"),
    "orphan_caption": ("warning", "captions without an image", "delete them or restore the image with the same name"),
    "empty_caption": ("warning", "empty captions", "write the tags, or run a tagger that leaves captioned images alone"),
    "multiline_caption": ("warning", "captions on several lines", "join them into one line; sd-scripts reads only the first line"),
    "activation_missing": ("warning", "captions without the activation tag", "put the activation tag first in every caption"),
    "tokens_over_225": ("warning", "captions over 225 CLIP tokens", "shorten them: tokens past 225 are cut off even with max_token_length 225"),
    "tokens_over_150": ("warning", "captions over 150 CLIP tokens", "shorten them or train with max_token_length 225"),
    "tokens_over_75": ("warning", "captions over 75 CLIP tokens", "shorten them or train with max_token_length 150 (or 225)"),
    "activation_not_first": ("info", "captions where the activation tag is not first", "move the activation tag first in every caption (keep_tokens relies on that)"),
    "token_count_skipped": ("info", "caption lengths not counted", "install open-clip-torch (for CLIP's vocabulary) and transformers"),
    "flat_folder": ("info", "one flat folder of images", "to set repeats, put it in a folder named N_name (e.g. 10_mychar)"),
}

UNSUPPORTED_EXTENSIONS = {
    ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF", ".avif": "AVIF", ".heic": "HEIC", ".heif": "HEIF",
    ".jxl": "JPEG XL", ".jfif": "JFIF (a JPEG: rename to .jpg)", ".jp2": "JPEG 2000", ".ico": "ICO", ".psd": "PSD",
    ".svg": "SVG", ".tga": "TGA", ".dds": "DDS", ".exr": "EXR", ".hdr": "HDR", ".ppm": "PPM", ".pgm": "PGM",
    ".pbm": "PBM", ".pcx": "PCX", ".dng": "DNG (camera raw)", ".cr2": "CR2 (camera raw)", ".nef": "NEF (camera raw)",
    ".arw": "ARW (camera raw)", ".raw": "RAW",
}
_COUNT_TAG = re.compile(r"^(\d\+?(girls?|boys?|others?)|solo|no humans|multiple (girls|boys)|(male|female) focus)$")
DEFAULT_MIN_SIDE = 512
DEFAULT_MAX_SIDE = 4096


def fix_for(code: str, host_fixes: Mapping[str, str] | None = None) -> str:
    """The fix line of `code` in the host's words (its tools by name) where it has them, else the neutral one."""
    return (host_fixes or {}).get(code) or CHECKS[code][2]


@dataclass(frozen=True)
class Finding:
    code: str
    path: str  # relative to the checked folder, '/'-separated ('.' for the folder itself)
    detail: str = ""

    @property
    def severity(self) -> str:
        return CHECKS[self.code][0]


@dataclass
class Concept:
    folder: str  # relative path ('.' for a flat folder)
    repeats: int | None  # None: no N_ prefix (not trained by sd-scripts-style trainers)
    images: int = 0  # images training will use: readable ones (the dataset scan leaves the others out)
    captions: int = 0
    unreadable: int = 0  # image files that cannot be decoded, not in `images` nor in the steps

    @property
    def steps(self) -> int:
        return self.images * (self.repeats or 0)


@dataclass
class CheckReport:
    root: Path
    layout: str  # "concepts" (a root of N_concept folders) or "flat" (one folder of images)
    concepts: list[Concept]
    findings: list[Finding]
    batch_size: int = 1
    activation: tuple[str, ...] = ()

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def errors(self) -> int:
        return self.count("error")

    @property
    def warnings(self) -> int:
        return self.count("warning")

    @property
    def images(self) -> int:
        """Image files found, unreadable ones included (each concept's `images` counts only those training uses)."""
        return sum(c.images + c.unreadable for c in self.concepts)

    @property
    def steps_per_epoch(self) -> int:
        """Images x repeats over all concepts, divided by the batch size (rounded up, as sd-scripts does)."""
        total = sum(c.steps for c in self.concepts)
        return -(-total // self.batch_size)

    def groups(self, host_fixes: Mapping[str, str] | None = None) -> list[tuple[str, str, str, list[Finding]]]:
        """(severity, title, fix in the host's words, findings) per kind of problem, in report order: what a
        report for people lists."""
        by_code: dict[str, list[Finding]] = {}
        for finding in self.findings:
            by_code.setdefault(finding.code, []).append(finding)
        return [(*CHECKS[code][:2], fix_for(code, host_fixes), found) for code, found in by_code.items()]

    def to_dict(self, host_fixes: Mapping[str, str] | None = None) -> dict[str, Any]:
        """JSON-ready; the `checks` table's fixes in the host's words (see `fix_for`)."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "concepts": [
                {"folder": c.folder, "repeats": c.repeats, "images": c.images, "captions": c.captions,
                 "unreadable": c.unreadable, "steps": c.steps}
                for c in self.concepts
            ],
            "images": self.images,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "errors": self.errors,
            "warnings": self.warnings,
            "findings": [{"code": f.code, "severity": f.severity, "path": f.path, "detail": f.detail} for f in self.findings],
            "checks": {code: {"severity": s, "title": t, "fix": fix_for(code, host_fixes)}
                       for code, (s, t, _) in CHECKS.items()},
        }


@dataclass
class ImageInfo:
    width: int
    height: int
    frames: int = 1
    transparent: bool = False
    grayscale: bool = False


def _truncated(data: bytes, fmt: str | None) -> bool:
    """End-of-file markers, checked on the bytes so the answer does not depend on PIL's LOAD_TRUNCATED_IMAGES."""
    if fmt == "PNG":
        return b"IEND" not in data[-64:]
    if fmt == "JPEG":
        last_scan = data.rfind(b"\xff\xda")
        return last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0
    return False


def inspect_image(path: str | os.PathLike) -> ImageInfo:
    """Decode one image fully and describe what training will see; raises IncompatibleFile when it cannot."""
    from PIL import Image, UnidentifiedImageError

    from ..errors import IncompatibleFile

    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            if _truncated(data, img.format):
                raise IncompatibleFile("the file is truncated (its end is missing)")
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            frames = getattr(img, "n_frames", 1)
            img.load()
            info = ImageInfo(width, height, frames)
            has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
            if has_alpha:
                info.transparent = img.convert("RGBA").getchannel("A").getextrema()[0] < 255
            info.grayscale = _is_grayscale(img)
            return info
    except UnidentifiedImageError as exc:  # its message names our in-memory buffer, not the file
        raise IncompatibleFile("not an image (unknown format or damaged start of file)") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise IncompatibleFile(str(exc) or type(exc).__name__) from exc


def _is_grayscale(img) -> bool:
    if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    import numpy as np

    small = np.asarray(img.convert("RGB").resize((64, 64)), dtype=np.int16)
    spread = np.abs(small[..., 0] - small[..., 1]) + np.abs(small[..., 1] - small[..., 2])
    return int(spread.max()) <= 6


def count_tokens_fn(tokenizer: Any = None) -> Callable[[str], int]:
    """Caption -> CLIP tokens, without the start/end tokens (what the 75/150/225 limits count)."""
    if tokenizer is None:
        from ..clip_tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()
    # verbose=False: no "sequence longer than 77" warning per long caption (counting long ones is the point)
    return lambda text: len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])


def _relative(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel or "."


def _layout(root: Path) -> tuple[str, list[tuple[Path, int | None]], list[Path]]:
    """('concepts' | 'flat', [(concept folder, repeats)], loose images in the root)."""
    entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    folders = [p for p in entries if p.is_dir() and p.name not in TOOL_FOLDERS]
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    prefixed = [p for p in folders if parse_concept_folder(p.name)]
    if prefixed or (folders and not loose):
        return "concepts", [(p, _repeats(p.name)) for p in folders], loose
    own = _repeats(root.resolve().name)
    return "flat", [(root, own if own is not None else 1)], []


def _repeats(name: str) -> int | None:
    """The repeat count of an `N_concept` folder name (the training scan's own rule), None without one."""
    parsed = parse_concept_folder(name)
    return parsed[0] if parsed else None


def check_dataset(
    folder: str | os.PathLike,
    min_side: int = DEFAULT_MIN_SIDE,
    max_side: int = DEFAULT_MAX_SIDE,
    activation: str | Sequence[str] | None = None,
    caption_extension: str = ".txt",
    batch_size: int = 1,
    tokenizer: Any = None,
    workers: int | None = None,
) -> CheckReport:
    """Check a dataset root (N_concept folders) or one flat folder; see CHECKS for what is looked at."""
    root = Path(folder)
    if not root.is_dir():
        raise BadInput(f"not a folder: {root}" if root.exists() else f"folder does not exist: {root}")
    if min_side < 1 or max_side < min_side:
        raise BadInput(f"--min-side ({min_side}) must be at least 1 and not above --max-side ({max_side})")
    if batch_size < 1:
        raise BadInput(f"--batch-size must be at least 1, got {batch_size}")
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    wanted = parse_tag_list(activation) if isinstance(activation, str) else tuple(activation or ())
    layout, concept_dirs, loose = _layout(root)
    findings: list[Finding] = [Finding("loose_images", _relative(p, root)) for p in loose]
    if (root / DUPLICATES_DIR / MOVE_JOURNAL).is_file():
        findings.append(Finding("interrupted_move", f"{DUPLICATES_DIR}/{MOVE_JOURNAL}"))
    if layout == "flat" and _repeats(root.resolve().name) is None:
        findings.append(Finding("flat_folder", ".", "counted with 1 repeat (the folder name has no N_ prefix)"))
    concepts: list[Concept] = []
    concept_files: dict[str, tuple[list[Path], set[Path]]] = {}
    images: list[Path] = []
    captions: dict[Path, str] = {}
    for directory, repeats in concept_dirs:
        concept = Concept(_relative(directory, root), repeats)
        concepts.append(concept)
        found, concept_captions = _scan_concept(directory, root, ext, findings)  # counted after the image checks
        concept_files[concept.folder] = (found, set(concept_captions))
        images += found
        captions.update(concept_captions)
        if repeats is None and found:
            findings.append(Finding("no_repeats_prefix", concept.folder, f"{len(found)} image{'' if len(found) == 1 else 's'} not trained"))
        elif repeats == 0 and found:
            findings.append(Finding("zero_repeats", concept.folder))
        elif not found:
            findings.append(Finding("empty_concept", concept.folder))
        _check_activation(concept, found, concept_captions, wanted, root, findings)
    if not images:
        findings.insert(0, Finding("no_images", ".", "looked for .png .jpg .jpeg .webp .bmp"))
    image_findings = _check_images(images, root, min_side, max_side, workers)
    findings += image_findings
    _leave_out_unreadable(concepts, concept_files, image_findings, root, ext)
    findings += _check_tokens(captions, root, tokenizer)
    order = {code: i for i, code in enumerate(CHECKS)}
    findings.sort(key=lambda f: (order[f.code], f.path))
    return CheckReport(root, layout, concepts, findings, batch_size, wanted)


def _leave_out_unreadable(
    concepts: list[Concept], concept_files: dict[str, tuple[list[Path], set[Path]]], findings: list[Finding],
    root: Path, ext: str,
) -> None:
    """Count only the images training will use: the dataset scan skips files it cannot decode."""
    broken = {f.path for f in findings if f.code == "unreadable"}
    for concept in concepts:
        found, captions = concept_files.get(concept.folder, ([], set()))
        usable = [p for p in found if _relative(p, root) not in broken]
        concept.unreadable = len(found) - len(usable)
        concept.images = len(usable)
        concept.captions = sum(1 for img in usable if img.with_suffix(ext) in captions)


def _scan_concept(directory: Path, root: Path, ext: str, findings: list[Finding]) -> tuple[list[Path], dict[Path, str]]:
    """Images of one concept folder and their caption texts; adds the file-level findings."""
    files = sorted((p for p in directory.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    images = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    unsupported = [p for p in files if p.is_file() and p.suffix.lower() in UNSUPPORTED_EXTENSIONS]
    for p in unsupported:
        findings.append(Finding("unsupported_format", _relative(p, root), UNSUPPORTED_EXTENSIONS[p.suffix.lower()]))
    for sub in (p for p in files if p.is_dir() and p.name not in TOOL_FOLDERS):
        nested = [p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
        if nested:
            findings.append(Finding("nested_images", _relative(sub, root), f"{len(nested)} images"))
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in images:
        by_stem[p.stem.casefold()].append(p)
    for group in by_stem.values():
        if len(group) > 1:
            names = " + ".join(p.name for p in group)
            findings.append(Finding("same_stem", _relative(group[0], root), f"{names} -> {group[0].stem}{ext}"))
    stems = {p.stem.casefold() for p in images + unsupported}
    captions: dict[Path, str] = {}
    for cap in (p for p in files if p.is_file() and p.suffix == ext):
        if cap.stem.casefold() not in stems:
            findings.append(Finding("orphan_caption", _relative(cap, root)))
            continue
        try:
            captions[cap] = read_caption(cap)
        except OSError as exc:
            findings.append(Finding("unreadable", _relative(cap, root), f"caption: {exc.strerror or exc}"))
    for img in images:
        text = captions.get(img.with_suffix(ext))
        if text is None:
            findings.append(Finding("missing_caption", _relative(img, root)))
        elif not text:
            findings.append(Finding("empty_caption", _relative(img.with_suffix(ext), root)))
        elif "\n" in text:
            findings.append(Finding("multiline_caption", _relative(img.with_suffix(ext), root), f"{text.count(chr(10)) + 1} lines"))
    return images, captions


def _check_activation(
    concept: Concept, images: list[Path], captions: dict[Path, str], wanted: tuple[str, ...], root: Path, findings: list[Finding]
) -> None:
    """Missing activation tags: the given one, else a guess (the first tag of most of the concept's captions)."""
    tagged = {cap: split_tags(text) for cap, text in captions.items() if text}
    if not tagged:
        return
    guessed = ""
    keys = [tag_key(t) for t in wanted]
    if not keys:
        firsts = Counter(tag_key(tags[0]) for tags in tagged.values())
        key, n = firsts.most_common(1)[0]
        if len(tagged) < 3 or n < 0.6 * len(tagged) or n == len(tagged) or _COUNT_TAG.match(key):
            return
        keys = [key]
        guessed = f" (guessed: first tag of {n} of {len(tagged)} captions in {concept.folder})"
    for cap, tags in sorted(tagged.items()):
        tag_keys = [tag_key(t) for t in tags]
        missing = [k for k in keys if k not in tag_keys]
        if missing:
            findings.append(Finding("activation_missing", _relative(cap, root), f"no '{', '.join(missing)}'{guessed}"))
        elif wanted and tag_keys[: len(keys)] != keys:
            findings.append(Finding("activation_not_first", _relative(cap, root), f"first tag is '{tags[0]}'"))


def _check_images(images: list[Path], root: Path, min_side: int, max_side: int, workers: int | None) -> list[Finding]:
    def one(path: Path) -> list[Finding]:
        rel = _relative(path, root)
        try:
            info = inspect_image(path)
        except LoraTrainError as exc:
            return [Finding("unreadable", rel, str(exc))]
        out = []
        size = f"{info.width}x{info.height}"
        if min(info.width, info.height) < min_side:
            out.append(Finding("too_small", rel, f"{size}, shortest side under {min_side}"))
        if max(info.width, info.height) > max_side:
            out.append(Finding("too_large", rel, f"{size}, longest side over {max_side}"))
        if info.frames > 1:
            out.append(Finding("animated", rel, f"{info.frames} frames"))
        if info.transparent:
            out.append(Finding("transparency", rel))
        if info.grayscale:
            out.append(Finding("grayscale", rel))
        return out

    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        return [f for found in pool.map(one, images) for f in found]


def _check_tokens(captions: dict[Path, str], root: Path, tokenizer: Any) -> list[Finding]:
    texts = {cap: text for cap, text in captions.items() if text}
    if not texts:
        return []
    try:
        count = count_tokens_fn(tokenizer)
    except (LoraTrainError, ImportError, OSError) as exc:
        return [Finding("token_count_skipped", ".", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)]
    out = []
    for cap, text in sorted(texts.items()):
        n = count(text)
        for limit in (225, 150, 75):
            if n > limit:
                out.append(Finding(f"tokens_over_{limit}", _relative(cap, root), f"{n} tokens"))
                break
    return out
