"""Training tests run tiny models: one torch thread is as fast as two there, and far faster when the machine is
busy (intra-op threads spin-wait for each other). Restored after each module so other areas keep their setting."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
