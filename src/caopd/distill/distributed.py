"""Data-parallel training under torchrun: each process samples and scores its share of a step's prompts, the
gradients are summed across processes before clipping, and every process takes the same optimizer step.

The step's loss stays the token mean over the whole batch (every process divides by the global token count), so
the summed gradient is the single-process one; only the order of float sums differs. Outside torchrun (no
``WORLD_SIZE``) everything here is a no-op and training runs in one process as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share: every ``size``-th item from ``rank`` on."""
        return list(items[self.rank::self.size])

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums across processes (float64, so counts stay exact)."""
        if self.size == 1:
            return list(values)
        import torch.distributed as dist

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient across processes, in one flat all-reduce."""
        if self.size == 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in parameters if p.requires_grad]
        if any(g is None for g in grads):
            raise RuntimeError("a parameter has no gradient on this process; every process must run the loss")
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


def init_world() -> World:
    """The process group torchrun describes in the environment (gloo on CPU, NCCL on GPUs); one process else."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per process: the model, its tensors and NCCL's buffers live there
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size())


def process_rank() -> int:
    """This process's rank from torchrun's environment, before any process group exists (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))
