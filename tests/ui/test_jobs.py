from __future__ import annotations

import threading
import time

from lib_lora.errors import TrainingFailed
from lib_lora.ui.jobs import DONE, FAILED, INTERRUPTED, QUEUED, Job, JobQueue


def wait_all(queue, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end and queue.busy():
        time.sleep(0.02)
    assert not queue.busy()


def test_jobs_run_in_order_and_a_failure_does_not_stop_the_rest():
    ran = []

    def runner(job):
        ran.append(job.project)
        if job.project == "bad":
            raise TrainingFailed("loss is NaN at step 3")
        job.step = 5

    queue = JobQueue(runner)
    jobs = [queue.submit(Job(project=name, config=None)) for name in ("a", "bad", "c")]
    wait_all(queue)
    assert ran == ["a", "bad", "c"]
    assert [j.status for j in jobs] == [DONE, FAILED, DONE]
    assert jobs[1].message == "loss is NaN at step 3"
    assert jobs[0].finished >= jobs[0].started


def test_interrupt_stops_the_running_job_and_drops_a_queued_one():
    started = threading.Event()

    def runner(job):
        started.set()
        while not job.control.stop_requested:
            time.sleep(0.01)

    queue = JobQueue(runner)
    first = queue.submit(Job(project="a", config=None))
    second = queue.submit(Job(project="b", config=None))
    assert started.wait(5)
    queue.interrupt(second.id)
    assert second.status == INTERRUPTED
    queue.interrupt()
    wait_all(queue)
    assert first.status == INTERRUPTED and "kept" in first.message


def test_pause_flags_match_the_engine_control():
    job = Job(project="a", config=None)
    c = job.control
    assert not c.pause_requested
    c.pause()
    assert c.paused and c.pause_requested
    c.save_now()
    assert c.take_save_request() and not c.take_save_request()
    c.stop()
    assert c.stop_requested and not c.paused
    c.wait_while_paused()  # returns at once when stopped


def test_public_view_is_json_safe():
    import json

    job = Job(project="a", config=None)
    assert json.loads(json.dumps(job.public()))["status"] == QUEUED
