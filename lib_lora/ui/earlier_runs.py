"""A fresh (not resumed) run of a project moves the earlier run's files aside before it writes its own.

Why: epoch files are named `<name>-01`, `<name>-02`, ...; a second run of the project would overwrite the first
epochs and leave the earlier run's later ones beside them, so the Test sub-tab would compare epochs of two
different runs and earlier good epochs would be lost. The tab and the API (both through the queue runner) move
them into `<project>/runs/<when the earlier run last saved>/`: moved, never copied over or deleted. A resumed run
continues those files and moves nothing. The CLI keeps sd-scripts' behaviour (overwrite).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from ..errors import BadInput
from ..fsutil import atomic_write_bytes
from .projects import SETTINGS_FILE

RUNS_DIR = "runs"


def _epoch_stems(folder: Path, name: str) -> set[str]:
    """Stems of the run's LoRA files in `folder`: `<name>`, `<name>-NN`, `<name>-stepNNNNNNNN`."""
    pattern = re.compile(rf"^{re.escape(name)}(-\d+|-step\d+)?$")
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors" and pattern.match(p.stem)}


def earlier_run_files(cfg, project_folder: Path) -> dict[str, list[Path]]:
    """What a fresh run of `cfg` would overwrite, by kind: epoch files with everything named after them (cards,
    card pictures) and step files, preview samples (of epochs and steps), the loss log, resume-state folders."""
    name = cfg.output_name
    out = Path(cfg.output_dir)
    stems = _epoch_stems(out, name)
    found: dict[str, list[Path]] = {"lora": [], "samples": [], "logs": [], "state": []}
    if stems:
        found["lora"] = sorted(p for p in out.iterdir() if p.is_file()
                               and any(p.name.startswith(stem + ".") for stem in stems))
    from ..train.outputs import logs_dir, samples_dir

    samples = samples_dir(cfg)
    if samples.is_dir():
        sample = re.compile(rf"^{re.escape(name)}_e?\d+_\d+\.png$")  # epoch previews _eNNNNNN_, step previews _NNNNNN_
        found["samples"] = sorted(p for p in samples.iterdir() if p.is_file() and sample.match(p.name))
    log = logs_dir(cfg) / f"{name}_loss.csv"
    if log.is_file():
        found["logs"] = [log]
    state = Path(cfg.state_dir) if cfg.state_dir else None
    if state is not None and state.is_dir():
        pattern = re.compile(rf"^{re.escape(name)}(-\d+|-step\d+)?-state$")
        found["state"] = sorted(p for p in state.iterdir() if p.is_dir() and pattern.match(p.name))
    return found


def set_aside_earlier_run(cfg, project_folder: str | Path, earlier_settings: bytes | None = None) -> str | None:
    """Move the earlier run's files into `<project>/runs/<YYYYmmdd-HHMMSS>/` (the time its newest epoch file was
    written); the sentence saying so, or None when there was nothing to move or the run resumes. A move that fails
    raises BadInput before anything is trained, so nothing is overwritten (what moved already stays moved).
    The earlier run's settings are copied there as `project.toml` (the project keeps its own): `earlier_settings`,
    the file's bytes from before Start saved the new run's settings over it (b"" = there was none), or, when
    None, the project's `project.toml` as it is now (nothing has saved over it)."""
    if getattr(cfg, "resume", ""):
        return None
    found = earlier_run_files(cfg, Path(project_folder))
    if not any(found.values()):
        return None
    newest = max((p.stat().st_mtime for kind in found.values() for p in kind), default=time.time())
    runs = Path(project_folder) / RUNS_DIR
    target = runs / time.strftime("%Y%m%d-%H%M%S", time.localtime(newest))
    n = 2
    while target.exists():
        target = runs / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(newest))}-{n}"
        n += 1
    places = {"lora": target, "samples": target / "samples", "logs": target / "logs", "state": target / "state"}
    for kind, paths in found.items():
        for src in paths:
            dest = places[kind] / src.name
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(src), str(dest))  # a rename on one disk; copy + remove across disks
            except OSError as exc:
                raise BadInput(f"could not move the earlier run's {src} to {dest}: {exc.strerror or exc}; nothing "
                               f"was trained (files already moved are in {target})") from exc
    _copy_settings(Path(project_folder) / SETTINGS_FILE, target, earlier_settings)
    loras = [p for p in found["lora"] if p.suffix == ".safetensors"]
    steps = sum(1 for p in loras if re.search(r"-step\d+$", p.stem))
    epochs = len(loras) - steps
    parts = []
    cards = " with their cards" if len(found["lora"]) > len(loras) else ""
    if epochs:
        parts.append(f"{epochs} epoch file{'s' if epochs != 1 else ''}" + ("" if steps else cards))
    if steps:
        parts.append(f"{steps} step file{'s' if steps != 1 else ''}{cards}")
    if found["samples"]:
        parts.append(f"{len(found['samples'])} preview image{'s' if len(found['samples']) != 1 else ''}")
    if found["logs"]:
        parts.append("its loss log")
    if found["state"]:
        parts.append("its resume state")
    listed = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    return f"the earlier run's {listed} were moved to {target} (a fresh run; nothing was overwritten)"


def _copy_settings(settings: Path, target: Path, earlier: bytes | None) -> None:
    if earlier is None:
        earlier = settings.read_bytes() if settings.is_file() else b""
    if not earlier:
        return
    try:
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target / SETTINGS_FILE, earlier)
    except OSError as exc:
        raise BadInput(f"could not copy the earlier run's settings to {target / SETTINGS_FILE}: "
                       f"{exc.strerror or exc}; nothing was trained (its files are in {target})") from exc
