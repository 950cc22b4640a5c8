"""What a run writes between epoch ends: sd-scripts' step schedules and the tab's "save now".

sd-scripts' rules, kept so its users get the files they expect:
- `save_every_n_steps N`: `<name>-stepNNNNNNNN.safetensors` (8 digits) after every N-th optimizer step, with the same
  metadata and `.json` card as an epoch file; `ss_epoch` is the number of epochs finished when it was written. With
  `save_state`, a state folder `<name>-stepNNNNNNNN-state` beside it (in `state_dir` when set).
- `save_last_n_steps L`: after each step save, step files of the schedule older than L steps are removed (sd-scripts
  keeps the saves made at steps >= S - L); `save_last_n_steps_state` does the same for step states (default: L).
  A file saved on request (`TrainControl.save_now`) outside the schedule is the user's and is kept.
- `sample_every_n_steps N`: previews `<name>_NNNNNN_II.png` after every N-th step, unless `sample_every_n_epochs` is
  set, which wins (sd-scripts ignores the step schedule then).

A step state is taken at an optimizer-step boundary like the state of an interrupt (batches done in the epoch
recorded), so resuming from it replays the rest of the epoch exactly. The loss log is written with it, so a resumed
run keeps the rows up to that step.
"""

from __future__ import annotations

import glob
import re
import shutil
from pathlib import Path
from typing import Iterator

from .events import Event, Note
from .outputs import step_file, step_state_dir


class StepOutputs:
    """Part of `loop.Run`: uses its cfg, state, files, log, dist, control and `_save_lora` / `_save_state` /
    `_sample` (which take the step for naming and events)."""

    def _after_step(self, epoch: int) -> Iterator[Event]:
        """Called on every process after each optimizer step of `epoch` (1-based)."""
        cfg, step = self.cfg, self.state.global_step
        finished = epoch - 1  # sd-scripts writes the 0-based epoch in progress = epochs finished
        scheduled = bool(cfg.save_every_n_steps) and step % cfg.save_every_n_steps == 0
        if self.control.take_save_request() or scheduled:
            yield from self._save_lora(step_file(cfg, step), finished, step=step)
            if scheduled:
                yield from self._remove_older_steps(step)
                if cfg.save_state:
                    yield from self._save_state(step_state_dir(cfg, step), finished, step=step)
            self.log.flush()
        if cfg.sample_every_n_steps and not cfg.sample_every_n_epochs and step % cfg.sample_every_n_steps == 0:
            yield from self._sample(finished, step=step)

    def _remove_older_steps(self, step: int) -> Iterator[Event]:
        if not self.dist.is_main:
            return
        cfg, every = self.cfg, self.cfg.save_every_n_steps
        keep = cfg.save_last_n_steps or 0
        keep_states = cfg.save_last_n_steps_state or keep
        name = re.escape(cfg.output_name)
        if keep:
            pattern = re.compile(rf"^{name}-step(\d{{8}})\.safetensors$")
            for path in _older(Path(cfg.output_dir), pattern, step - keep, every, is_dir=False):
                try:
                    for other in path.parent.glob(f"{glob.escape(path.stem)}.*"):  # the card and picture go with it
                        other.unlink(missing_ok=True)
                except OSError as exc:  # an old file that will not go is no reason to stop training
                    yield Note(f"could not remove {path.name} (save_last_n_steps = {keep}): {exc.strerror or exc}")
                    continue
                yield Note(removal_note(path.name, keep))
            # also those a resumed run's state lists but an earlier run (or another output_dir) removed or holds
            self.files = [f for f in self.files if not _is_older(Path(f).name, pattern, step - keep, every)]
            self.state.saved_files = list(self.files)
        if keep_states and cfg.save_state:
            pattern = re.compile(rf"^{name}-step(\d{{8}})-state$")
            for folder in _older(step_state_dir(cfg, step).parent, pattern, step - keep_states, every, is_dir=True):
                shutil.rmtree(folder, ignore_errors=True)  # what will not go stays; training goes on
                yield Note(f"removed state {folder.name} (save_last_n_steps_state = {keep_states})")


_REMOVED = re.compile(r"^removed (\S+\.safetensors) \(save_last_n_steps = \d+\)$")


def removal_note(name: str, keep: int) -> str:
    """The Note said when a step file goes; hosts that list the run's files read it back with `removed_file`."""
    return f"removed {name} (save_last_n_steps = {keep})"


def removed_file(message: str) -> str | None:
    """The step file's name when `message` is a `removal_note`, else None."""
    m = _REMOVED.match(message)
    return m.group(1) if m else None


def _is_older(name: str, pattern: re.Pattern, below: int, every: int) -> bool:
    """`name` is a save of the step schedule made before step `below`."""
    m = pattern.match(name)
    return bool(m) and 0 < int(m.group(1)) < below and int(m.group(1)) % every == 0


def _older(folder: Path, pattern: re.Pattern, below: int, every: int, *, is_dir: bool) -> list[Path]:
    """Saves of the step schedule in `folder` made before step `below`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() == is_dir and _is_older(p.name, pattern, below, every)),
                  key=lambda p: p.name)  # 8-digit steps: the name order is the step order
