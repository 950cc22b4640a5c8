"""A stop seen by one process of a multi-process run is taken by all of them at the same step boundary."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch.multiprocessing as mp

from lib_lora.train.dist import Dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dist = Dist(rank=rank, world=world)
        # only process 1 got the Ctrl-C, then nobody has it: both must see the same answers
        answers = [dist.any_true(rank == 1), dist.any_true(False)]
        Path(out, f"{rank}.json").write_text(json.dumps(answers))
    finally:
        td.destroy_process_group()


def test_a_stop_on_one_process_is_a_stop_on_every_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    answers = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    # process 0 never saw the stop itself; without agreement it would run into the next step's all-reduce alone
    assert answers == [[True, False], [True, False]]


def test_a_single_process_answers_its_own_flag():
    assert Dist().any_true(True) is True and Dist().any_true(False) is False
