"""Several processes (`accelerate launch -m lib_lora train ...`): data parallel with averaged gradients.

The LoRA lives in hooks on the base model rather than in one module whose forward we call, so instead of
wrapping a module in DistributedDataParallel the run averages the LoRA gradients itself after each
accumulated step (one flattened all-reduce per step). Every process walks the same deterministic batch plan
and takes every world-th batch; only the main process writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self) -> torch.device:
        """The device this process should train on."""
        if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes"):
            return torch.device("cuda", self.local_rank if self.active else torch.cuda.current_device())
        return torch.device("cpu")

    def shard(self, items: list) -> list:
        """This process's share of an epoch's batches; short shares are padded from the start so every process
        takes the same number of steps (all-reduce needs everyone)."""
        if not self.active or not items:
            return items
        per = -(-len(items) // self.world)
        padded = items + items[: per * self.world - len(items)]
        return padded[self.rank :: self.world]

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        if not self.active:
            return
        import torch.distributed as td

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        td.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g).to(g.dtype))
            offset += n

    def all_mean(self, value: float) -> float:
        if not self.active:
            return value
        import torch.distributed as td

        t = torch.tensor([value], dtype=torch.float64)
        if td.get_backend() == "nccl":
            t = t.cuda()
        td.all_reduce(t)
        return float(t.item()) / self.world

    def any_true(self, flag: bool) -> bool:
        """True on every process when it is true on any. Ctrl-C reaches each process at its own moment: one that
        stopped alone would leave the others waiting in the next step's all-reduce for ever."""
        if not self.active:
            return flag
        import torch.distributed as td

        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        if td.get_backend() == "nccl":
            t = t.cuda()
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_parameters(self, params: list[torch.Tensor]) -> None:
        """Start every process from the main process's initial weights."""
        if not self.active:
            return
        import torch.distributed as td

        with torch.no_grad():
            for p in params:
                td.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()


_CURRENT: Dist | None = None


def init_distributed() -> Dist:
    """Join the process group `accelerate launch` (or torchrun) set up through the environment; a single process
    when WORLD_SIZE is absent or 1. Safe to call more than once."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CURRENT = Dist()
        return _CURRENT
    import torch.distributed as td

    if not td.is_initialized():
        use_nccl = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")
        td.init_process_group(backend="nccl" if use_nccl else "gloo")
    _CURRENT = Dist(rank=td.get_rank(), world=td.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if _CURRENT.device().type == "cuda":
        torch.cuda.set_device(_CURRENT.device())
    return _CURRENT


def current() -> Dist:
    return _CURRENT or Dist()
