"""`python -m lib_lora bench <name> ...`: speed and memory figures, never pass/fail tests.

Sub-benchmarks live in lib_lora/bench/<module>.py with `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "train": ("train_step", "training step time, it/s, peak memory, step / bare forward+backward ratio"),
    "tag": ("tagging", "tagging throughput, batched vs one image at a time"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (module, text) in BENCHMARKS.items():
        child = sub.add_parser(name, help=text, description=text)
        try:
            importlib.import_module(f"lib_lora.bench.{module}").add_arguments(child)
        except ModuleNotFoundError:
            child.set_defaults(_missing=module)


def run(args: argparse.Namespace) -> int:
    module = BENCHMARKS[args.benchmark][0]
    return int(importlib.import_module(f"lib_lora.bench.{module}").run(args) or 0)
