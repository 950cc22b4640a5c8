from __future__ import annotations

import pytest

from lib_lora.errors import BadInput
from lib_lora.ui import fields, projects
from lib_lora.ui.jobs import JobQueue
from lib_lora.ui.service import TrainService
from tests.ui.conftest import make_images


@pytest.fixture
def service(host):
    ran = []
    svc = TrainService(host, JobQueue(lambda job: ran.append(job)))
    svc.ran = ran
    return svc


def test_start_refuses_bad_input_and_queues_nothing(service, host):
    root = service.root()
    projects.create_project(root, "p")
    with pytest.raises(BadInput, match="no images"):
        service.start("p", fields.defaults())
    make_images(root / "p" / "dataset" / "10_p", 2)
    with pytest.raises(BadInput, match="between 1 and 1024"):
        service.start("p", dict(fields.defaults(), network_dim=0))
    with pytest.raises(BadInput, match="resolution"):
        service.start("p", dict(fields.defaults(), resolution="60"))
    with pytest.raises(BadInput):
        service.start("../p", fields.defaults())
    with pytest.raises(BadInput, match="does not exist"):
        service.start("nope", fields.defaults())
    host.model = None
    with pytest.raises(BadInput, match="no model"):
        service.start("p", fields.defaults())
    assert service.queue.jobs() == []
    assert not (root / "p" / "project.toml").exists()


def test_start_saves_the_settings_and_queues_a_job(service, host):
    root = service.root()
    projects.create_project(root, "p")
    make_images(root / "p" / "dataset" / "10_p", 3)
    job = service.start("p", dict(fields.defaults(), network_dim=8))
    cfg = job.config
    assert cfg.output_name == "p" and cfg.output_dir == str(host.lora_output_dir("p"))
    assert cfg.train_data_dir == str(root / "p" / "dataset") and cfg.network_dim == 8
    # resume state and previews stay in the project (never in the Lora folder), whatever a config says
    assert (cfg.state_dir, cfg.sample_dir) == (str(root / "p" / "state"), str(root / "p" / "samples"))
    from lib_lora.train.outputs import state_dir

    assert state_dir(cfg) == root / "p" / "state" / "p-state"
    # a resume (API config) finds the state there, and writes the next one there again
    state_dir(cfg).mkdir(parents=True)
    (state_dir(cfg) / "state.json").write_text("{}")
    import dataclasses

    again = service.make_config(service.project("p"), config=dataclasses.replace(
        cfg, resume=str(state_dir(cfg)), state_dir=str(root / "elsewhere")))
    assert again.resume == str(state_dir(cfg)) and state_dir(again) == state_dir(cfg)
    # an API config naming an sd-scripts dataset file still trains the project's own folders
    other = root / "other.toml"
    other.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "/nowhere"\n')
    own = service.make_config(service.project("p"), config=dataclasses.replace(cfg, dataset_config=str(other)))
    assert own.dataset_config == "" and own.train_data_dir == str(root / "p" / "dataset")
    assert (root / "p" / "project.toml").is_file()
    # reopening the project shows the saved settings
    assert service.saved_values(service.project("p"))["network_dim"] == 8


def test_steps_line_is_images_times_repeats_times_epochs_over_batch(service):
    root = service.root()
    projects.create_project(root, "p", repeats=5)
    make_images(root / "p" / "dataset" / "5_p", 4)
    text, repeated, lhs = service.steps_line("p", {"max_train_epochs": 3, "train_batch_size": 2,
                                                   "gradient_accumulation_steps": 1})
    assert repeated == 20 and lhs == "4 images x 5 repeats = 20"
    assert text == "4 images x 5 repeats = 20 per epoch / batch 2 = 10 steps per epoch x 3 epochs = 30 steps"
    make_images(root / "p" / "dataset" / "2_extra", 3)
    text, repeated, _ = service.steps_line("p", {"max_train_epochs": 1, "train_batch_size": 1,
                                                 "gradient_accumulation_steps": 2})
    assert text == ("3 x 2 (2_extra) + 4 x 5 (5_p) = 26 per epoch / batch 1 / accumulation 2 = 13 steps per epoch"
                    " x 1 epoch = 13 steps")


