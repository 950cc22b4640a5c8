"""What a run of the tab (and the API: both through the queue runner) leaves in the Lora folder. A fresh run of a
project moves the earlier run's epoch files (cards, previews, samples, loss log) into the project's runs/ folder
instead of overwriting -01... and leaving the earlier run's later epochs beside the new ones; a resumed run moves
nothing. Each saved epoch gets its first preview as the webui's card picture. Real tiny SD1 model through the
standalone host."""

from __future__ import annotations

import dataclasses

import pytest

from lib_lora.ui import fields, projects
from lib_lora.ui.jobs import Job
from lib_lora.ui.runner import make_runner
from tests.ui.conftest import make_images

TINY = {"resolution": "64", "enable_bucket": False, "train_batch_size": 2, "network_dim": 4, "network_alpha": 4,
        "cache_latents": False, "shuffle_caption": False, "keep_tokens": 0, "mixed_precision": "no",
        "save_precision": "float"}


@pytest.fixture
def standalone(sd1_diffusers_dir, tmp_path):
    from lib_lora.ui.service import TrainService
    from lib_lora.ui.standalone import StandaloneHost

    host = StandaloneHost(sd1_diffusers_dir, tmp_path / "projects", device="cpu")
    project = projects.create_project(host.projects_root(), "p", repeats=1)
    make_images(project.dataset / "1_p", 2, captions=["sks, red"])
    return host, project, TrainService(host, queue=object())


def run(host, service, project, **values):
    cfg = service.make_config(project, {**fields.defaults(), **TINY, **values})
    job = Job(project=project.name, config=cfg, meta={"activation_tag": "sks"})
    make_runner(host)(job)
    return job


def test_a_fresh_run_moves_the_earlier_runs_epochs_aside_and_a_resume_moves_nothing(standalone):
    host, project, service = standalone
    out = host.lora_output_dir("p")
    first = run(host, service, project, max_train_epochs=2)
    assert sorted(p.name for p in out.iterdir()) == ["p-01.json", "p-01.safetensors", "p-02.json", "p-02.safetensors"]
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "p-02.preview.png").write_bytes(b"the user's own card picture")
    (out / "other.safetensors").write_bytes(b"not this run's")  # another name: left alone
    log = project.logs / "p_loss.csv"
    assert log.is_file() and first.files

    second = run(host, service, project, max_train_epochs=1)
    runs = sorted((project.path / "runs").iterdir())
    assert len(runs) == 1
    moved = runs[0]
    assert {p.name: p.read_bytes() for p in moved.iterdir() if p.name in earlier} == earlier  # moved whole
    assert (moved / "p-02.preview.png").read_bytes() == b"the user's own card picture"
    assert (moved / "logs" / "p_loss.csv").is_file()
    # the Lora folder (and so the Test sub-tab) holds the new run's epochs only, plus the other file
    assert sorted(p.name for p in out.iterdir()) == ["other.safetensors", "p-01.json", "p-01.safetensors"]
    assert (out / "p-01.safetensors").read_bytes() != earlier["p-01.safetensors"]
    said = [n for n in second.notes if "earlier run" in n]
    assert said and "2 epoch files" in said[0] and str(moved) in said[0]
    assert second.earlier_run == said[0]
    from lib_lora.ui.tab_train import files_text

    assert files_text(second).splitlines()[0] == said[0]  # shown above the new run's files in the Train sub-tab

    from lib_lora.train.outputs import state_dir
    from lib_lora.ui.earlier_runs import set_aside_earlier_run

    resumed = dataclasses.replace(second.config, resume=str(state_dir(second.config)))
    assert set_aside_earlier_run(resumed, project.path) is None  # a resumed run continues these files
    assert sorted(p.name for p in out.iterdir()) == ["other.safetensors", "p-01.json", "p-01.safetensors"]
    assert len(list((project.path / "runs").iterdir())) == 1


