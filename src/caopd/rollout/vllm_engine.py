"""vLLM rollouts for GPU machines: the same interface and outputs as the transformers engine.

Written against vLLM 0.33.0 (paths below are inside its wheel) and TRL 1.16's colocate mode
(``trl/generation/vllm_generation.py``), which it follows:

* **In-process engine, always.** ``distributed_executor_backend="external_launcher"`` makes vLLM run its engine in
  this process (``vllm/config/parallel.py`` ``ParallelConfig.__post_init__`` sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
  and only then does ``llm.llm_engine.model_executor`` exist (``vllm/v1/engine/llm_engine.py``: set only when not in
  multiprocess mode), the path to the model's ``load_weights`` (``model_executor.driver_worker.model_runner.model``:
  ``UniProcExecutor.driver_worker`` is a ``WorkerWrapperBase`` that forwards attributes to the GPU worker, whose
  ``model_runner.model`` is the model, reached through vLLM's CUDA-graph wrapper's ``__getattr__``). TRL uses the
  launcher for one process too: the launcher reads ``RANK`` and ``LOCAL_RANK`` (``vllm/v1/executor/uniproc_executor.py``
  ``ExecutorWithExternalLauncher._distributed_args``) and, without a process group, torch's ``env://`` rendezvous
  reads ``MASTER_ADDR``/``MASTER_PORT``; ``use_external_launcher`` sets them as TRL does.
* **Sized, and checked first** (``caopd.config.engines``): ``max_model_len`` (else the model's whole context, 40,960
  tokens for Qwen3-8B), ``max_num_seqs``, ``max_num_batched_tokens`` and the memory share; vLLM's start-up condition
  (free memory ≥ total × share) is checked before vLLM is started, with a message that says what to change.
* **Sleep mode when colocated** (TRL's order): after sampling the engine sleeps at level 2 (weights and KV cache
  released: the trainer's forward and backward get the memory); ``sync_weights`` empties torch's cache, wakes the
  weights and loads the trained ones; the next ``generate`` wakes the KV cache first. vLLM 0.33 does not refuse a
  request while asleep — it queues it behind the paused scheduler and ``LLM.generate`` waits forever
  (``vllm/v1/engine/core.py`` ``pause_scheduler``) — so the engine wakes before every sampling.
* **Per-request seeds**: vLLM seeds child i of a request seeded s with s + i (``vllm/v1/engine/parallel_sampling.py``
  ``ParentRequest._get_child_sampling_params``); prompt p's request gets ``base + p·n`` (``request_seeds``), so no
  two samples of a call share a noise stream.
* **One engine at a time, shut down explicitly** (``shutdown``; also a context manager): vLLM 0.33's ``LLM`` has no
  shutdown; its in-process client's (``vllm/v1/engine/core_client.py`` ``InprocClient.shutdown``, idempotent) shuts
  the executor down (the worker, ``destroy_model_parallel``) and runs ``cleanup_dist_env_and_memory``
  (``vllm/distributed/parallel_state.py``: model-parallel groups, the default process group, gc, empty cache).
* **Completions as vLLM returns them**: ``token_ids`` end with the stop token when the sample stopped on one (the
  scheduler appends it before ``check_stop``, ``vllm/v1/core/sched/scheduler.py`` ``_update_request_with_output``;
  the detokenizer leaves it out of the text only, ``vllm/v1/engine/detokenizer.py``
  ``BaseIncrementalDetokenizer.update``); vLLM stops on the tokenizer's EOS and every ``eos_token_id`` of the
  generation config (``vllm/sampling_params.py`` ``update_from_generation_config``).
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from caopd.config.engines import (
    DeviceMemory,
    ModelShape,
    RunLengths,
    VLLMConfig,
    check_startup,
    size_vllm,
)
from caopd.config.sampling import SamplingConfig, check_draws
from caopd.rollout.base import Completion, Prompt, RolloutEngine

# vLLM keeps request seeds in int64 (vllm/v1/worker/gpu/sample/states.py): every seed, + n, must stay below 2**63.
SEED_BITS = 62
SLEEP_LEVEL = 2  # weights and KV cache released: the weights are reloaded from the trainer after every step anyway
ALL_TAGS = frozenset({"weights", "kv_cache"})  # vllm/v1/executor/abstract.py SLEEP_TAGS


def vllm_available() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def request_seeds(seed: int, n_prompts: int, n: int) -> list[int]:
    """The seed of each prompt's request: ``base + p·n``, where ``base`` is a 62-bit hash of ``seed``. vLLM draws
    sample i of a request seeded s from s + i, so the call's samples get the distinct streams base … base + P·n − 1;
    another seed (another step) starts elsewhere in the 62-bit range."""
    digest = hashlib.sha256(f"caopd-vllm-requests:{seed}".encode()).digest()
    base = int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)
    return [base + p * n for p in range(n_prompts)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_chosen_port: str | None = None  # the rendezvous port this module picked, replaced for the next engine


def use_external_launcher(rank: int, world_size: int) -> None:
    """The environment vLLM's external launcher reads, as TRL's colocate mode sets it: ``RANK``, ``LOCAL_RANK`` (the
    one torchrun gave, else 0) and ``WORLD_SIZE``; ``MASTER_ADDR`` (default localhost) and a free ``MASTER_PORT``
    unless one is given (``trl/trainer/utils.py`` ``ensure_master_addr_port``). Under torchrun the process group
    exists already and vLLM joins it; alone, vLLM makes a one-process group on that port, which ``shutdown``
    destroys, and the next engine takes a new port."""
    global _chosen_port
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = os.environ.get("LOCAL_RANK") or "0"
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["MASTER_ADDR"] = os.environ.get("MASTER_ADDR") or "localhost"
    port = os.environ.get("MASTER_PORT", "").strip().lower()
    if port in ("", "0", "auto") or port == _chosen_port:
        _chosen_port = os.environ["MASTER_PORT"] = str(free_port())


def device_memory() -> DeviceMemory:
    """This process's GPU's free and total memory, measured as vLLM measures it at start-up: after a garbage
    collection and with torch's unused cached blocks handed back (``vllm/v1/worker/gpu_worker.py`` ``init_device``)."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return DeviceMemory(free=int(free), total=int(total))


