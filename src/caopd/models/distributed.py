"""Data-parallel training under torchrun: each process samples and scores its share of a step's prompts, the
gradients are summed across processes before clipping, and every process takes the same optimizer step.

The step's loss stays the token mean over the whole batch (every process divides by the global token count), so
the summed gradient is the single-process one; only the order of float sums differs. Outside torchrun (no
``WORLD_SIZE``) everything here is a no-op and training runs in one process as before.

With ``sharding='fsdp'`` (FSDP2) each process keeps only its shard of the weights, the gradients and the optimizer
state. Sampling from the live student gathers it whole once per step (it needs every layer at every token; a
colocated vLLM engine instead gets the weights one tensor at a time); the loss's forwards and backwards gather one
layer at a time, in lock step across the processes (equal shares of the step, the same number of forwards per
micro-batch), and reduce-scatter the gradients. Under bf16 the shards stay float32 and are all-gathered in bfloat16
(``mixed_precision``).

Under torchrun only rank 0 reads the weights from disk; the others build the model on the meta device and get
theirs from rank 0: their shards (``shard_models``), or replicated their whole copy (``replicate_models``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    fsdp: bool = False  # the weights are sharded across the processes (FSDP2), not replicated

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


def init_world(sharding: str = "replicate", timeout_minutes: float = 30.0) -> World:
    """The process group torchrun describes in the environment (gloo on CPU, NCCL on GPUs); one process else
    (where there is nothing to shard). One process that torchrun started with ``sharding='fsdp'`` joins a group of
    one and runs the sharded path as asked (what a single-GPU check of that path needs). ``timeout_minutes``: how
    long any collective waits for every process (``TrainStageConfig.collective_timeout_minutes``) before the run
    fails."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun alone (not by vLLM's launcher variables)
    if size <= 1 and not (under_torchrun and sharding == "fsdp"):
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        join_process_group(timeout_minutes)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), fsdp=sharding == "fsdp")


def join_process_group(timeout_minutes: float) -> None:
    """Join torchrun's process group (``env://``: RANK, WORLD_SIZE, MASTER_ADDR/PORT) with this collective timeout.
    The timeout must be set here: NCCL's default is 10 minutes, shorter than gathering a large model on rank 0 while
    the other processes wait, and the FSDP device mesh reuses this group (and its timeout)."""
    import torch.distributed as dist

    if torch.cuda.is_available():  # one GPU per process: the model, its tensors and NCCL's buffers live there
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                            timeout=timedelta(minutes=timeout_minutes))


def process_rank() -> int:
    """This process's rank from torchrun's environment, before any process group exists (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


# --- FSDP: the weights, gradients and optimizer state split across the processes ---------------------------------

def mesh_device() -> torch.device:
    """Where this process's shards live: its GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mixed_precision(param_dtype: torch.dtype | None) -> Any:
    """FSDP2's policy for a compute dtype: the shards (the optimizer's master weights) keep their dtype, the
    all-gathered parameters and so the forwards and backwards are ``param_dtype``, and the gradients are
    reduce-scattered in float32 (a bfloat16 sum over many processes would lose the small ones). None: no cast."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def decoder_layer_classes(model: torch.nn.Module) -> set[str]:
    """The class names of a model's decoder layers (transformers' ``_no_split_modules``), each an FSDP unit. A
    ``peft.PeftModel`` forwards the attribute to the model it wraps, whose layers hold the adapters: a layer's frozen
    base weights and its trainable adapters are then one unit."""
    layers = set(getattr(model, "_no_split_modules", None) or ())
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules): FSDP would "
                         "gather the whole model at once; use sharding='replicate'")
    return layers


def shard_model(model: torch.nn.Module, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2 over every process: each decoder layer (the model's ``_no_split_modules``) is one unit, the rest
    (embeddings, final norm, head) the root's. Gradients are summed, not averaged, across processes: the loss
    already divides by the whole step's token count. ``param_dtype``: the compute dtype (``mixed_precision``).
    A model on the meta device stays there (``shard_models`` materialises and fills it)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(mesh_device().type, (dist.get_world_size(),))
    layers = decoder_layer_classes(model)
    policy = mixed_precision(param_dtype)
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # a plain sum: gloo has no pre-multiplied one
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def shard_models(models: Iterable[torch.nn.Module | None], param_dtype: torch.dtype | None = None) -> None:
    """Shard each distinct model (a teacher that is the student is sharded once) and give every process rank 0's
    weights. Rank 0 holds the real weights (loaded on the CPU: ``load_model(weights="cpu")``); the other processes
    may hold the same architecture on the meta device (``weights="meta"``: nothing read, nothing allocated). After
    sharding, each process's shards are allocated on its device and filled from rank 0's copy, one tensor at a time
    (``set_model_state_dict(broadcast_from_rank0=True)``), so no process ever holds a second whole copy. Buffers,
    which are not sharded, are broadcast whole: the non-persistent ones (rotary ``inv_freq``) are in no state dict,
    and a meta-built model has none to compute them from. Collective: every process calls it with its models in
    the same order."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from caopd.models.attention import use_cpu_attention

    device = mesh_device()
    for model in {id(m): m for m in models if m is not None}.values():
        # References to rank 0's whole tensors: sharding moves the model's parameters, these stay for the broadcast.
        whole = dict(model.state_dict()) if dist.get_rank() == 0 else {}
        was_meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
        shard_model(model, param_dtype)
        if was_meta:
            model.to_empty(device=device)  # the shards and buffers allocated, uninitialised: filled just below
        set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del whole
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        if was_meta:  # what load_model does for a model on the CPU, now that this one is there
            use_cpu_attention(model)


def replicate_models(models: Iterable[torch.nn.Module | None]) -> None:
    """Replicated training under torchrun: give every process rank 0's weights, whole, on its own device. Rank 0
    read them (``load_model(weights="cpu")``), the other processes built the architecture on the meta device, so no
    process but rank 0 ever holds a copy in the CPU's memory; each tensor is broadcast from rank 0's device copy into
    the others'. Collective: every process calls it with its models in the same order."""
    import torch.distributed as dist

    from caopd.models.attention import use_cpu_attention

    device = mesh_device()
    for model in {id(m): m for m in models if m is not None}.values():
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            model.to_empty(device=device)  # allocated, uninitialised: filled just below
            if hasattr(model, "tie_weights"):  # to_empty gives the tied head a tensor of its own: one again
                model.tie_weights()
        else:
            model.to(device)
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):  # a tied weight once: one Parameter
                dist.broadcast(tensor.data, src=0)
        if torch.device(device).type == "cpu":
            use_cpu_attention(model)


def _fsdp_units(models: Iterable[torch.nn.Module]) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    seen: dict[int, Any] = {}
    for model in models:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                seen.setdefault(id(module), module)
    return list(seen.values())


@contextlib.contextmanager
def gathered(*models: torch.nn.Module) -> Iterator[None]:
    """The whole weights on every process for sampling, gathered once and split again at the end: inside, no
    forward waits for the other processes, so their sampling may stop at different lengths."""
    units = _fsdp_units(models)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def reshard(*models: torch.nn.Module | None) -> None:
    """Back to shards only (no communication): FSDP keeps a root module gathered after a forward, and the EMA
    update pairs the teacher's parameters with the student's shard for shard."""
    for unit in _fsdp_units(m for m in models if m is not None):
        unit.reshard()


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value made whole, e.g. the gradient norm; a plain tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