def test_each_epoch_gets_its_first_preview_as_the_card_picture_and_a_users_own_is_kept(standalone):
    """The webui showed 'NO PREVIEW' on the cards although every epoch had previews in the project's samples."""
    host, project, service = standalone
    out = host.lora_output_dir("p")
    out.mkdir(parents=True)
    (out / "p-02.preview.png").write_bytes(b"the user's own picture")  # no p-02.safetensors yet: nothing moved
    job = run(host, service, project, max_train_epochs=2, sample_every_n_epochs=1,
              sample_prompts="sks, red --w 64 --h 64 --s 2 --d 1\nsks, blue --w 64 --h 64 --s 2 --d 2")
    first = project.samples / "p_e000001_00.png"
    assert first.is_file() and (project.samples / "p_e000001_01.png").is_file()
    assert (out / "p-01.preview.png").read_bytes() == first.read_bytes()  # the first prompt's image
    assert (out / "p-02.preview.png").read_bytes() == b"the user's own picture"  # never replaced
    assert sorted(p.name for p in out.iterdir()) == ["p-01.json", "p-01.preview.png", "p-01.safetensors",
                                                     "p-02.json", "p-02.preview.png", "p-02.safetensors"]
    assert job.status != "failed"


class _ListQueue:
    """The queue's two calls Start makes; the test runs each submitted job itself, in order."""

    def __init__(self):
        self.submitted = []

    def jobs(self):
        return []

    def submit(self, job):
        self.submitted.append(job)
        return job


def test_a_fresh_run_keeps_a_copy_of_the_earlier_runs_settings_beside_its_moved_epochs(sd1_diffusers_dir, tmp_path):
    """Start saves the new settings into project.toml before the run moves the earlier run aside: the earlier
    run's project.toml must reach runs/<stamp>/ as it was, and project.toml then holds the new run's settings."""
    from lib_lora.ui.service import TrainService
    from lib_lora.ui.standalone import StandaloneHost

    host = StandaloneHost(sd1_diffusers_dir, tmp_path / "projects", device="cpu")
    project = projects.create_project(host.projects_root(), "p", repeats=1)
    make_images(project.dataset / "1_p", 2, captions=["sks, red"])
    queue = _ListQueue()
    service = TrainService(host, queue=queue)
    runner = make_runner(host)

    runner(service.start("p", {**fields.defaults(), **TINY, "max_train_epochs": 2}))
    earlier_settings = project.settings_file.read_bytes()
    assert b"max_train_epochs = 2" in earlier_settings
    runner(service.start("p", {**fields.defaults(), **TINY, "max_train_epochs": 1}))

    moved = next((project.path / "runs").iterdir())
    assert (moved / "p-02.safetensors").is_file()
    assert (moved / "project.toml").read_bytes() == earlier_settings  # a copy of the earlier run's settings
    assert b"max_train_epochs = 1" in project.settings_file.read_bytes()  # the project keeps the new run's


def test_the_moved_aside_sentence_counts_epoch_and_step_files_apart(tmp_path):
    from lib_lora.train.config import TrainConfig
    from lib_lora.ui.earlier_runs import set_aside_earlier_run

    out = tmp_path / "lora"
    out.mkdir()
    for stem in ("p-01", "p-02", "p-step00000004", "p"):
        (out / f"{stem}.safetensors").write_bytes(b"x")
    cfg = TrainConfig(train_data_dir=str(tmp_path / "data"), output_dir=str(out), output_name="p")
    said = set_aside_earlier_run(cfg, tmp_path / "project", b"")
    assert said.startswith("the earlier run's 3 epoch files and 1 step file were moved to ")
    assert not list(out.iterdir()) and not list((tmp_path / "project" / "runs").rglob("project.toml"))  # none before


def test_interrupt_during_latent_caching_says_so_and_leaves_no_epoch_file(standalone, monkeypatch):
    from lib_lora.backends import DiffusersBackend
    from lib_lora.ui.jobs import INTERRUPTED, JobQueue

    host, project, service = standalone
    cfg = service.make_config(project, {**fields.defaults(), **TINY, "cache_latents": True, "max_train_epochs": 1,
                                               "train_batch_size": 1})  # 2 images: 2 VAE batches
    job = Job(project=project.name, config=cfg)
    real = DiffusersBackend.encode_images

    def encode_then_interrupt(self, pixels, **kw):
        out = real(self, pixels, **kw)
        job.control.stop()  # the tab's Interrupt button
        return out

    monkeypatch.setattr(DiffusersBackend, "encode_images", encode_then_interrupt)
    JobQueue(make_runner(host)).run_one(job)
    assert job.status == INTERRUPTED and job.step == 0 and not job.files
    assert job.message.startswith("stopped while caching latents (1 of 2 images cached")
    assert not list(host.lora_output_dir("p").glob("*.safetensors"))
