"""`python -m lib_lora merge --model IN --lora A.safetensors:0.8 [--lora B:0.5] --out OUT [--precision fp16]`."""

from __future__ import annotations

import argparse
import math
import sys

from ..errors import BadInput


def parse_lora_spec(text: str) -> tuple[str, float]:
    """`PATH[:MULTIPLIER]`; the multiplier is the part after the last `:` when it is a number (so `C:\\x` works)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            value = float(tail)
        except ValueError:
            if head.lower().endswith(".safetensors"):  # `a.safetensors:0,8`: a typo, not part of a file name
                raise BadInput(f"multiplier {tail!r} in {text!r} is not a number (e.g. {head}:0.8)") from None
            return text, 1.0
        if not math.isfinite(value):
            raise BadInput(f"multiplier in {text!r} must be a finite number")
        return head, value
    return text, 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint to merge into (.safetensors, or .ckpt read weights-only)")
    parser.add_argument("--lora", required=True, action="append", metavar="FILE[:MULTIPLIER]",
                        help="LoRA / LoCon .safetensors file and its multiplier (default 1.0); repeat for several")
    parser.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default=None,
                        help="cast every weight of the output to this type (default: keep each tensor's type)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--allow-missing", action="store_true",
                        help="skip LoRA modules the checkpoint has no weight for instead of refusing (they are listed)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from ..merge import merge_loras

    loras = [parse_lora_spec(spec) for spec in args.lora]
    show = not args.quiet and sys.stderr.isatty()
    last = [-1]

    def progress(done: int, total: int) -> None:
        percent = int(100 * done / max(total, 1))
        if percent != last[0]:
            last[0] = percent
            print(f"\rmerging... {percent:3d}%", end="", file=sys.stderr, flush=True)

    try:
        report = merge_loras(args.model, loras, args.out, precision=args.precision, overwrite=args.overwrite,
                             progress=progress if show else None, allow_missing=args.allow_missing)
    finally:
        if show and last[0] >= 0:
            print("", file=sys.stderr)
    print(report.summary())
    return 0
