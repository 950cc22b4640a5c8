"""`python -m lib_lora check DIR`: what is wrong with a dataset before training, grouped, with a fix per problem."""

from __future__ import annotations

import argparse
import json

from ..tagging.check import DEFAULT_MAX_SIDE, DEFAULT_MIN_SIDE, CheckReport, check_dataset

_SHOWN_PER_GROUP = 25

# the fixes this CLI has a command for (the report's own are host-neutral)
CLI_FIXES = {
    "interrupted_move": "run python -m lib_lora dedupe DIR --move to finish it (images and captions stay paired)",
    "missing_caption": "caption them (python -m lib_lora tag DIR); without one the folder name is the caption",
    "empty_caption": "write the tags or run python -m lib_lora tag DIR --mode skip",
    "activation_missing": "python -m lib_lora tags DIR --activation TAG puts it first in every caption "
                          "(check --activation TAG names the tag instead of guessing it)",
    "activation_not_first": "python -m lib_lora tags DIR --activation TAG moves it first (keep_tokens relies on that)",
    "tokens_over_150": "shorten them or train with --max_token_length 225",
    "tokens_over_75": "shorten them or train with --max_token_length 150 (or 225)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="dataset root (with N_concept folders) or one folder of images")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--min-side", type=int, default=DEFAULT_MIN_SIDE, help="warn below this shortest side (px)")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="warn above this longest side (px)")
    parser.add_argument("--activation", default=None, help="activation tag every caption should hold (default: guessed)")
    parser.add_argument("--caption-extension", "--caption_extension", default=".txt",
                        help="caption file extension (default .txt)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size for the steps-per-epoch figure")
    parser.add_argument("--all", action="store_true", help=f"list every file (default: {_SHOWN_PER_GROUP} per problem)")


def run(args: argparse.Namespace) -> int:
    report = check_dataset(
        args.dir,
        min_side=args.min_side,
        max_side=args.max_side,
        activation=args.activation,
        caption_extension=args.caption_extension,
        batch_size=args.batch_size,
    )
    if args.json:
        print(json.dumps(report.to_dict(CLI_FIXES), indent=2, ensure_ascii=False))
    else:
        print("\n".join(format_report(report, None if args.all else _SHOWN_PER_GROUP)))
    return 1 if report.errors else 0


def format_report(report: CheckReport, limit: int | None = _SHOWN_PER_GROUP) -> list[str]:
    """The report for people: the step arithmetic, then each problem with its files and one line on the fix."""
    kind = "dataset root with concept folders" if report.layout == "concepts" else "one folder of images"
    lines = [f"{report.root} ({kind})"]
    names = {c.folder: (report.root.resolve().name if c.folder == "." else c.folder) for c in report.concepts}
    width = max([len(n) for n in names.values()] + [8])
    for c in report.concepts:
        name = names[c.folder]
        if c.repeats is None:
            lines.append(f"  {name:<{width}}  {c.images:>5} images  no N_ prefix: not trained")
        else:
            lines.append(
                f"  {name:<{width}}  {c.images:>5} images x {c.repeats:>3} repeats = {c.steps:>6} steps"
                f"   ({c.captions} captioned{f'; {c.unreadable} unreadable not counted' if c.unreadable else ''})"
            )
    per_batch = f" at batch size {report.batch_size}" if report.batch_size > 1 else " (batch size 1)"
    lines.append(f"  steps per epoch: {report.steps_per_epoch}{per_batch}")
    for severity, title, fix, items in report.groups(CLI_FIXES):
        lines.append("")
        lines.append(f"{severity.upper()}: {title} ({len(items)})")
        shown = items if limit is None else items[:limit]
        for f in shown:
            lines.append(f"  {f.path}" + (f": {f.detail}" if f.detail else ""))
        if len(items) > len(shown):
            lines.append(f"  ... and {len(items) - len(shown)} more (--all or --json lists them)")
        lines.append(f"  fix: {fix}")
    lines.append("")
    verdict = "ok" if not report.errors else "not ready to train"
    lines.append(f"{report.errors} error(s), {report.warnings} warning(s): {verdict}")
    return lines