def test_steps_line_reads_as_the_engines_plan_line(service):
    """The tab built its own '... x N epochs = M steps' text ('x 1 epochs'; nothing said when max_train_steps ends
    inside an epoch); it now ends with the engine's own epochs text for the same plan."""
    from lib_lora.train.config import TrainConfig
    from lib_lora.train.steps import plan_steps

    root = service.root()
    projects.create_project(root, "p", repeats=3)
    make_images(root / "p" / "dataset" / "3_p", 4)
    text, repeated, _ = service.steps_line("p", {"max_train_epochs": 2, "train_batch_size": 4})
    cfg = TrainConfig(max_train_epochs=2, train_batch_size=4)
    assert text.endswith(" = " + plan_steps(cfg, repeated).epochs_text()) and text.endswith("x 2 epochs = 6 steps")


def test_a_second_run_of_the_same_project_is_refused_while_the_first_waits(host):
    import threading

    from lib_lora.ui.jobs import JobQueue

    release = threading.Event()
    svc = TrainService(host, JobQueue(lambda job: release.wait(10)))
    root = svc.root()
    projects.create_project(root, "p")
    projects.create_project(root, "q")
    make_images(root / "p" / "dataset" / "10_p", 2)
    make_images(root / "q" / "dataset" / "10_q", 2)
    first = svc.start("p", fields.defaults())
    with pytest.raises(BadInput, match="already has a training") as info:
        svc.start("p", dict(fields.defaults(), network_dim=32))
    assert first.id in str(info.value)
    other = svc.start("q", fields.defaults())  # another project queues behind it
    assert [j.project for j in svc.queue.jobs()] == ["p", "q"] and other.status == "queued"
    release.set()


def test_refusals_name_the_field_by_its_label(service):
    root = service.root()
    projects.create_project(root, "p")
    make_images(root / "p" / "dataset" / "10_p", 2)
    with pytest.raises(BadInput, match=r"^Resolution \(W or W,H\) \(resolution\): ") as info:
        service.start("p", dict(fields.defaults(), resolution="60"))
    assert not str(info.value).startswith("error")


def test_steps_line_leaves_out_broken_images_as_the_run_does(service, monkeypatch):
    """11 files, one broken: the line said 84 steps where the run trained 75. It must say what the run runs, and
    recounting while the user types must not decode the images again."""
    from lib_lora.dataset import Dataset, DatasetOptions
    from lib_lora.dataset import scan
    from lib_lora.train.steps import plan_from_dataset

    root = service.root()
    project = projects.create_project(root, "p", repeats=5)
    make_images(project.dataset / "5_p", 10)
    (project.dataset / "5_p" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    values = dict(fields.defaults(), max_train_epochs=3, train_batch_size=2, gradient_accumulation_steps=1)
    text, repeated, lhs = service.steps_line("p", values)
    cfg = service.make_config(project, values)
    run = plan_from_dataset(cfg, Dataset.build(DatasetOptions.from_config(cfg)))
    assert run.total_steps == 75 and text.endswith(f"= {run.total_steps} steps") and repeated == 50
    assert run.describe(cfg).startswith("10 images x repeats = 50 per epoch")  # distinct images, then with repeats
    assert lhs == "10 images x 5 repeats = 50 (1 unreadable image left out: Dataset > Check images)"

    decoded = []
    real = scan.image_size
    monkeypatch.setattr(scan, "image_size", lambda path: decoded.append(path.name) or real(path))
    assert service.steps_line("p", dict(values, max_train_epochs=4))[0].endswith("= 100 steps")
    assert decoded == []  # every answer remembered, the broken file's too
    from PIL import Image

    Image.new("RGB", (64, 64), (9, 9, 9)).save(project.dataset / "5_p" / "broken.png", format="PNG")  # repaired
    assert service.steps_line("p", values)[0].endswith("= 84 steps") and decoded == ["broken.png"]


def test_a_config_from_the_api_gets_the_same_ranges_as_the_tab(service):
    """POST /jobs with network_dim 5000 was queued and ran at 0.02 it/s, where the tab refuses the same value."""
    import dataclasses

    root = service.root()
    projects.create_project(root, "p")
    make_images(root / "p" / "dataset" / "10_p", 2)
    base = fields.build_config(fields.defaults(), service.fixed(service.project("p")))
    for key, value, label in (("network_dim", 5000, "Network rank"), ("max_train_epochs", 100000, "Epochs"),
                              ("train_batch_size", 0, "Batch size")):
        with pytest.raises(BadInput, match=rf"{label}.*between .* not {value}"):
            service.start("p", config=dataclasses.replace(base, **{key: value}))
    assert service.queue.jobs() == []
    assert service.start("p", config=dataclasses.replace(base, network_dim=32, max_train_epochs=None,
                                                         max_train_steps=50)).config.network_dim == 32
