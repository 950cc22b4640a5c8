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
    assert (root / "p" / "project.toml").is_file()
    # reopening the project shows the saved settings
    assert service.saved_values(service.project("p"))["network_dim"] == 8


def test_steps_line_is_images_times_repeats_times_epochs_over_batch(service):
    root = service.root()
    projects.create_project(root, "p", repeats=5)
    make_images(root / "p" / "dataset" / "5_p", 4)
    text, repeated = service.steps_line("p", {"max_train_epochs": 3, "train_batch_size": 2, "gradient_accumulation_steps": 1})
    assert repeated == 20
    assert "10 steps per epoch x 3 epochs = 30 steps" in text
