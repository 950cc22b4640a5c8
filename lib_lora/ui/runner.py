"""Runs one queued job: the engine's event stream, translated into the job's fields and the host's progress.

The host gives exclusive use of its model (`training_session`, which yields a Backend and restores everything on
exit, even on failure or interrupt); the engine yields events; here each event updates the job the tab and the
API read, saved epochs get their card sidecar and the host's loader check, and a pause releases the model.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from ..errors import IncompatibleFile, LoraTrainError, TrainingFailed
from .earlier_runs import set_aside_earlier_run
from .jobs import PAUSED, RUNNING, Job


def build_dataset(cfg):
    from ..dataset import Dataset, DatasetOptions

    return Dataset.build(DatasetOptions.from_config(cfg))


def write_card(path: Path, job: Job, sd_version: str) -> None:
    """The Lora card's `<stem>.json` with the project's activation tag and preferred weight (the engine writes one
    with the concept names; the tag chosen in the Tags tab wins)."""
    import json

    from ..network import write_sidecar

    sidecar = path.with_suffix(".json")
    meta = job.meta or {}
    activation = str(meta.get("activation_tag") or "")
    if not activation and sidecar.is_file():
        try:
            activation = json.loads(sidecar.read_text(encoding="utf-8")).get("activation text", "")
        except ValueError:
            activation = ""
    weight = float(meta.get("preferred_weight") or 0.0)
    write_sidecar(path, activation, weight, sd_version, f"LoRA Train project {job.project}, epoch file {path.name}")


CARD_PICTURE = ".preview.png"  # the webui shows <stem>.preview.png (or <stem>.png) as a LoRA card's picture


def write_card_picture(lora: Path, sample: Path) -> Path | None:
    """Copy an epoch's first preview beside its file as `<stem>.preview.png`, so the webui's Lora card shows it
    instead of 'NO PREVIEW'. A picture already there (`<stem>.preview.png` or `<stem>.png`: the user's own, or one
    written before a resume) is never replaced; None then. Only the tab's runs do this, not the CLI."""
    from ..fsutil import atomic_write_bytes

    target = lora.with_name(lora.stem + CARD_PICTURE)
    if target.exists() or lora.with_suffix(".png").exists() or not sample.is_file():
        return None
    atomic_write_bytes(target, sample.read_bytes())
    return target


STEP_FILE = re.compile(r"-step\d{8}\.safetensors$")  # sd-scripts' `<name>-stepNNNNNNNN.safetensors`


def done_message(files) -> str:
    """'done: 3 epoch files, 2 step files': step saves are not epochs (the Test sub-tab lists only epochs)."""
    steps = sum(1 for f in files if STEP_FILE.search(Path(f).name))
    epochs = len(files) - steps
    return f"done: {epochs} epoch file{'s' * (epochs != 1)}" + (f", {steps} step file{'s' * (steps != 1)}" if steps else "")


def drop_removed_file(job: Job, name: str | None) -> None:
    """A step file `save_last_n_steps` removed leaves the job's file list (and its loader check beside it)."""
    if not name:
        return
    for i in reversed(range(len(job.files))):
        if Path(job.files[i]).name == name:
            del job.files[i]
            if i < len(job.checks):
                del job.checks[i]


def make_runner(host):
    """The JobQueue runner for `host`."""

    def run(job: Job) -> None:
        from ..train import events as ev
        from ..train.loop import train  # the engine's loop
        from ..train.checkpoints import removed_file

        host.check_can_train()
        info = host.model_info()
        with host.training_session(job) as backend:
            dataset = build_dataset(job.config)
            if job.config is not None:  # a fresh run: the earlier run's epochs are moved aside, not overwritten
                moved = set_aside_earlier_run(job.config, host.projects_root() / job.project, job.earlier_settings)
                if moved:
                    job.earlier_run = moved
                    job.notes.append(moved)
                    job.message = moved
                    host.refresh_loras()  # the moved files leave the webui's LoRA list
                    host.report(job)
            stream = train(job.config, backend, dataset, job.control)
            # (epoch, step) -> its LoRA file, for the card picture from the previews made with the same weights
            saved: dict[tuple[int, int | None], Path] = {}
            for event in stream:
                if isinstance(event, ev.Started):
                    job.total_steps, job.epochs = event.total_steps, event.epochs
                    job.step = event.start_step
                elif isinstance(event, ev.StepEnd):
                    if job.message and job.notes and job.message == job.notes[-1]:
                        job.message = ""  # a phase note ("encoding every image once") is over once steps run
                    job.step, job.total_steps, job.epoch = event.step, event.total_steps, event.epoch
                    job.loss, job.it_per_s, job.eta_s = event.loss, event.its, event.eta_s
                    job.losses.append((event.step, event.loss))
                elif isinstance(event, ev.EpochEnd):
                    job.epoch = event.epoch
                elif isinstance(event, ev.Saved) and event.kind == "lora":
                    path = Path(event.path)
                    saved[(event.epoch, event.step)] = path
                    write_card(path, job, info.sd_version)
                    job.files.append(str(path))
                    try:
                        job.checks.append(host.check_saved_lora(path))
                    except IncompatibleFile as exc:
                        job.checks.append(f"MISMATCH: {exc}")
                        raise
                    host.refresh_loras()
                elif isinstance(event, ev.Sample):
                    job.samples.extend(event.paths)
                    lora = saved.get((event.epoch, event.step))
                    if lora is not None and event.paths:
                        try:
                            write_card_picture(lora, Path(event.paths[0]))
                        except (OSError, LoraTrainError) as exc:  # a missing card picture must not end the run
                            job.notes.append(f"could not write the card picture of {lora.name}: {exc}")
                elif isinstance(event, ev.Note):
                    job.notes.append(event.message)
                    job.message = event.message
                    drop_removed_file(job, removed_file(event.message))
                elif isinstance(event, ev.Paused):
                    job.status, job.message = PAUSED, f"paused at step {event.step}"
                    host.report(job)
                    with host.pause_gate(job):
                        job.control.wait_while_paused()
                    job.status, job.message = RUNNING, ""
                elif isinstance(event, ev.Interrupted):
                    job.message = event.message or f"interrupted at step {event.step}; saved epochs are kept"
                elif isinstance(event, ev.Failed):
                    raise TrainingFailed(event.message)
                elif isinstance(event, ev.Done):
                    job.message = event.message or done_message(event.files)
                    if event.best_file and Path(event.best_file).name not in job.message:
                        job.message += (f"; lowest validation loss: epoch {event.best_epoch} "
                                        f"({Path(event.best_file).name})")
                host.report(job)
        host.refresh_loras()
        job.eta_s = 0.0
        job.finished = time.time()

    return run
