"""`python -m lib_lora tags DIR ...`: batch caption edits (each undoable), tag frequency and search.

Edit options can be combined into one operation (one undo step); they apply in the order replace, prune, dedupe,
sort, activation, so the activation tag always ends up first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import BadInput
from ..tagging import edit as edits
from ..tagging.tag_ops import TagEdit, parse_replace, parse_tag_list


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="dataset root or image folder (concept subfolders included)")
    group = parser.add_argument_group("edits (combine freely; one undo step)")
    group.add_argument("--activation", metavar="TAG", help="put TAG first in every caption, once (creates missing captions)")
    group.add_argument("--prune", metavar="TAG[,TAG]", action="append", default=[], help="remove these tags")
    group.add_argument("--replace", metavar="'a,b=c'", action="append", default=[], help="replace tags a and b by c")
    group.add_argument("--dedupe", action="store_true", help="remove a tag repeated within one caption")
    group.add_argument("--sort", action="store_true", help="sort tags alphabetically")
    group.add_argument("--keep-first", type=int, default=0, metavar="N", help="with --sort: leave the first N tags in place")
    group.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")
    query = parser.add_argument_group("other actions (one at a time, not with edits)")
    query.add_argument("--freq", action="store_true", help="tag frequency: one line per tag, the tag then its count")
    query.add_argument("--top", type=int, default=0, metavar="N", help="with --freq: only the N most frequent")
    query.add_argument("--search", metavar="TAG", help="list images whose caption has TAG (* and ? allowed)")
    query.add_argument("--undo", action="store_true", help="restore the captions changed by the last edit")
    query.add_argument("--force", action="store_true",
                       help="with --undo: also put back captions changed after that edit (losing those changes)")
    query.add_argument("--history", action="store_true", help="list the edits that --undo can take back")
    parser.add_argument("--caption-extension", "--caption_extension", default=".txt",
                        help="caption file extension (default .txt)")


def _edit_from(args: argparse.Namespace) -> TagEdit:
    prune = tuple(tag for spec in args.prune for tag in parse_tag_list(spec))
    if args.prune and not prune:
        raise BadInput("--prune needs at least one tag")
    activation = parse_tag_list(args.activation) if args.activation is not None else ()
    if args.activation is not None and not activation:
        raise BadInput("--activation needs a tag")
    if args.keep_first < 0:
        raise BadInput("--keep-first must be 0 or more")
    return TagEdit(
        activation=activation,
        prune=prune,
        replace=tuple(parse_replace(spec) for spec in args.replace),
        dedupe=args.dedupe,
        sort=args.sort,
        keep_first=args.keep_first,
    )


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    edit = _edit_from(args)
    actions = [name for name in ("freq", "search", "undo", "history") if getattr(args, name)]
    if len(actions) > 1 or (actions and not edit.is_empty()):
        chosen = ["--" + a for a in actions] + ([] if edit.is_empty() else ["an edit"])
        raise BadInput(f"choose one action at a time (got {' and '.join(chosen)})")
    if not actions and edit.is_empty():
        raise BadInput("nothing to do: give an edit (--activation, --prune, --replace, --dedupe, --sort) or --freq, --search, --undo")
    if args.force and actions != ["undo"]:
        raise BadInput("--force goes with --undo only")
    if actions == ["freq"]:
        return _freq(root, args)
    if actions == ["search"]:
        return _search(root, args)
    if actions == ["undo"]:
        return _undo(root, args.force)
    if actions == ["history"]:
        return _history(root)
    return _edit(root, edit, args)


def _edit(root: Path, edit: TagEdit, args: argparse.Namespace) -> int:
    plan = edits.plan_tag_edit(root, edit, args.caption_extension)
    total = len(edits.list_captions(root, args.caption_extension))
    created = f" ({plan.created} new caption files)" if plan.created else ""
    if args.dry_run:
        for line in edits.diff_lines(plan, root):
            print(line)
        print(f"{plan.label}: would change {len(plan.changes)} of {total} captions{created} (dry run: nothing written)")
        return 0
    entry = edits.apply_plan(root, plan)
    changed = entry.files if entry else 0
    print(f"{plan.label}: changed {changed} of {total} captions{created}")
    if entry:
        print(f"undo with: python -m lib_lora tags {root} --undo")
    return 0


def _freq(root: Path, args: argparse.Namespace) -> int:
    table = edits.frequency(root, args.caption_extension)
    if args.top > 0:
        table = table[: args.top]
    width = min(max((len(tag) for tag, _ in table), default=0), 40)
    for tag, count in table:
        print(f"{tag:<{width}}  {count}")
    return 0


def _search(root: Path, args: argparse.Namespace) -> int:
    hits = edits.search(root, args.search, args.caption_extension)
    base = root.resolve()
    for item in hits:
        print(item.image.resolve().relative_to(base).as_posix())
    total = len(edits.list_captions(root, args.caption_extension))
    print(f"{len(hits)} of {total} images have '{args.search}'", file=sys.stderr)
    return 0


def _undo(root: Path, force: bool = False) -> int:
    entry = edits.undo(root, force=force)
    if entry is None:
        print(f"nothing to undo in {root}")
        return 0
    print(f"undid '{entry.label}': {entry.files} caption(s) restored")
    return 0


def _history(root: Path) -> int:
    if not root.is_dir():
        raise BadInput(f"folder does not exist: {root}")
    entries = edits.history(root)
    if not entries:
        print(f"no edits to undo in {root}")
    for number, entry in enumerate(reversed(entries), start=1):
        print(f"{number}. {entry.label} ({entry.files} captions)")
    return 0