class VLLMEngine(RolloutEngine):
    """One vLLM engine in this process, sized for the run. Standalone (rollout estimation, evaluation) it has the
    card to itself; colocated (training) it shares it with the trainer, sleeps while the trainer trains, and takes
    the trained weights after every optimizer step."""

    holds_own_weights = True

    def __init__(self, model_path: str, tokenizer: Any, config: Mapping[str, Any], settings: VLLMConfig,
                 run: RunLengths, *, colocated: bool = False, rank: int = 0, world_size: int = 1,
                 trainer_pending_bytes: int = 0, parameters: int | None = None) -> None:
        """``config``: the model's config.json values; ``parameters``: its exact parameter count when known (else
        estimated from the config); ``trainer_pending_bytes``: what the colocated trainer will still allocate
        (gradients, optimizer state). Under torchrun each process runs its own engine; each request carries its own seed
        (``request_seeds``, from the sampling seed the trainer gives each process), so vLLM's engine seed (the rank)
        decides no sample."""
        from vllm import LLM

        from caopd.models.loading import remote_code_allowed

        self.tokenizer = tokenizer
        self.colocated = colocated
        self.sleep_mode = colocated and settings.sleep
        device = device_memory()
        self.sizing = size_vllm(settings, ModelShape.from_config(config, parameters), run, device, colocated,
                                trainer_pending_bytes)
        check_startup(device.free, device.total, self.sizing.gpu_memory_utilization)
        use_external_launcher(rank, world_size)
        self.llm: Any = LLM(model=model_path, dtype=settings.dtype, seed=rank,
                            trust_remote_code=remote_code_allowed(), distributed_executor_backend="external_launcher",
                            enable_sleep_mode=self.sleep_mode, **self.sizing.engine_args())
        self.asleep: set[str] = set()  # the sleep tags released now

    # --- sleep mode ----------------------------------------------------------------------------------
    def _wake(self, tag: str) -> None:
        if tag in self.asleep:
            self.llm.wake_up(tags=[tag])
            self.asleep.discard(tag)

    def _sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=SLEEP_LEVEL)
            self.asleep = set(ALL_TAGS)

    def _live(self) -> Any:
        if self.llm is None:
            raise RuntimeError("the vLLM engine was shut down")
        return self.llm

    # --- the interface -------------------------------------------------------------------------------
    def sync_weights(self, model: Any) -> None:
        """Load the student's current weights into the engine, one tensor at a time (whole ones under FSDP: every
        process takes part in gathering each; with LoRA, each adapted weight merged with its adapter), and drop the
        prefix cache computed with the old ones. Asleep, the weights wake first, after torch's cached blocks (the
        backward's activations) are handed back."""
        import torch

        from caopd.models.lora import streamed_weights

        llm = self._live()
        if "weights" in self.asleep:
            torch.cuda.empty_cache()
            self._wake("weights")
        runner = llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, tensor in streamed_weights(model):  # LoRA: each adapted weight merged with its adapter
            runner.load_weights([(name, tensor)])
        llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig,
                 progress: bool = False) -> list[list[Completion]]:
        # vLLM 0.33: ``vllm.inputs.TokensPrompt`` is a TypedDict whose required key is ``prompt_token_ids``
        # (list[int]); ``LLM.generate`` takes a sequence of them and one SamplingParams per prompt. Texts are encoded
        # here, as the transformers engine encodes them, so that both engines sample from the same ids.
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from caopd.models.loading import encode_text

        check_draws(sampling.temperature, sampling.n, "sampling.temperature")
        llm = self._live()
        if "weights" in self.asleep:
            raise RuntimeError("the vLLM engine's weights were released when it slept: sync_weights loads the "
                               "trained ones before the next sampling")
        self._wake("kv_cache")
        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, seed=seed)
                  for seed in request_seeds(sampling.seed, len(prompts), sampling.n)]
        requests = [TokensPrompt(prompt_token_ids=encode_text(self.tokenizer, p) if isinstance(p, str) else list(p))
                    for p in prompts]
        try:
            outputs = llm.generate(requests, params, use_tqdm=progress)
        finally:
            self._sleep()  # the trainer's turn (colocated with sleep mode; else a no-op)
        return [[Completion(o.text, list(o.token_ids), o.finish_reason == "stop") for o in out.outputs]
                for out in outputs]

    def shutdown(self) -> None:
        """Release the engine now (idempotent): its executor and worker, vLLM's process groups, its GPU memory."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        import torch

        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()

