"""`python -m lib_lora dedupe DIR`: near-duplicate groups; `--move` puts the extra copies in DIR/_duplicates/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..imagefiles import IMAGE_EXTENSIONS
from ..tagging.dedupe import DEFAULT_THRESHOLD, DUPLICATES_DIR, HASH_SIDE, find_duplicates, finish_interrupted_moves, move_duplicates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="dataset root or image folder (concept subfolders are searched too)")
    parser.add_argument(
        "--threshold",
        type=int,
        default=DEFAULT_THRESHOLD,
        help=f"most differing hash bits (of {HASH_SIDE * HASH_SIDE}) for two images to count as copies "
        f"(default {DEFAULT_THRESHOLD}; lower = stricter)",
    )
    parser.add_argument("--move", action="store_true", help=f"move all but the largest of each group into DIR/{DUPLICATES_DIR}/")
    parser.add_argument("--caption-extension", "--caption_extension", default=".txt",
                        help="caption file extension moved with each image")


def _show(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if args.move and root.is_dir():
        finished = finish_interrupted_moves(root)
        if finished:
            print(f"finished an interrupted move: {finished} file(s) moved into {DUPLICATES_DIR}/")

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() and (done == total or done % 25 == 0):
            print(f"\rhashing {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    result = find_duplicates(root, args.threshold, progress=progress)
    for path, reason in result.skipped:
        print(f"skipped (unreadable): {_show(path, root)}: {reason}")
    extra = sum(len(g.duplicates) for g in result.groups)
    print(f"{result.scanned} images, {len(result.groups)} duplicate group(s), {extra} extra copies (threshold {result.threshold})")
    for number, group in enumerate(result.groups, start=1):
        print(f"group {number}:")
        print(f"  keep  {_show(group.keep, root)}")
        for dup in group.duplicates:
            distance = group.distances.get(dup)
            how = "same colours, little detail" if distance is None else f"distance {distance}"
            print(f"  copy  {_show(dup, root)}  ({how})")
    if args.move and result.groups:
        moves = move_duplicates(root, result.groups, args.caption_extension)
        images = sum(1 for m in moves if m.source.suffix.lower() in IMAGE_EXTENSIONS)
        print(f"moved {images} image(s) and {len(moves) - images} caption(s) into {_show(root / DUPLICATES_DIR, root)}/")
    elif result.groups:
        print(f"nothing moved; --move puts the copies into {DUPLICATES_DIR}/ (the largest of each group stays)")
    return 0
