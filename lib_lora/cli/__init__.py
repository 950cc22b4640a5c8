"""Command-line entry: `python -m lib_lora <command> ...`.

Each command lives in its own module `lib_lora.cli.<module>` exposing `add_arguments(parser)` and `run(args) -> int`.
Only the chosen command's module is imported, so `python -m lib_lora tags ...` never pays for torch.
Library code raises `LoraTrainError`; this is the one place that turns it into a message and an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from ..errors import LoraTrainError

# command name -> (module under lib_lora.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a LoRA / LoCon (sd-scripts option names)"),
    "merge": ("merge", "merge LoRA files into a checkpoint"),
    "inspect": ("inspect", "show what a LoRA file holds"),
    "check": ("check", "check a dataset folder for problems"),
    "dedupe": ("dedupe", "find near-duplicate images"),
    "tag": ("tag", "tag or caption images (WD14, BLIP)"),
    "tags": ("tags", "edit captions: activation tag, prune, replace, undo, ..."),
    "bench": ("bench", "benchmarks (training step, tagging)"),
    "ui": ("ui", "serve the LoRA Train tab as a standalone app"),
}


def _load(command: str):
    module_name, _ = COMMANDS[command]
    return importlib.import_module(f"{__name__}.{module_name}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m lib_lora <command> [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<9} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, rest = argv[0], argv[1:]
    try:
        module = _load(command)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(f"{__name__}."):
            print(f"error: the '{command}' command is not available in this build", file=sys.stderr)
            return 2
        print(f"error: '{command}' needs the Python package '{exc.name}', which is not installed", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"python -m lib_lora {command}", description=COMMANDS[command][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except LoraTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` that closed early: not an error, and no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout again at exit
        return 0
