"""What a training run reports, and the flags a host sets to steer it.

`train()` yields these events; the CLI draws a progress bar from them, the tab shows them live, tests assert on
them. The run listens to a `TrainControl` only at optimizer-step boundaries, so a stop or pause never leaves a
half-applied update behind.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    """Base class of everything `train()` yields."""


@dataclass(frozen=True)
class Started(Event):
    total_steps: int
    epochs: int
    steps_per_epoch: int
    start_step: int  # > 0 when resumed
    seed: int
    summary: str  # the step plan in words


@dataclass(frozen=True)
class Note(Event):
    message: str  # something the user should know that does not stop the run


@dataclass(frozen=True)
class StepEnd(Event):
    step: int  # optimizer steps done (1-based count)
    total_steps: int
    epoch: int  # 1-based
    step_in_epoch: int
    loss: float  # this step's loss (mean over its accumulated batches)
    avg_loss: float  # mean over the epoch so far
    lr: float  # the first group's lr (UNet, or the text encoder when only it trains)
    its: float  # optimizer steps per second, recent average
    eta_s: float  # seconds left at that speed


@dataclass(frozen=True)
class EpochEnd(Event):
    epoch: int
    avg_loss: float
    step: int


@dataclass(frozen=True)
class Validation(Event):
    epoch: int  # 0 = before training
    loss: float
    images: int


@dataclass(frozen=True)
class Saved(Event):
    path: str
    epoch: int  # epochs finished when it was written (a step file's `ss_epoch`, as in sd-scripts)
    kind: str = "lora"  # "lora" or "state"
    step: int | None = None  # set for a step file / step state (save_every_n_steps, save now); None at an epoch end


@dataclass(frozen=True)
class Sample(Event):
    epoch: int  # the epoch of an epoch-end preview; for a step preview, the epochs finished before it
    paths: tuple[str, ...]
    step: int | None = None  # set for previews of sample_every_n_steps


@dataclass(frozen=True)
class Paused(Event):
    step: int


@dataclass(frozen=True)
class Continued(Event):
    step: int


@dataclass(frozen=True)
class Interrupted(Event):
    step: int
    state_path: str  # resume from here (`--resume`); "" when nothing was trained yet
    message: str = ""  # what hosts say instead of "stopped at step N" (a stop before training began)

    @classmethod
    def while_caching(cls, step: int, resume: str, cache) -> "Interrupted":
        """A stop during latent caching: no step ran, so there is no new state; say what the cache kept."""
        cached = cache.encoded + cache.reused
        kept = "kept on disk for the next run" if cache.to_disk else "held in memory only, so not kept"
        again = f"resume again with --resume {resume}" if resume else "start again to train"
        return cls(step, resume, f"stopped while caching latents ({cached} of {cache.total} images cached, {kept}); "
                                 f"nothing was trained in this run; {again}")


@dataclass(frozen=True)
class Done(Event):
    step: int
    files: tuple[str, ...]  # LoRA files written by this run, in epoch order
    best_epoch: int | None = None  # lowest validation loss, when validation ran
    best_file: str | None = None
    message: str = ""


@dataclass(frozen=True)
class Failed(Event):
    message: str  # one line: what happened, at which step, what to do
    step: int
    files: tuple[str, ...] = ()  # the finished epochs that were kept


@dataclass
class TrainControl:
    """Thread-safe flags: the host (tab button, Ctrl-C handler, test) sets them; the run reads them between steps."""

    _stop: threading.Event = field(default_factory=threading.Event)
    _pause: threading.Event = field(default_factory=threading.Event)
    _save: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        """Finish the current step, save state, restore the model, end the run."""
        self._stop.set()
        self._pause.clear()

    def pause(self) -> None:
        """At the next step boundary: hand the model back, move the run's tensors to the CPU, wait."""
        self._pause.set()

    def unpause(self) -> None:
        self._pause.clear()

    def save_now(self) -> None:
        """Write the LoRA as it is now (and state) at the next step boundary."""
        self._save.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def pause_requested(self) -> bool:
        return self._pause.is_set()

    def take_save_request(self) -> bool:
        if self._save.is_set():
            self._save.clear()
            return True
        return False

    def wait_while_paused(self, poll_s: float = 0.2) -> None:
        """Block until unpaused or stopped."""
        while self._pause.is_set() and not self._stop.is_set():
            self._stop.wait(poll_s)


@dataclass(frozen=True)
class DryRun(Event):
    """What `--dry_run` reports: nothing was written."""

    lines: tuple[str, ...]  # dataset summary and the step plan
    total_steps: int
    measured_steps: int
    step_time_s: float  # median of the measured steps (the first, warm-up, left out when there are more)
    est_time_s: float  # total_steps x step_time_s
    peak_memory_bytes: int  # GPU peak on CUDA, else the process's peak resident memory
    memory_kind: str  # "cuda" or "process RSS"
