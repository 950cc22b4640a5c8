"""/lora-train/v1/ routes on a plain FastAPI app: answers, 4xx messages for bad input, --api-auth."""

from __future__ import annotations

import base64

import pytest

from lib_lora.ui.jobs import JobQueue
from lib_lora.ui.service import TrainService
from lib_lora.webui.api import add_routes, parse_credentials
from tests.ui.conftest import FolderHost, make_images

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture
def api(tmp_path):
    host = FolderHost(tmp_path)
    ran = []
    service = TrainService(host, JobQueue(lambda job: ran.append(job.config)))
    app = fastapi.FastAPI()
    add_routes(app, service)
    return TestClient(app), service, ran


def test_projects_create_list_and_refuse_unsafe_names(api):
    client, service, _ = api
    r = client.post("/lora-train/v1/projects", json={"name": "mychar", "repeats": 5})
    assert r.status_code == 201, r.text
    make_images(service.root() / "mychar" / "dataset" / "5_mychar", 2)
    listed = client.get("/lora-train/v1/projects").json()
    assert listed[0]["name"] == "mychar" and listed[0]["images"] == 2 and listed[0]["concepts"][0]["repeats"] == 5
    for bad in ("a/b", "..", "../x"):
        r = client.post("/lora-train/v1/projects", json={"name": bad})
        assert r.status_code == 400 and "project name" in r.json()["detail"]
    assert client.post("/lora-train/v1/projects", json={"name": "mychar"}).status_code == 409


def test_job_start_status_and_bad_input(api):
    client, service, ran = api
    client.post("/lora-train/v1/projects", json={"name": "p"})
    r = client.post("/lora-train/v1/jobs", json={"project": "p", "config": {}})
    assert r.status_code == 400 and "no images" in r.json()["detail"]
    make_images(service.root() / "p" / "dataset" / "10_p", 2)
    r = client.post("/lora-train/v1/jobs", json={"project": "p", "config": {"network_dim": "x"}})
    assert r.status_code == 400 and "network_dim" in r.json()["detail"]
    r = client.post("/lora-train/v1/jobs", json={"project": "p", "config": {"no_such_option": 1}})
    assert r.status_code == 400 and "no_such_option" in r.json()["detail"]
    assert client.post("/lora-train/v1/jobs", json={"project": "nope", "config": {}}).status_code == 404
    assert service.queue.jobs() == []
    r = client.post("/lora-train/v1/jobs", json={"project": "p", "config": {"network_dim": 4, "max_train_epochs": 2}})
    assert r.status_code == 201, r.text
    job = r.json()
    status = client.get(f"/lora-train/v1/jobs/{job['id']}").json()
    assert status["project"] == "p" and "losses" in status
    # the tab's first-LoRA defaults fill what the config leaves out
    import time

    for _ in range(100):
        if ran:
            break
        time.sleep(0.02)
    assert ran[0].network_dim == 4 and ran[0].network_alpha == 8.0 and ran[0].max_train_epochs == 2
    assert client.get("/lora-train/v1/jobs/nope").status_code == 404
    assert client.post("/lora-train/v1/jobs/nope/interrupt").status_code == 404


def test_api_auth_is_enforced(tmp_path):
    service = TrainService(FolderHost(tmp_path), JobQueue(lambda job: None))
    app = fastapi.FastAPI()
    add_routes(app, service, "alice:secret,bob:pw")
    client = TestClient(app)
    assert client.get("/lora-train/v1/projects").status_code == 401
    assert client.get("/lora-train/v1/projects", auth=("alice", "wrong")).status_code == 401
    assert client.get("/lora-train/v1/projects", auth=("alice", "secret")).status_code == 200
    assert parse_credentials("a:b:c, d:e") == {"a": "b:c", "d": "e"}


def test_grid_without_epochs_says_so(api):
    client, service, _ = api
    client.post("/lora-train/v1/projects", json={"name": "p"})
    r = client.post("/lora-train/v1/grid", json={"project": "p"})
    assert r.status_code == 400 and "no epoch files" in r.json()["detail"]
    assert base64  # noqa: used by the integration test's decoding of grid images


