"""`python -m lib_lora train`: sd-scripts' option names, `--config_file`, a progress bar; multi-GPU through
`accelerate launch -m lib_lora train ...`.

Every option of TrainConfig is an argument of the same name (generated from the config's field table). As in
sd-scripts, `--config_file` supplies values and options given on the command line override them.
Ctrl-C once: finish the current step, save a resumable state, restore and exit; twice: stop at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import typing
from typing import Any

from ..errors import BadInput
from ..train.config import TrainConfig, field_info, field_names, field_types

# sd-scripts flags accepted for pasted command lines and ignored (they tune sd-scripts' own machinery)
_IGNORED_FLAGS = ("xformers", "sdpa", "mem_eff_attn", "persistent_data_loader_workers", "lowram", "highvram",
                  "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "no_half_vae", "full_fp16", "full_bf16")
_IGNORED_VALUES = ("max_data_loader_n_workers", "save_model_as", "vae_batch_size", "log_prefix")


# matched case-insensitively / through aliases by config_io.coerce ("adamw8bit", save_precision "float")
_LENIENT_CHOICES = ("optimizer_type", "lr_scheduler", "save_precision")

# what the CLI does not do yet (the tab may): said in --help, refused when given
_CLI_LIMITS: dict[str, str] = {}


def _warmup(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def _type_for(name: str):
    tp = field_types()[name]
    kinds = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    if name == "lr_warmup_steps":
        return _warmup
    return {int: int, float: float}.get(kinds[0], str)


EPILOG = (
    "Ctrl-C once finishes the current step, saves <output_name>-state (in output_dir, or state_dir) and exits with "
    "130; --resume with that folder continues to the weights of a run that never stopped. Twice stops at once. "
    "Several GPUs: accelerate launch --multi_gpu --num_processes N -m lib_lora train ... "
    "Booleans also take --no-<name>; sd-scripts' --use_8bit_adam / --use_lion_optimizer still work, and its "
    "--xformers, --sdpa, --max_data_loader_n_workers, ... are accepted and ignored."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--config_file", help="settings file: TOML (ours or sd-scripts') or a kohya_ss GUI .json preset; "
                        "options given here override it")
    parser.add_argument("--output_config", metavar="PATH", help="write the combined settings to this TOML file and exit")
    for name in field_names():
        if name == "config_version":
            continue
        info = field_info(name)
        tp = field_types()[name]
        text = info["help"]
        if name in _LENIENT_CHOICES and info["choices"]:
            text += f" (one of: {', '.join(info['choices'])}; any letter case)"
        if name in _CLI_LIMITS:
            text += f" ({_CLI_LIMITS[name]})"
        opts: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text.replace("%", "%%")}  # argparse %-formats help
        if tp is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **opts)
        elif typing.get_origin(tp) is tuple:
            parser.add_argument(f"--{name}", nargs="*", metavar="K=V", **opts)
        else:
            if info["choices"] and name not in _LENIENT_CHOICES:
                opts["choices"] = list(info["choices"])
            parser.add_argument(f"--{name}", type=_type_for(name), **opts)
    for flag in ("use_8bit_adam", "use_lion_optimizer"):
        parser.add_argument(f"--{flag}", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for flag in _IGNORED_FLAGS:
        parser.add_argument(f"--{flag}", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for flag in _IGNORED_VALUES:
        parser.add_argument(f"--{flag}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace, notes: list[str]) -> TrainConfig:
    """sd-scripts' rule: the config file's values, then every option given on the command line on top."""
    from ..train.config_io import coerce, load_config_file
    from ..train.dataset_config import apply_dataset_config

    given = {k: v for k, v in vars(args).items() if k not in ("config_file", "output_config", "command") and not k.startswith("_")}
    base = load_config_file(args.config_file, notes) if getattr(args, "config_file", None) else TrainConfig()
    ignored = sorted(k for k in given if k in _IGNORED_FLAGS or k in _IGNORED_VALUES)
    if ignored:
        notes.append(f"ignored (sd-scripts options with no effect here): {', '.join(ignored)}")
    if str(given.get("save_model_as", "safetensors")).lower() != "safetensors":
        raise BadInput("save_model_as: LoRA files are always written as .safetensors")
    if given.pop("use_8bit_adam", False):
        given.setdefault("optimizer_type", "AdamW8bit")
    if given.pop("use_lion_optimizer", False):
        given.setdefault("optimizer_type", "Lion")
    values = {k: coerce(k, v) for k, v in given.items() if k in field_names()}
    # sd-scripts' --dataset_config: its values win over the options above; train_data_dir / reg_data_dir are ignored
    return apply_dataset_config(dataclasses.replace(base, **values), notes, given=values)


class _Progress:
    """A tqdm bar on the main process (plain lines when tqdm is missing or output is not a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def start(self, total: int, initial: int) -> None:
        if not self.enabled or not sys.stdout.isatty():  # a log file gets plain lines, not carriage returns
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout)

    def step(self, ev) -> None:
        if self.bar is not None:
            self.bar.update(ev.step - self.bar.n)
            self.bar.set_postfix(epoch=ev.epoch, loss=f"{ev.loss:.4f}", avg=f"{ev.avg_loss:.4f}", lr=f"{ev.lr:.2e}", refresh=False)
        elif self.enabled and (ev.step % 10 == 0 or ev.step == ev.total_steps):
            print(f"step {ev.step}/{ev.total_steps} epoch {ev.epoch} loss {ev.loss:.4f} avg {ev.avg_loss:.4f} "
                  f"lr {ev.lr:.2e} {ev.its:.2f} it/s eta {ev.eta_s / 60:.1f} min", flush=True)

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _install_interrupt(control):
    """First Ctrl-C: a graceful stop at the next step boundary; the second one interrupts at once.
    Returns the previous handler (None when not in the main thread)."""
    def handler(signum, frame):
        if control.stop_requested:
            raise KeyboardInterrupt
        control.stop()
        print("\nstopping after this step, VAE batch or preview image (the state is saved once training has begun); "
              "press Ctrl-C again to stop at once", file=sys.stderr, flush=True)

    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        return None


