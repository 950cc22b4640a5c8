"""Where a run writes: epoch files, state folders, samples, and the loss log (CSV always, tensorboard if installed).

Names follow sd-scripts so the webui's X/Y/Z "Prompt S/R" over `-01`, `-02`, ... works: `<name>-NN.safetensors`
with NN zero-padded to at least two digits, `<name>-stepNNNNNNNN.safetensors` for a step save (save_every_n_steps,
or a save on request), and
`<name>.safetensors` when only the final epoch is kept.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from ..fsutil import atomic_write_bytes, atomic_write_text
from .config import TrainConfig

LOG_COLUMNS = ("step", "epoch", "loss", "avg_loss", "lr", "val_loss", "time")


class WriteFailed(Exception):
    """A file or folder of the run could not be written (full disk, no permission, something in the way): the run
    ends with a Failed event naming it instead of a traceback."""

    def __init__(self, path, exc: Exception):
        # the network's save_lora already says which file and why (a one-line BadInput); a raw OSError does not
        super().__init__(str(exc) if not isinstance(exc, OSError) else f"could not write {path}: {exc.strerror or exc}")


def epoch_file(cfg: TrainConfig, epoch: int | None) -> Path:
    """The LoRA file of `epoch` (None: the single final file of a run without save_every_n_epochs)."""
    suffix = "" if epoch is None else f"-{epoch:02d}"
    return Path(cfg.output_dir) / f"{cfg.output_name}{suffix}.safetensors"


def step_file(cfg: TrainConfig, step: int) -> Path:
    """sd-scripts' step file name: `<name>-stepNNNNNNNN.safetensors` (8 digits), outside the `-NN` epoch pattern."""
    return Path(cfg.output_dir) / f"{cfg.output_name}-step{step:08d}.safetensors"


def step_state_dir(cfg: TrainConfig, step: int) -> Path:
    """`<name>-stepNNNNNNNN-state` (sd-scripts' name), where `state_dir` puts the epoch states."""
    return Path(cfg.state_dir or cfg.output_dir) / f"{cfg.output_name}-step{step:08d}-state"


def state_dir(cfg: TrainConfig, epoch: int | None = None) -> Path:
    """`<name>-NN-state` for an epoch's state, `<name>-state` for the latest (interrupt, end of run), in
    `state_dir` when set (the tab keeps them out of the webui's Lora folder, which would list their
    network.safetensors / optimizer.pt as LoRA cards), else beside the epoch files as sd-scripts puts them."""
    suffix = "-state" if epoch is None else f"-{epoch:02d}-state"
    return Path(cfg.state_dir or cfg.output_dir) / f"{cfg.output_name}{suffix}"


def logs_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.logging_dir) if cfg.logging_dir else Path(cfg.output_dir) / "logs"


def samples_dir(cfg: TrainConfig) -> Path:
    """`sample_dir` when set, else sd-scripts' `<output_dir>/sample`."""
    return Path(cfg.sample_dir) if cfg.sample_dir else Path(cfg.output_dir) / "sample"


def save_samples(cfg: TrainConfig, epoch: int, images: list, step: int | None = None) -> list[Path]:
    """PNG files `<name>_eNNNNNN_II.png` at an epoch end, `<name>_NNNNNN_II.png` at a step (sd-scripts' naming
    without its time stamp), written atomically."""
    paths = []
    number = f"e{epoch:06d}" if step is None else f"{step:06d}"
    for i, image in enumerate(images):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        path = samples_dir(cfg) / f"{cfg.output_name}_{number}_{i:02d}.png"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


class LossLog:
    """Rows kept in memory and rewritten atomically at each flush (epoch ends, saves, the end of the run), so the
    CSV is never half-written; a resumed run drops the rows after the step it resumes from."""

    def __init__(self, cfg: TrainConfig, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = logs_dir(cfg) / f"{cfg.output_name}_loss.csv"
        self.rows: list[dict] = []
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as fh:
                self.rows = [r for r in csv.DictReader(fh) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        if cfg.log_with in ("", "tensorboard", "all"):  # "" = tensorboard whenever it is installed
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.tb = None
            else:
                self.tb = SummaryWriter(str(logs_dir(cfg) / f"{cfg.output_name}_{time.strftime('%Y%m%d%H%M%S')}"))

    def step(self, step: int, epoch: int, loss: float, avg: float, lr: float) -> None:
        if not self.enabled:
            return
        self.rows.append({"step": step, "epoch": epoch, "loss": f"{loss:.6g}", "avg_loss": f"{avg:.6g}", "lr": f"{lr:.6g}",
                          "val_loss": "", "time": f"{time.time():.3f}"})
        if self.tb is not None:
            self.tb.add_scalar("loss/current", loss, step)
            self.tb.add_scalar("loss/average", avg, step)
            self.tb.add_scalar("lr", lr, step)

    def validation(self, step: int, epoch: int, loss: float) -> None:
        if not self.enabled:
            return
        self.rows.append({"step": step, "epoch": epoch, "loss": "", "avg_loss": "", "lr": "", "val_loss": f"{loss:.6g}",
                          "time": f"{time.time():.3f}"})
        if self.tb is not None:
            self.tb.add_scalar("loss/validation", loss, step)

    def flush(self) -> None:
        if not self.enabled:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
