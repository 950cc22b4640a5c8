"""Step files (`save_every_n_steps`, e.g. from an API config) in a tab / API run: they stay out of the Test sub-tab's
epoch list and the X/Y/Z epoch axis (which read `-NN` names), each gets the preview made with its own weights as
its card picture, and a fresh run moves them aside with their previews and states. Real tiny SD1 model through the
standalone host."""

from __future__ import annotations

import dataclasses

from lib_lora.ui import fields, projects
from lib_lora.ui.jobs import Job
from lib_lora.ui.runner import make_runner
from tests.ui.conftest import make_images

TINY = {"resolution": "64", "enable_bucket": False, "train_batch_size": 2, "network_dim": 4, "network_alpha": 4,
        "cache_latents": False, "shuffle_caption": False, "keep_tokens": 0, "mixed_precision": "no",
        "save_precision": "float", "max_train_epochs": 2, "save_every_n_epochs": 1}


def test_step_files_stay_out_of_the_epoch_list_get_their_own_preview_and_move_aside(sd1_diffusers_dir, tmp_path):
    from lib_lora.ui.earlier_runs import earlier_run_files
    from lib_lora.ui.service import TrainService
    from lib_lora.ui.standalone import StandaloneHost
    from lib_lora.ui.tab_test import epoch_files

    host = StandaloneHost(sd1_diffusers_dir, tmp_path / "projects", device="cpu")
    project = projects.create_project(host.projects_root(), "p", repeats=1)
    make_images(project.dataset / "1_p", 2, captions=["sks, red"])  # 2 images, batch 2: one step per epoch
    service = TrainService(host, queue=object())
    cfg = service.make_config(project, {**fields.defaults(), **TINY})
    cfg = dataclasses.replace(cfg, save_every_n_steps=1, sample_every_n_steps=1, save_state=True,
                              sample_prompts=("sks, red --w 64 --h 64 --s 2 --d 1",))
    job = Job(project=project.name, config=cfg, meta={"activation_tag": "sks"})
    make_runner(host)(job)
    assert job.status != "failed"

    out = host.lora_output_dir("p")
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "p-01.safetensors", "p-02.safetensors", "p-step00000001.safetensors", "p-step00000002.safetensors"]
    assert [p.name for p in epoch_files(out, "p")] == ["p-01.safetensors", "p-02.safetensors"]  # Test tab, X/Y/Z
    assert sorted(p.rsplit("/", 1)[-1] for p in job.files) == sorted(p.name for p in out.glob("*.safetensors"))
    for step in (1, 2):
        preview = project.samples / f"p_{step:06d}_00.png"
        assert (out / f"p-step{step:08d}.preview.png").read_bytes() == preview.read_bytes()
        assert (out / f"p-step{step:08d}.json").is_file()
    assert not list(out.glob("p-0?.preview.png"))  # no epoch previews asked for: an epoch card gets no step's picture

    from lib_lora.ui.tab_train import sample_items

    assert [label for _, label in sample_items(job)] == ["step 2, prompt 1", "step 1, prompt 1"]

    found = earlier_run_files(cfg, project.path)
    assert {p.name for p in found["lora"]} >= {"p-step00000001.safetensors", "p-step00000001.json",
                                               "p-step00000001.preview.png", "p-step00000002.safetensors"}
    assert sorted(p.name for p in found["samples"]) == ["p_000001_00.png", "p_000002_00.png"]
    assert {p.name for p in found["state"]} >= {"p-step00000001-state", "p-step00000002-state", "p-state"}


def test_done_counts_epochs_and_step_files_apart_and_removed_step_files_leave_the_list(sd1_diffusers_dir, tmp_path):
    from lib_lora.ui.service import TrainService
    from lib_lora.ui.standalone import StandaloneHost

    host = StandaloneHost(sd1_diffusers_dir, tmp_path / "projects", device="cpu")
    project = projects.create_project(host.projects_root(), "q", repeats=1)
    make_images(project.dataset / "1_q", 2, captions=["sks, red"])  # one step per epoch
    cfg = TrainService(host, queue=object()).make_config(project, {**fields.defaults(), **TINY})
    cfg = dataclasses.replace(cfg, max_train_epochs=3, save_every_n_steps=1, save_last_n_steps=1)
    job = Job(project=project.name, config=cfg)
    make_runner(host)(job)

    out = host.lora_output_dir("q")
    on_disk = sorted(p.name for p in out.glob("*.safetensors"))
    assert on_disk == ["q-01.safetensors", "q-02.safetensors", "q-03.safetensors",
                       "q-step00000002.safetensors", "q-step00000003.safetensors"]  # step 1 removed at step 3
    assert sorted(p.rsplit("/", 1)[-1] for p in job.files) == on_disk
    assert len(job.checks) == len(job.files) and all("q-step00000001" not in c for c in job.checks)
    assert job.message == "done: 3 epoch files, 2 step files"
