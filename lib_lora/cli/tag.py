"""`python -m lib_lora tag DIR --tagger wd14|blip ...`: write tags / captions for every image of a folder.

The folder is checked (exists, has images, writable) before a model is downloaded or loaded; captions are written
in one undoable batch (`python -m lib_lora tags DIR --undo` puts them back).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import BadInput
from ..tagging.models import DEFAULT_BLIP_REPO, DEFAULT_WD14_REPO, locate_blip, locate_wd14
from ..tagging.runner import MODES, plan_tagging, run_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="folder of images; captions are written beside them")
    parser.add_argument("--tagger", choices=("wd14", "blip"), default="wd14", help="wd14 = booru tags, blip = a sentence")
    where = parser.add_argument_group("model")
    where.add_argument("--model_repo", default=None,
                       help=f"Hugging Face repo (default {DEFAULT_WD14_REPO} for wd14, {DEFAULT_BLIP_REPO} for blip)")
    where.add_argument("--model_dir", default=None, help="local folder with the model files (no download)")
    where.add_argument("--models_folder", default=None,
                       help="where downloads go (default $LORA_TRAIN_TAGGER_MODELS or ~/.cache/lora-train/models/lora-train-taggers)")
    where.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda")
    out = parser.add_argument_group("captions")
    out.add_argument("--mode", choices=MODES, default="append",
                     help="existing captions: append new tags, prepend them, overwrite, or skip captioned images")
    out.add_argument("--caption_extension", "--caption-extension", default=".txt")
    out.add_argument("--recursive", action="store_true", help="also tag images in subfolders")
    out.add_argument("--exclude", default="", help="comma-separated tags never to write (a,b,c)")
    out.add_argument("--batch_size", type=int, default=8)
    out.add_argument("--workers", type=int, default=None, help="image decode threads (default: CPU count, at most 8)")
    out.add_argument("--freq_top", type=int, default=50, help="tag frequency lines printed at the end (0 = all)")
    wd = parser.add_argument_group("wd14")
    wd.add_argument("--general_threshold", type=float, default=0.35)
    wd.add_argument("--character_threshold", type=float, default=0.85)
    wd.add_argument("--replace_underscores", action="store_true", help="long_hair -> long hair (kaomoji like ^_^ kept)")
    blip = parser.add_argument_group("blip")
    blip.add_argument("--num_beams", type=int, default=3)
    blip.add_argument("--min_length", type=int, default=5, help="tokens")
    blip.add_argument("--max_length", type=int, default=75, help="tokens")
    blip.add_argument("--do_sample", action="store_true", help="nucleus sampling instead of beam search")
    blip.add_argument("--top_p", type=float, default=0.9, help="with --do_sample")


def _load_tagger(args: argparse.Namespace):
    if args.tagger == "wd14":
        from ..tagging.wd14 import Wd14Tagger

        folder = locate_wd14(args.model_repo or DEFAULT_WD14_REPO, args.model_dir, args.models_folder)
        return Wd14Tagger(folder, args.general_threshold, args.character_threshold, args.replace_underscores,
                          device=args.device)
    from ..tagging.blip import BlipCaptioner

    folder = locate_blip(args.model_repo or DEFAULT_BLIP_REPO, args.model_dir, args.models_folder)
    return BlipCaptioner(folder, args.num_beams, args.min_length, args.max_length, args.do_sample, args.top_p,
                         device=args.device)


class _Bar:
    """tqdm when installed (it comes with huggingface_hub), else a plain counter on stderr."""

    def __init__(self, total: int) -> None:
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            self._bar = None
        self.total, self.done = total, 0

    def __call__(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(done - self.done)
        elif done == total or done % 50 == 0:
            print(f"  {done}/{total}", file=sys.stderr)
        self.done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _check_settings(args: argparse.Namespace) -> None:
    """Setting errors before anything is downloaded or loaded."""
    problems = []
    if args.batch_size < 1:
        problems.append(f"--batch_size must be at least 1 (got {args.batch_size})")
    if args.workers is not None and args.workers < 0:
        problems.append(f"--workers must be 0 or more (got {args.workers})")
    for name in ("general_threshold", "character_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            problems.append(f"--{name} must be between 0 and 1 (got {getattr(args, name)})")
    if args.tagger == "blip":
        if args.num_beams < 1:
            problems.append(f"--num_beams must be at least 1 (got {args.num_beams})")
        if not 0 <= args.min_length <= args.max_length:
            problems.append(f"--min_length ({args.min_length}) must be between 0 and --max_length ({args.max_length})")
        if not 0.0 < args.top_p <= 1.0:
            problems.append(f"--top_p must be in (0, 1] (got {args.top_p})")
    if problems:
        raise BadInput("; ".join(problems))


def run(args: argparse.Namespace) -> int:
    _check_settings(args)
    plan = plan_tagging(args.folder, args.mode, args.caption_extension, args.recursive)
    print(f"{len(plan.images)} images in {plan.folder}: {len(plan.to_tag)} to tag"
          + (f", {len(plan.skipped)} already captioned (skipped)" if plan.skipped else ""))
    if not plan.to_tag:
        return 0
    tagger = _load_tagger(args)
    print(f"{args.tagger} on {getattr(tagger, 'provider', '?')}, batch size {args.batch_size}", file=sys.stderr)
    bar = _Bar(len(plan.to_tag))
    try:
        result = run_plan(plan, tagger, args.batch_size, [t for t in args.exclude.split(",") if t.strip()],
                          args.workers, progress=bar)
    finally:
        bar.close()
        tagger.close()
    _report(result, plan, args)
    return 130 if result.interrupted else 0


def _report(result, plan, args) -> None:
    rate = f" ({result.images_per_second:.1f} images/s)" if result.tagged else ""
    print(f"tagged {len(result.tagged)} images in {result.seconds:.1f} s{rate}; {len(result.written)} captions written")
    if result.interrupted:
        print("interrupted: the captions of the images tagged so far were written", file=sys.stderr)
    if result.no_tags:
        print(f"{len(result.no_tags)} images got no tag over the thresholds (their captions were left as they were)")
    if result.failed:
        print(f"{len(result.failed)} images were not tagged:", file=sys.stderr)
        for _, message in result.failed:
            print(f"  {message}", file=sys.stderr)
    if result.frequency and args.tagger == "wd14":  # BLIP sentences are all different: no table
        shown = result.frequency if args.freq_top <= 0 else result.frequency[: args.freq_top]
        width = max(len(tag) for tag, _ in shown)
        print(f"tag frequency ({len(result.frequency)} tags over {len(result.tagged)} images):")
        for tag, count in shown:
            print(f"  {tag:<{width}}  {count}")
        if len(shown) < len(result.frequency):
            print(f"  ... {len(result.frequency) - len(shown)} more (--freq_top 0 shows all)")
    if result.undo is not None:
        print(f"undo this run with: python -m lib_lora tags {plan.folder} --undo")