def run(args: argparse.Namespace) -> int:
    from ..train import events as E
    from ..train.config_io import save_toml
    from ..train.dist import init_distributed
    from ..train.state import resolve_seed
    from ..train.steps import plan_from_folders
    from ..train.validate import errors_of, validate

    notes: list[str] = []
    cfg = config_from_args(args, notes)
    if args.output_config:
        for note in notes:
            print(f"note: {note}")
        save_toml(cfg, args.output_config)
        print(f"settings written to {args.output_config}")
        return 0
    dist = init_distributed()
    say = print if dist.is_main else (lambda *a, **k: None)
    for note in notes:
        say(f"note: {note}")
    problems = validate(cfg)
    for problem in problems:
        say(str(problem), file=sys.stderr)
    if errors_of(problems):
        return 1
    cfg = resolve_seed(cfg)
    say(f"steps: {plan_from_folders(cfg, dist.world).describe(cfg)}")

    from ..train.loop import train
    from ..train.state import build_dataset

    dataset = build_dataset(cfg)
    if not cfg.dry_run:  # a dry run reports the whole summary (skipped files included) with its measurements
        for s in dataset.skipped:
            say(f"skipped {s.path}: {s.reason}")
        _say_missing_captions(dataset, cfg.caption_extension, say, subsets=bool(cfg.dataset_config))
    backend = _load_backend(cfg, dist.device())
    control = E.TrainControl()
    previous = _install_interrupt(control)
    progress = _Progress(dist.is_main)
    code = 0
    try:
        for ev in train(cfg, backend, dataset, control):
            if isinstance(ev, E.Started):
                say(f"training: {ev.summary} (seed {ev.seed})")
                if ev.start_step:
                    say(f"resuming after step {ev.start_step} of {ev.total_steps}")
                progress.start(ev.total_steps, ev.start_step)
            elif isinstance(ev, E.StepEnd):
                progress.step(ev)
            elif isinstance(ev, E.Validation):
                progress.say(f"validation loss after epoch {ev.epoch}: {ev.loss:.5f} ({ev.images} images)")
            elif isinstance(ev, E.Saved):
                progress.say(f"saved {ev.path}")
            elif isinstance(ev, E.Sample):
                progress.say(f"samples: {', '.join(ev.paths)}")
            elif isinstance(ev, E.Note):
                progress.say(f"note: {ev.message}")
            elif isinstance(ev, E.DryRun):
                progress.close()
                for line in ev.lines:
                    say(line)
            elif isinstance(ev, E.Interrupted):
                progress.close()
                say(ev.message or f"stopped at step {ev.step}; resume with --resume {ev.state_path}")
                code = 130
            elif isinstance(ev, E.Failed):
                progress.close()
                print(f"error: {ev.message}", file=sys.stderr)
                code = 1
            elif isinstance(ev, E.Done):
                progress.close()
                say(f"done: {ev.step} steps, {len(ev.files)} file(s)" + (f"; {ev.message}" if ev.message else ""))
    finally:
        progress.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return code


def _say_missing_captions(dataset, extension: str, say, subsets: bool = False) -> None:
    """Images without a caption file train on their folder's concept name; a wrong caption_extension makes that
    every image, so it is said before the run (sd-scripts warns too)."""
    per_folder: dict[str, int] = {}
    for placed in getattr(dataset, "images", ()):
        if placed.entry.caption_missing:
            per_folder[placed.entry.folder] = per_folder.get(placed.entry.folder, 0) + 1
    if per_folder:
        total = sum(per_folder.values())
        folders = ", ".join(f"{name} ({n})" for name, n in per_folder.items())
        fallback = "their subset's class_tokens (an empty caption without them)" if subsets else "their folder's concept name"
        say(f"note: {total} image{'s' if total != 1 else ''} {'have' if total != 1 else 'has'} no {extension} caption file "
            f"and train on {fallback}: {folders}")


def _load_backend(cfg: TrainConfig, device):
    """The model for the CLI: a diffusers folder or a single-file checkpoint, through lib_lora.backends. On a GPU
    with fp16/bf16 mixed precision the base weights load in that dtype (half the memory; the VAE stays fp32).
    `--vae` replaces the model's VAE (an ldm-named file or a diffusers folder, in the run's VAE dtype)."""
    from ..backends import load_backend

    half = cfg.mixed_precision if device.type == "cuda" and cfg.mixed_precision in ("fp16", "bf16") else None
    return load_backend(cfg.pretrained_model_name_or_path, device=device, dtype=half, vae_dtype="fp32" if half else None,
                        prediction_type="v_prediction" if cfg.v_parameterization else None, vae=cfg.vae or None)
