"""The queue runner turns the engine's events into what the tab and the API show, and keeps the Lora folder
clean: only epoch files and their cards go there (a resume-state folder would show up as LoRA cards named
"network", "optimizer", "scheduler" in the webui); state and previews go to the project's state/ and samples/."""

from __future__ import annotations

import contextlib
from pathlib import Path

from lib_lora.train import events as ev
from lib_lora.ui import projects
from lib_lora.ui.jobs import Job
from lib_lora.ui.runner import make_runner
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


def fake_engine():
    """The engine's side of the contract: files on disk where the config says (lib_lora.train.outputs), then the
    events that announce them."""
    from lib_lora.train.outputs import epoch_file, save_samples, state_dir

    def train(cfg, backend, dataset, control):
        from PIL import Image

        yield ev.Started(total_steps=2, epochs=1, steps_per_epoch=2, start_step=0, seed=1, summary="")
        yield ev.Note("encoding every image once (cache_latents)")
        yield ev.StepEnd(step=1, total_steps=2, epoch=1, step_in_epoch=1, loss=0.5, avg_loss=0.5, lr=1e-4, its=2.0,
                         eta_s=0.5)
        lora = epoch_file(cfg, 1)
        lora.parent.mkdir(parents=True, exist_ok=True)
        lora.write_bytes(b"x")
        yield ev.Saved(str(lora), 1)
        paths = save_samples(cfg, 1, [Image.new("RGB", (8, 8))])
        yield ev.Sample(1, tuple(str(p) for p in paths))
        state = state_dir(cfg)
        state.mkdir(parents=True)
        (state / "network.safetensors").write_bytes(b"x")
        (state / "optimizer.pt").write_bytes(b"x")
        yield ev.Saved(str(state), 1, "state")
        yield ev.Done(step=2, files=(str(lora),))

    return train


def test_state_and_samples_stay_in_the_project_and_notes_end_with_the_phase(tmp_path, monkeypatch):
    from lib_lora.ui import fields
    from lib_lora.ui.service import TrainService
    from tests.ui.conftest import make_images

    host = RunHost(tmp_path)
    project = projects.create_project(host.projects_root(), "p")
    make_images(project.dataset / "10_p", 2)
    cfg = TrainService(host, queue=object()).make_config(project, fields.defaults())
    monkeypatch.setattr("lib_lora.train.loop.train", fake_engine())
    monkeypatch.setattr("lib_lora.ui.runner.build_dataset", lambda cfg: None)
    job = Job(project="p", config=cfg, meta={"activation_tag": "sks", "preferred_weight": 0.7})
    make_runner(host)(job)

    out = host.lora_output_dir("p")
    # only epoch files, their cards and card pictures in the Lora folder (the webui lists every .safetensors / .pt
    # below it)
    assert sorted(p.name for p in out.rglob("*")) == ["p-01.json", "p-01.preview.png", "p-01.safetensors"]
    assert sorted(p.name for p in (project.state / "p-state").iterdir()) == ["network.safetensors", "optimizer.pt"]
    assert [Path(p).parent for p in job.samples] == [project.samples]
    assert job.notes == ["encoding every image once (cache_latents)"]
    assert job.message == "done: 1 epoch file"
    assert job.checks == ["ok: all 3 modules"] and host.checked == ["p-01.safetensors"]
    assert job.losses == [(1, 0.5)] and host.refreshed >= 1
    import json

    card = json.loads((out / "p-01.json").read_text())
    assert card["activation text"] == "sks" and card["preferred weight"] == 0.7


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
