"""The queue runner turns the engine's events into what the tab and the API show, and keeps the Lora folder
clean: only epoch files and their cards go there (a resume-state folder would show up as LoRA cards named
"network", "optimizer", "scheduler" in the webui)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from lib_lora.train import events as ev
from lib_lora.ui import projects
from lib_lora.ui.jobs import Job
from lib_lora.ui.runner import keep_state_out_of_lora_dir, make_runner
from tests.ui.conftest import FolderHost


class RunHost(FolderHost):
    def __init__(self, root):
        super().__init__(root)
        self.checked, self.refreshed = [], 0

    @contextlib.contextmanager
    def training_session(self, job):
        yield object()

    def pause_gate(self, job):
        return contextlib.nullcontext()

    def report(self, job):
        pass

    def check_saved_lora(self, path):
        self.checked.append(Path(path).name)
        return "ok: all 3 modules"

    def refresh_loras(self):
        self.refreshed += 1


def fake_engine(out: Path):
    """The engine's side of the contract: files on disk, then the events that announce them."""

    def train(cfg, backend, dataset, control):
        yield ev.Started(total_steps=2, epochs=1, steps_per_epoch=2, start_step=0, seed=1, summary="")
        yield ev.Note("encoding every image once (cache_latents)")
        yield ev.StepEnd(step=1, total_steps=2, epoch=1, step_in_epoch=1, loss=0.5, avg_loss=0.5, lr=1e-4, its=2.0,
                         eta_s=0.5)
        lora = out / "p-01.safetensors"
        lora.write_bytes(b"x")
        yield ev.Saved(str(lora), 1)
        state = out / "p-state"
        state.mkdir()
        (state / "network.safetensors").write_bytes(b"x")
        (state / "optimizer.pt").write_bytes(b"x")
        yield ev.Saved(str(state), 1, "state")
        yield ev.Done(step=2, files=(str(lora),))

    return train


def test_state_folders_leave_the_lora_folder_and_notes_end_with_the_phase(tmp_path, monkeypatch):
    host = RunHost(tmp_path)
    project = projects.create_project(host.projects_root(), "p")
    out = host.lora_output_dir("p")
    out.mkdir(parents=True)
    monkeypatch.setattr("lib_lora.train.loop.train", fake_engine(out))
    monkeypatch.setattr("lib_lora.ui.runner.build_dataset", lambda cfg: None)
    job = Job(project="p", config=None, meta={"activation_tag": "sks", "preferred_weight": 0.7})
    make_runner(host)(job)

    assert sorted(p.name for p in out.iterdir()) == ["p-01.json", "p-01.safetensors"]
    assert sorted(p.name for p in (project.state / "p-state").iterdir()) == ["network.safetensors", "optimizer.pt"]
    assert job.notes == ["encoding every image once (cache_latents)"]
    assert job.message == "done: 1 epoch files"
    assert job.checks == ["ok: all 3 modules"] and host.checked == ["p-01.safetensors"]
    assert job.losses == [(1, 0.5)] and host.refreshed >= 1
    import json

    card = json.loads((out / "p-01.json").read_text())
    assert card["activation text"] == "sks" and card["preferred weight"] == 0.7


def test_a_newer_state_replaces_the_older_one(tmp_path):
    state_root = tmp_path / "project" / "state"
    old = state_root / "p-state"
    old.mkdir(parents=True)
    (old / "step.txt").write_text("old")
    new = tmp_path / "Lora" / "p-state"
    new.mkdir(parents=True)
    (new / "step.txt").write_text("new")
    moved = keep_state_out_of_lora_dir(new, state_root)
    assert moved == old and (old / "step.txt").read_text() == "new"
    assert not new.exists() and sorted(p.name for p in state_root.iterdir()) == ["p-state"]


def test_done_reports_the_best_epoch(tmp_path, monkeypatch):
    host = RunHost(tmp_path)
    projects.create_project(host.projects_root(), "p")

    def train(cfg, backend, dataset, control):
        yield ev.Done(step=4, files=("a-01.safetensors", "a-02.safetensors"), best_epoch=1,
                      best_file="/x/a-01.safetensors")

    monkeypatch.setattr("lib_lora.train.loop.train", train)
    monkeypatch.setattr("lib_lora.ui.runner.build_dataset", lambda cfg: None)
    job = Job(project="p", config=None)
    make_runner(host)(job)
    assert "lowest validation loss: epoch 1 (a-01.safetensors)" in job.message
