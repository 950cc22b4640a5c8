"""A queue of training jobs run one after another on one worker thread.

Why a thread of our own instead of a blocking button handler: the browser can reload, the API can start a job
and return at once, several jobs can wait their turn, and one job failing does not stop the rest. Each job keeps
what the tab and the API show: status (queued / running / paused / done / failed / interrupted), step, epoch,
loss history, it/s, ETA, saved files and the loader check of each file.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import LoraTrainError
from ..train.events import TrainControl

QUEUED, RUNNING, PAUSED, DONE, FAILED, INTERRUPTED = "queued", "running", "paused", "done", "failed", "interrupted"
FINISHED = (DONE, FAILED, INTERRUPTED)
_ids = itertools.count(1)


class Control(TrainControl):
    """The engine's `TrainControl` (stop, pause / unpause, save now, checked at step boundaries), which the run
    reads directly, plus `paused` for the tab's Pause / Resume button."""

    @property
    def paused(self) -> bool:
        return self.pause_requested


@dataclass
class Job:
    project: str
    config: Any  # TrainConfig
    meta: dict = field(default_factory=dict)  # activation tag, preferred weight, ...
    id: str = field(default_factory=lambda: f"lt-{int(time.time())}-{next(_ids)}")
    status: str = QUEUED
    message: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    losses: list = field(default_factory=list)  # [(step, loss)]
    it_per_s: float | None = None
    eta_s: float | None = None
    files: list = field(default_factory=list)  # saved epoch files (str)
    checks: list = field(default_factory=list)  # one line per saved file: the loader key check
    samples: list = field(default_factory=list)  # preview image paths
    warnings: list = field(default_factory=list)  # settings that are allowed but probably not meant
    notes: list = field(default_factory=list)  # what the engine said along the way (phases, resume remarks)
    earlier_run: str = ""  # where a fresh run moved the earlier run's epoch files (lib_lora.ui.earlier_runs)
    # project.toml as it was before Start saved this run's settings over it (b"" = there was none; None = not
    # captured, the runner copies the file as it finds it): it goes with the earlier run into runs/<stamp>/
    earlier_settings: bytes | None = field(default=None, repr=False)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    control: Control = field(default_factory=Control, repr=False)

    def public(self) -> dict:
        """What the API returns for a job (JSON-safe)."""
        return {
            "id": self.id, "project": self.project, "status": self.status, "message": self.message,
            "step": self.step, "total_steps": self.total_steps, "epoch": self.epoch, "epochs": self.epochs,
            "loss": self.loss, "it_per_s": self.it_per_s, "eta_s": self.eta_s, "files": list(self.files),
            "checks": list(self.checks), "samples": list(self.samples), "warnings": list(self.warnings), "notes": list(self.notes),
            "earlier_run": self.earlier_run, "created": self.created,
            "started": self.started, "finished": self.finished,
        }

    def summary(self) -> str:
        """One line for the queue table and the steps line."""
        parts = [f"{self.project}: {self.status}"]
        if self.total_steps:
            parts.append(f"step {self.step}/{self.total_steps}")
        if self.epochs:
            parts.append(f"epoch {self.epoch}/{self.epochs}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.it_per_s:
            parts.append(f"{self.it_per_s:.2f} it/s")
        if self.eta_s is not None and self.status == RUNNING:
            parts.append(f"ETA {format_seconds(self.eta_s)}")
        if self.message:
            parts.append(self.message)
        return ", ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


Runner = Callable[[Job], None]  # runs one job to its end, updating it; raises on failure


class JobQueue:
    """Runs jobs in submission order on one daemon thread; `runner(job)` does the work."""

    def __init__(self, runner: Runner, keep: int = 50) -> None:
        self._runner = runner
        self._jobs: list[Job] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._keep = keep
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> Job:
        with self._lock:
            self._jobs.append(job)
            self._trim()
            self._wake.notify_all()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="lora-train-queue", daemon=True)
                self._thread.start()
        return job

    def _trim(self) -> None:
        finished = [j for j in self._jobs if j.status in FINISHED]
        for old in finished[: max(0, len(self._jobs) - self._keep)]:
            self._jobs.remove(old)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs if j.id == job_id), None)

    def current(self) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs if j.status in (RUNNING, PAUSED)), None)

    def busy(self) -> bool:
        with self._lock:
            return any(j.status not in FINISHED for j in self._jobs)

    def interrupt(self, job_id: str | None = None) -> Job | None:
        """Stop the given (or the running) job; a queued job is dropped before it starts."""
        job = self.get(job_id) if job_id else self.current()
        if job is None or job.status in FINISHED:
            return job
        job.control.stop()
        if job.status == QUEUED:
            job.status, job.message, job.finished = INTERRUPTED, "removed from the queue", time.time()
        return job

    def _next(self) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs if j.status == QUEUED), None)

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                with self._lock:
                    if not any(j.status == QUEUED for j in self._jobs):
                        self._wake.wait(timeout=5.0)
                        if not any(j.status == QUEUED for j in self._jobs):
                            self._thread = None
                            return
                continue
            self.run_one(job)

    def run_one(self, job: Job) -> None:
        """Run one job to its end; its failure is recorded on the job and never escapes."""
        job.status, job.started = RUNNING, time.time()
        try:
            self._runner(job)
            if job.control.stop_requested:
                job.status = INTERRUPTED
                job.message = job.message or "interrupted; saved epochs are kept"
            else:
                job.status = DONE
        except LoraTrainError as exc:
            job.status, job.message = FAILED, str(exc)
        except Exception as exc:  # a bug or a torch error: the job fails, the queue goes on
            job.status, job.message = FAILED, f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            job.finished = time.time()