def test_grid_merge_and_tag_refuse_bad_values_with_a_4xx_and_run_nothing(api):
    """Seen on the real webui: a grid of an epoch that does not exist answered 200 with a grid of the bare model
    (the webui skips an unknown <lora:...>), and a word where a number goes answered 500 with a Python error."""
    client, service, _ = api
    host = service.host
    ran = []
    host.run_grid = lambda request: ran.append(request)
    host.merge = lambda request: ran.append(request)
    client.post("/lora-train/v1/projects", json={"name": "p"})
    make_images(service.root() / "p" / "dataset" / "10_p", 2)
    host.lora_output_dir("p").mkdir(parents=True)
    (host.lora_output_dir("p") / "p-01.safetensors").write_bytes(b"x")
    r = client.post("/lora-train/v1/grid", json={"project": "p", "epochs": ["p-09"]})
    assert r.status_code == 404 and "p-09" in r.json()["detail"] and "p-01" in r.json()["detail"]
    for bad, word in (({"width": "abc"}, "Width"), ({"width": 100000}, "Width"), ({"steps": 0}, "Steps"),
                      ({"seed": "x"}, "Seed"), ({"cfg_scale": "x"}, "CFG scale"), ({"weights": "a"}, "weights"),
                      ({"weights": ["a"]}, "weight"), ({"weights": [9]}, "weight")):
        r = client.post("/lora-train/v1/grid", json={"project": "p", **bad})
        assert r.status_code == 400 and word in r.json()["detail"], (bad, r.text)
    for loras, word in (("abc", "loras"), ([{"name": "p-01", "weight": "abc"}], "weight"), (["p-01"], "loras")):
        r = client.post("/lora-train/v1/merge", json={"checkpoint": "m", "name": "new", "loras": loras})
        assert r.status_code == 400 and word in r.json()["detail"], (loras, r.text)
    r = client.post("/lora-train/v1/projects/p/tag", json={"tagger": "wd14", "threshold": "abc"})
    assert r.status_code == 400 and "threshold" in r.json()["detail"], r.text
    assert ran == []


def test_a_grid_while_a_training_runs_is_refused_instead_of_waiting_for_the_whole_run(tmp_path):
    """The grid takes the webui's queue lock, which the training holds: Run comparison grid after epoch 2 of 10
    spun until the run ended. Refused with a 409 that says to pause; runs once the training is paused."""
    import threading
    import time

    host = FolderHost(tmp_path)
    ran = []
    host.run_grid = lambda request: ran.append(request)
    host.merge = lambda request: ran.append(request)
    release = threading.Event()
    service = TrainService(host, JobQueue(lambda job: release.wait(20)))
    app = fastapi.FastAPI()
    add_routes(app, service)
    client = TestClient(app)
    client.post("/lora-train/v1/projects", json={"name": "p"})
    make_images(service.root() / "p" / "dataset" / "10_p", 2)
    host.lora_output_dir("p").mkdir(parents=True)
    (host.lora_output_dir("p") / "p-01.safetensors").write_bytes(b"x")
    job = service.start("p", {})
    for _ in range(200):
        if job.status == "running":
            break
        time.sleep(0.01)
    r = client.post("/lora-train/v1/grid", json={"project": "p"})
    assert r.status_code == 409 and "Pause" in r.json()["detail"] and job.id in r.json()["detail"], r.text
    r = client.post("/lora-train/v1/merge", json={"checkpoint": "m", "name": "new", "loras": [{"name": "p-01"}]})
    assert r.status_code == 409 and "the merge would wait" in r.json()["detail"], r.text
    r = client.post("/lora-train/v1/projects/p/tag", json={"tagger": "wd14"})
    assert r.status_code == 409 and "tagging would wait" in r.json()["detail"], r.text
    with pytest.raises(Exception, match="Pause"):
        service.check_idle_for("the comparison grid")
    assert ran == []
    job.control.pause()
    service.check_idle_for("the comparison grid")  # a paused run has handed the model back
    release.set()
