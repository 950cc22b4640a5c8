"""Near-duplicate images: find groups by perceptual hash, and move the extra copies aside (never delete).

Why not a plain pHash compare: a 3% crop shifts every low-frequency pattern a little, and on detailed images that
flips as many pHash bits as a different picture does. So every image also gets the hashes of a few slightly cropped
views of itself (3% and 6% off one side, both sides, or none, on each axis), and two images are compared by the
best-aligned pair. Hashes are 256-bit DCT hashes (pHash on a 16x16 block: the same construction as imagehash's
`phash(hash_size=16)`), and a bit only counts where both coefficients sit clearly away from the median: near-median
coefficients flip under JPEG noise alone, which is what makes smooth images (gradients, skies) hash unreliably.
Searching 49 alignments also lets two different pictures with a similar layout line up by chance, so a pair that
passes the hash is confirmed on the best alignment itself: the correlation of the two 16x16 brightness thumbnails
(copies measured >= 0.98, look-alikes <= 0.88). An image with too few reliable bits is "low detail" and is compared
by its 8x8 colour grid instead. Everything looks at brightness, so a grayscale or recoloured version of a picture
is its duplicate too (the colour one is kept).

`--move` journals its plan before touching a file, so an interrupted move is finished on the next run and an image
never ends up separated from its caption.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..captions import caption_path
from ..errors import BadInput, IncompatibleFile
from ..fsutil import atomic_write_bytes, atomic_write_text
from ..imagefiles import DUPLICATES_DIR, IMAGE_EXTENSIONS, iter_image_files, open_image_rgb

MOVE_JOURNAL = ".moves.json"

DEFAULT_THRESHOLD = 32  # differing bits, scaled to 256 compared bits; see docs/dataset-tools.md for the numbers
HASH_SIDE = 16  # 16x16 DCT coefficients -> 256 bits
_DCT_SIZE = HASH_SIDE * 4  # pHash takes the low block of a 4x larger DCT
_THUMB = 128  # grayscale working copy the cropped views are cut from
_CROPS = (1.0, 0.97, 0.94)  # kept fraction of one axis
_ANCHORS = (0.0, 0.5, 1.0)  # where the kept part sits: start, centre, end
_CANDIDATE_BITS = 100  # pairs further apart than this unaligned are never the same picture (crops measured <= 78)
STRONG_BIT = 4.0  # |coefficient - median| (grey levels, orthonormal DCT) for a bit to count
MIN_BITS = 64  # fewer strong bits than this: the hash says too little ("low detail")
LOW_DETAIL_COLOUR_LIMIT = 6.0  # low-detail images: mean |difference| of the 8x8 RGB grids allowed
MIN_CORRELATION = 0.93  # brightness correlation at the best alignment that confirms a hash match
_CHECK_SIDE = 32  # stored brightness thumbnail the confirmation is cut from
_CHECK_COMPARE = 16  # ... and compared at


@dataclass(frozen=True)
class Fingerprint:
    """What the comparison needs from one image (a few hundred bytes, so thousands fit in memory)."""

    path: Path
    width: int
    height: int
    file_size: int
    hashes: np.ndarray  # (views, 4) uint64; row 0 is the whole image
    strong: np.ndarray  # (views, 4) uint64; 1 where the hash bit is reliable
    colour: np.ndarray  # (8, 8, 3) float32 block means
    brightness: np.ndarray  # (32, 32) uint8 thumbnail, for confirming a hash match
    low_detail: bool
    grayscale: bool = False


@dataclass
class DuplicateGroup:
    keep: Path  # the largest image (pixels; then colour, lossless, bytes); never moved
    duplicates: list[Path]  # the others, to be moved by --move
    distances: dict[Path, int | None] = field(default_factory=dict)  # hash distance to `keep`; None: low detail

    @property
    def members(self) -> list[Path]:
        return [self.keep, *self.duplicates]


@dataclass
class DedupeResult:
    root: Path
    groups: list[DuplicateGroup]
    skipped: list[tuple[Path, str]]  # unreadable images: (path, reason)
    scanned: int
    threshold: int


@dataclass(frozen=True)
class Move:
    source: Path
    target: Path
    copy: bool = False  # a caption that an image staying behind reads too


def _dct_matrix(n: int, keep: int) -> np.ndarray:
    """Orthonormal DCT-II rows 0..keep-1, so coefficients are in grey-level units."""
    k = np.arange(keep)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * k * (2 * x + 1) / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(_DCT_SIZE, HASH_SIDE)


def _views() -> list[tuple[float, float, float, float]]:
    """Crop boxes (fractions of width/height: x0, y0, x1, y1) of the views hashed per image; the first is whole."""
    axis = []
    for keep in _CROPS:
        for anchor in _ANCHORS if keep < 1.0 else (0.0,):
            start = (1.0 - keep) * anchor
            axis.append((start, start + keep))
    return [(x0, y0, x1, y1) for x0, x1 in axis for y0, y1 in axis]


_VIEWS = _views()
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


def _dct_block(gray_view: np.ndarray) -> np.ndarray:
    return _DCT @ gray_view @ _DCT.T


def _pack(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits.astype(np.uint8)).view(np.uint64)


def fingerprint_image(img, path: Path = Path(""), file_size: int = 0) -> Fingerprint:
    """Fingerprint an RGB PIL image (the whole image plus its cropped views)."""
    from PIL import Image

    resample = Image.Resampling
    thumb = img.convert("L").resize((_THUMB, _THUMB), resample.BOX)
    hashes, strong = [], []
    for x0, y0, x1, y1 in _VIEWS:
        box = (x0 * _THUMB, y0 * _THUMB, x1 * _THUMB, y1 * _THUMB)
        view = np.asarray(thumb.resize((_DCT_SIZE, _DCT_SIZE), resample.BILINEAR, box=box), dtype=np.float64)
        coeffs = _dct_block(view).ravel()
        median = np.median(coeffs)
        hashes.append(_pack(coeffs > median))
        strong.append(_pack(np.abs(coeffs - median) > STRONG_BIT))
    rgb = img.convert("RGB")
    fine = np.asarray(rgb.resize((8, 8), resample.BOX), dtype=np.float32)
    return Fingerprint(
        path=path,
        width=img.width,
        height=img.height,
        file_size=file_size,
        hashes=np.stack(hashes),
        strong=np.stack(strong),
        colour=fine,
        brightness=np.asarray(thumb.resize((_CHECK_SIDE, _CHECK_SIDE), resample.BOX), dtype=np.uint8),
        low_detail=int(_popcount(strong[0])) < MIN_BITS,
        grayscale=float(np.ptp(fine, axis=-1).max()) <= 6.0,  # R, G and B agree everywhere
    )


def fingerprint_file(path: str | os.PathLike) -> Fingerprint:
    """Fingerprint one image file; raises IncompatibleFile when it cannot be decoded."""
    path = Path(path)
    with open_image_rgb(path, draft_size=(2 * _THUMB, 2 * _THUMB)) as img:
        # the draft decode is smaller than the file for JPEGs: report the real size for "keep the largest"
        from PIL import Image

        with Image.open(path) as header:
            width, height = header.size
            if _exif_rotated(header):
                width, height = height, width
        fp = fingerprint_image(img, path, path.stat().st_size)
    return dataclasses.replace(fp, width=width, height=height)


def _exif_rotated(img) -> bool:
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # a broken EXIF block only affects the reported size  # noqa: BLE001
        return False


def _popcount(xor: np.ndarray) -> np.ndarray:
    """Set bits per row of uint64 words (numpy 1.26 has no bitwise_count)."""
    return _POPCOUNT[xor.view(np.uint8)].reshape(*xor.shape[:-1], -1).sum(-1)


def _scaled_distances(views: Fingerprint, whole: Fingerprint) -> np.ndarray:
    """Differing strong bits of each view of `views` against the whole of `whole`, scaled to 256 compared bits."""
    both = views.strong & whole.strong[0]
    compared = _popcount(both)
    differing = _popcount((views.hashes ^ whole.hashes[0]) & both)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = differing * float(HASH_SIDE * HASH_SIDE) / compared
    return np.where(compared >= MIN_BITS, scaled, np.inf)


def _best_alignment(a: Fingerprint, b: Fingerprint) -> tuple[float, int, bool]:
    """(scaled distance, view index, True if the view is of `a` / False if of `b`) of the closest alignment."""
    forward, backward = _scaled_distances(a, b), _scaled_distances(b, a)
    if forward.min() <= backward.min():
        return float(forward.min()), int(forward.argmin()), True
    return float(backward.min()), int(backward.argmin()), False


def hash_distance(a: Fingerprint, b: Fingerprint) -> int:
    """Differing reliable bits (of 256) between the best-aligned views of `a` and `b`: 0 = same picture, ~128 =
    unrelated; 256 when they share too few reliable bits to compare."""
    best = _best_alignment(a, b)[0]
    return int(round(best)) if np.isfinite(best) else HASH_SIDE * HASH_SIDE


def aligned_correlation(a: Fingerprint, b: Fingerprint, alignment: tuple[float, int, bool] | None = None) -> float:
    """Pearson correlation of the brightness thumbnails at the best alignment (1.0 = identical up to contrast)."""
    from PIL import Image

    _, view, of_a = alignment or _best_alignment(a, b)
    cropped, whole = (a, b) if of_a else (b, a)
    x0, y0, x1, y1 = (v * _CHECK_SIDE for v in _VIEWS[view])
    size = (_CHECK_COMPARE, _CHECK_COMPARE)
    bilinear = Image.Resampling.BILINEAR
    x = np.asarray(Image.fromarray(cropped.brightness).resize(size, bilinear, box=(x0, y0, x1, y1)), dtype=np.float64)
    y = np.asarray(Image.fromarray(whole.brightness).resize(size, bilinear), dtype=np.float64)
    x, y = x.ravel() - x.mean(), y.ravel() - y.mean()
    scale = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / scale) if scale > 0 else 0.0


def colour_distance(a: Fingerprint, b: Fingerprint) -> float:
    """Mean |difference| of the 8x8 RGB block means (0-255)."""
    return float(np.abs(a.colour - b.colour).mean())


def is_duplicate(a: Fingerprint, b: Fingerprint, threshold: int = DEFAULT_THRESHOLD) -> bool:
    if a.low_detail or b.low_detail:
        return a.low_detail and b.low_detail and colour_distance(a, b) <= LOW_DETAIL_COLOUR_LIMIT
    alignment = _best_alignment(a, b)
    return alignment[0] <= threshold + 0.5 and aligned_correlation(a, b, alignment) >= MIN_CORRELATION


def _candidate_pairs(fps: Sequence[Fingerprint], limit: int) -> Iterable[tuple[int, int]]:
    """Index pairs whose whole-image hashes differ in at most `limit` bits (a cheap filter before alignment)."""
    n = len(fps)
    if n < 2:
        return
    bits = np.unpackbits(np.stack([fp.hashes[0] for fp in fps]).view(np.uint8), axis=1).astype(np.float32)
    mask = np.unpackbits(np.stack([fp.strong[0] for fp in fps]).view(np.uint8), axis=1).astype(np.float32)
    signed = (bits * 2.0 - 1.0) * mask  # +-1 on strong bits, 0 elsewhere
    for start in range(0, n, 512):
        compared = mask[start : start + 512] @ mask.T
        agreeing = signed[start : start + 512] @ signed.T
        with np.errstate(divide="ignore", invalid="ignore"):
            dist = (compared - agreeing) / 2.0 * (HASH_SIDE * HASH_SIDE) / compared
        rows, cols = np.nonzero((compared >= MIN_BITS) & (dist <= limit + 0.5))
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if c > i:
                yield i, c


def _low_detail_pairs(fps: Sequence[Fingerprint]) -> Iterable[tuple[int, int]]:
    """Pairs of low-detail images whose 8x8 colour grids agree (their hashes carry no usable signal)."""
    low = [i for i, fp in enumerate(fps) if fp.low_detail]
    if len(low) < 2:
        return
    grids = np.stack([fps[i].colour.ravel() for i in low])
    for start in range(0, len(low), 256):
        dist = np.abs(grids[start : start + 256, None, :] - grids[None, :, :]).mean(-1)
        for r, c in zip(*np.nonzero(dist <= LOW_DETAIL_COLOUR_LIMIT)):
            if c > start + r:
                yield low[start + int(r)], low[int(c)]


_LOSSLESS = (".png", ".bmp")


def _keep_rank(fp: Fingerprint) -> tuple:
    """Which copy stays: most pixels, then colour over grayscale, then PNG/BMP over JPEG/WebP, then the bigger file."""
    lossy = fp.path.suffix.lower() not in _LOSSLESS
    return (-fp.width * fp.height, fp.grayscale, lossy, -fp.file_size, str(fp.path))


def group_duplicates(fps: Sequence[Fingerprint], threshold: int = DEFAULT_THRESHOLD) -> list[DuplicateGroup]:
    """Groups of duplicates: the largest image is kept and every other member is a duplicate of THAT image.

    Pairs are first joined into connected sets, then each set is split around its best image: a chain of small
    steps (video frames, a colour ramp) links pictures whose ends differ completely, and `--move` must never
    put such a picture aside as a "copy" of one it does not resemble."""
    parent = list(range(len(fps)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    limit = max(_CANDIDATE_BITS, threshold)
    pairs = list(_candidate_pairs(fps, limit)) + list(_low_detail_pairs(fps))
    for i, j in pairs:
        if find(i) != find(j) and is_duplicate(fps[i], fps[j], threshold):
            parent[find(j)] = find(i)
    members: dict[int, list[int]] = {}
    for i in range(len(fps)):
        members.setdefault(find(i), []).append(i)
    groups = []
    for indices in members.values():
        ranked = sorted(indices, key=lambda i: _keep_rank(fps[i]))
        while len(ranked) > 1:
            keep = fps[ranked[0]]
            copies = [i for i in ranked[1:] if is_duplicate(keep, fps[i], threshold)]
            ranked = [i for i in ranked[1:] if i not in copies]
            if not copies:
                continue
            others = sorted((fps[i] for i in copies), key=lambda fp: str(fp.path))
            groups.append(
                DuplicateGroup(
                    keep.path,
                    [fp.path for fp in others],
                    {fp.path: None if keep.low_detail else hash_distance(keep, fp) for fp in others},
                )
            )
    return sorted(groups, key=lambda g: str(g.keep))


def dataset_images(folder: str | os.PathLike) -> list[Path]:
    """Every image under `folder` (concept subfolders included), except what was already moved aside."""
    root = Path(folder)
    if not root.is_dir():
        raise BadInput(f"not a folder: {root}" if root.exists() else f"folder does not exist: {root}")
    return list(iter_image_files(root, recursive=True))  # which does not walk into DUPLICATES_DIR


def find_duplicates(
    folder: str | os.PathLike,
    threshold: int = DEFAULT_THRESHOLD,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> DedupeResult:
    """Scan `folder` (recursively) and group near-duplicates. Unreadable images are listed in `skipped`."""
    if not 0 <= threshold <= HASH_SIDE * HASH_SIDE:
        raise BadInput(f"threshold must be between 0 and {HASH_SIDE * HASH_SIDE} (bits of the hash), got {threshold}")
    root = Path(folder)
    files = dataset_images(root)
    if not files:
        raise BadInput(f"no images in {root} (looked for .png .jpg .jpeg .webp .bmp, concept subfolders included)")
    fps: list[Fingerprint] = []
    skipped: list[tuple[Path, str]] = []

    def load(path: Path):
        try:
            return fingerprint_file(path)
        except IncompatibleFile as exc:
            return str(exc.__cause__ or exc)
        except OSError as exc:  # unreadable for permission or I/O reasons
            return str(exc.strerror or exc)

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (path, result) in enumerate(zip(files, pool.map(load, files)), start=1):
            if isinstance(result, Fingerprint):
                fps.append(result)
            else:
                skipped.append((path, result))
            if progress:
                progress(done, len(files))
    return DedupeResult(root, group_duplicates(fps, threshold), skipped, len(files), threshold)


# ---- moving duplicates aside -------------------------------------------------------------------------------


def _free_target(folder: Path, stem: str, suffixes: Sequence[str], taken: set[Path]) -> str:
    """A stem under `folder` for which none of `stem + suffix` exists or is planned ('001', '001-1', ...)."""
    candidate, n = stem, 0
    while any((folder / (candidate + s)).exists() or (folder / (candidate + s)) in taken for s in suffixes):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _same_stem_images(image: Path) -> list[Path]:
    """Images beside `image` that read the same caption file (`1.png` and `1.jpg` both read `1.txt`)."""
    return [p for p in image.parent.iterdir() if p.stem == image.stem and p.suffix.lower() in IMAGE_EXTENSIONS]


def plan_moves(root: str | os.PathLike, groups: Sequence[DuplicateGroup], caption_extension: str = ".txt") -> list[Move]:
    """Where each duplicate and its caption go: DIR/_duplicates/<same subfolder>/<name>, clashes renamed.

    A caption that an image staying behind also reads (same stem) is copied, not moved, so the kept image keeps
    its caption. Copies come first in the plan, then each image followed by its caption.
    """
    root = Path(root)
    target_root = root / DUPLICATES_DIR
    moving = {p.resolve() for g in groups for p in g.duplicates}
    copies: list[Move] = []
    moves: list[Move] = []
    taken: set[Path] = set()
    claimed: set[Path] = set()  # captions already moved by an earlier duplicate
    for group in groups:
        for image in group.duplicates:
            caption = caption_path(image, caption_extension)
            has_caption = caption.is_file()
            folder = target_root / image.parent.resolve().relative_to(root.resolve())
            suffixes = [image.suffix, caption.suffix] if has_caption else [image.suffix]
            stem = _free_target(folder, image.stem, suffixes, taken)
            moves.append(Move(image, folder / (stem + image.suffix)))
            taken.add(folder / (stem + image.suffix))
            if not has_caption:
                continue
            target = folder / (stem + caption.suffix)
            taken.add(target)
            shared = any(p.resolve() not in moving for p in _same_stem_images(image))
            if shared or caption.resolve() in claimed:
                copies.append(Move(caption, target, copy=True))
            else:
                claimed.add(caption.resolve())
                moves.append(Move(caption, target))
    return copies + moves


def _journal_path(root: Path) -> Path:
    return root / DUPLICATES_DIR / MOVE_JOURNAL


def move_duplicates(
    root: str | os.PathLike, groups: Sequence[DuplicateGroup], caption_extension: str = ".txt"
) -> list[Move]:
    """Move every group's duplicates with their captions into DIR/_duplicates/. Nothing is deleted.

    The plan is written to a journal first; `finish_interrupted_moves` completes it after an interrupt, so an
    image and its caption always end up on the same side.
    """
    root = Path(root)
    finish_interrupted_moves(root)
    moves = plan_moves(root, groups, caption_extension)
    if not moves:
        return []
    journal = _journal_path(root)
    try:
        atomic_write_text(journal, json.dumps([[str(m.source), str(m.target), m.copy] for m in moves], ensure_ascii=False))
    except OSError as exc:
        with contextlib.suppress(OSError):
            journal.parent.rmdir()  # only if this call created it empty
        raise BadInput(f"cannot write into {root}: {exc.strerror or exc}; nothing was moved") from exc
    _run_moves(root, moves)
    return moves


def _run_moves(root: Path, moves: Sequence[Move]) -> None:
    """Carry out a journaled plan; safe to run again on a partly done plan (done steps are skipped)."""
    move = moves[0] if moves else None
    try:
        for move in moves:
            if move.target.exists() or not move.source.exists():
                continue  # done by an earlier, interrupted run
            move.target.parent.mkdir(parents=True, exist_ok=True)
            if move.copy:
                atomic_write_bytes(move.target, move.source.read_bytes())
            else:
                os.replace(move.source, move.target)
    except OSError as exc:
        raise BadInput(
            f"moving duplicates stopped at {move.source if move else root}: {exc.strerror or exc}; "
            f"run dedupe --move again to finish (the plan is kept in {_journal_path(root)})"
        ) from exc
    _journal_path(root).unlink(missing_ok=True)


def finish_interrupted_moves(root: str | os.PathLike) -> int:
    """Complete a --move that was interrupted (from its journal); returns how many files were still to move."""
    root = Path(root)
    journal = _journal_path(root)
    if not journal.is_file():
        return 0
    try:
        entries = json.loads(journal.read_text(encoding="utf-8"))
        moves = [Move(Path(source), Path(target), bool(copy)) for source, target, copy in entries]
    except (ValueError, TypeError) as exc:
        raise BadInput(f"the move journal {journal} is damaged ({exc}); move the files by hand, then delete it") from exc
    pending = sum(1 for m in moves if m.source.exists() and not m.target.exists())
    _run_moves(root, moves)
    return pending
