"""A fake ``vllm`` (0.33.0) for machines without a GPU, installed into ``sys.modules`` by ``install`` (the
``fake_gpu`` fixtures of the tests), with a fake GPU (``FakeGPU``) behind ``torch.cuda``.

It really generates, with the checkpoint it is given (the packaged tiny model in the tests) on the CPU, and it
mirrors the behaviours of vLLM 0.33.0 that caopd relies on. Each one cites the file inside the vLLM 0.33.0 wheel
(``vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl``) and the function it was read from:

1. In-process engine only with the external launcher: ``distributed_executor_backend="external_launcher"`` sets
   ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (vllm/config/parallel.py, ``ParallelConfig.__post_init__``), and
   ``LLMEngine`` has a ``model_executor`` only when not in multiprocess mode (vllm/v1/engine/llm_engine.py,
   ``LLMEngine.__init__``: ``if not multiprocess_mode: self.model_executor = ...``). The launcher reads ``RANK``
   and ``LOCAL_RANK`` (vllm/v1/executor/uniproc_executor.py, ``ExecutorWithExternalLauncher._distributed_args``)
   and refuses multiprocessing (``_init_executor``'s assert); without a process group, vLLM makes one through
   torch's ``env://`` rendezvous (vllm/distributed/parallel_state.py, ``init_distributed_environment``), which
   needs ``MASTER_ADDR``/``MASTER_PORT`` — the fake makes a real one-process gloo group the same way.
2. The model behind ``llm.llm_engine.model_executor.driver_worker.model_runner.model`` (``UniProcExecutor``'s
   ``driver_worker`` is a ``WorkerWrapperBase`` forwarding attributes to the worker, vllm/v1/worker/worker_base.py
   ``__getattr__``; vLLM reaches the model by the same chain in ``LLMEngine._get_driver_model_for_cleanup``) takes
   ``load_weights`` of (HF name, tensor) pairs and returns the names it loaded.
3. The start-up memory check (vllm/v1/worker/utils.py, ``request_memory``): free memory (the card's, all processes)
   below ``ceil(total × gpu_memory_utilization)`` raises ``ValueError("Free memory on device ... on startup is less
   than desired GPU memory utilization ...")``, message as vLLM writes it (``format_gib``: vllm/utils/mem_utils.py).
   The engine then holds ``ceil(total × utilization)`` until it is shut down.
4. Sequence limits: ``max_model_len`` beyond the config's context raises (vllm/config/model.py,
   ``_get_and_verify_max_len``); ``max_num_batched_tokens < max_num_seqs`` raises (vllm/config/scheduler.py,
   ``verify_max_model_len``); a prompt not shorter than ``max_model_len`` raises (vllm/v1/engine/input_processor.py,
   ``_validate_prompt_len``); the KV cache must hold one ``max_model_len`` sequence
   (vllm/v1/core/kv_cache_planning.py, ``_check_enough_kv_cache_memory``) — the fake counts only the weights as
   the engine's other memory (vLLM also profiles activations).
5. Stopping: the sampled token is appended before the stop check, which tests the EOS, then ``stop_token_ids``,
   then the length (vllm/v1/core/sched/utils.py, ``check_stop``; vllm/v1/core/sched/scheduler.py,
   ``_update_request_with_output`` keeps the stop token in ``new_token_ids``); the tokenizer's EOS and every
   ``eos_token_id`` of generation_config.json stop a sample (vllm/sampling_params.py,
   ``update_from_generation_config``, called by vllm/v1/engine/input_processor.py ``process_inputs``). The stop token
   stays in ``token_ids`` but not in ``text`` (vllm/v1/engine/detokenizer.py, ``BaseIncrementalDetokenizer.update``);
   the text skips special tokens (``SamplingParams.skip_special_tokens`` defaults to True);
   ``finish_reason`` is "stop" or "length" (vllm/v1/engine/output_processor.py, ``_new_completion_output``).
6. Seeds: child i of a request with ``n`` > 1 and seed s is seeded s + i (vllm/v1/engine/parallel_sampling.py,
   ``ParentRequest._get_child_sampling_params``); a seeded request draws from its own generator seeded with its seed
   (vllm/v1/worker/gpu_model_runner.py: ``generator.manual_seed(sampling_params.seed)``); ``seed=-1`` means None.
7. ``SamplingParams`` checks (vllm/sampling_params.py, ``__post_init__``/``_verify_args``): temperature in [0, 2],
   top_p in (0, 1], a temperature below ``_SAMPLING_EPS`` (1e-5) is greedy and greedy with n > 1 raises
   ``VLLMValidationError("n must be 1 when using greedy sampling, got {n}.")`` (``_verify_greedy_sampling``;
   vllm/exceptions.py: a ``VLLMClientError``, not a ``ValueError``); 0 < temperature < 0.01 is raised to 0.01.
8. Sleep mode (vllm/v1/engine/core.py ``EngineCore.sleep``/``wake_up``; vllm/v1/executor/abstract.py
   ``Executor.sleep``/``wake_up``; vllm/v1/worker/gpu_worker.py ``Worker.sleep``): sleeping pauses the scheduler and,
   at level ≥ 1, releases the memory of the tags "weights" and "kv_cache" — only when ``enable_sleep_mode`` put it in
   the cumem pool (vllm/config/model.py turns the cumem allocator on for sleep mode; ``_maybe_get_memory_pool_context``
   uses no pool otherwise). Level 2 discards the weights' contents (the fake fills them with NaN on waking);
   ``wake_up(tags)`` maps the tags' memory again and resumes the scheduler once nothing sleeps; sleeping twice or
   waking a tag that does not sleep only warns. A request while asleep is queued behind the paused scheduler and
   ``LLM.generate`` loops forever (vllm/v1/engine/core.py ``pause_scheduler``: "All pause modes queue new adds";
   vllm/entrypoints/common/offline.py ``_run_engine``): the fake raises instead of hanging. Writing weights while
   they sleep writes to unmapped memory (trl/generation/vllm_generation.py, ``sync_weights``'s comment): the fake
   raises.
9. Shutting down: ``LLM`` has no ``shutdown``; ``llm.llm_engine.engine_core`` (vllm/v1/engine/core_client.py,
   ``InprocClient.shutdown``, idempotent through its finalizer's ``detach``) shuts the executor down and runs
   ``cleanup_dist_env_and_memory`` (vllm/distributed/parallel_state.py: the default process group destroyed, gc,
   empty cache). Real vLLM also does this when the client is garbage-collected (its ``weakref.finalize``); the fake
   does not, so that an engine left to the garbage collector shows as still holding its memory.
10. ``LLM(...)`` keyword arguments go to ``EngineArgs``, a dataclass: an unknown one raises ``TypeError``
    (vllm/entrypoints/llm.py ``LLM.__init__``); ``gpu_memory_utilization`` defaults to 0.92, ``seed`` to 0.
    Unset ``max_num_seqs``/``max_num_batched_tokens`` take the defaults of vllm/engine/arg_utils.py
    (``_set_default_max_num_seqs_and_batched_tokens_args``: 256 / 8192 below 70 GiB, 1024 / 16384 above).

Not mirrored: the fake decodes in float32 whatever ``dtype`` says (the dtype only sizes its memory), decodes one
sample at a time, and knows nothing of CUDA graphs, chunked prefill or preemption.
"""

from __future__ import annotations

import json
import math
import os
import sys
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

GIB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}
_SAMPLING_EPS = 1e-5  # vllm/sampling_params.py
_MAX_TEMP = 1e-2  # vllm/sampling_params.py
KV_BLOCK_TOKENS = 16
SLEEP_TAGS = frozenset(("weights", "kv_cache"))  # vllm/v1/executor/abstract.py
# transformers 5.24 renamed the KV cache past_key_values → cache (keyword and output field); 5.20 has the old name
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"
KNOWN_ENGINE_ARGS = frozenset({  # the EngineArgs fields LLM(...) may be given here
    "distributed_executor_backend", "enable_sleep_mode", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "enforce_eager", "disable_log_stats", "model_impl", "logprobs_mode", "quantization", "data_parallel_size"})

CURRENT_GPU: FakeGPU | None = None  # the card the fake engines run on (set by ``install``)


def format_gib(b: int) -> str:  # vllm/utils/mem_utils.py
    return f"{round(b / GIB, 2)}"


class VLLMValidationError(Exception):
    """vllm/exceptions.py: VLLMError(Exception) → VLLMClientError → VLLMValidationError."""


# --- the fake card ---------------------------------------------------------------------------------------------
class FakeGPU:
    """One GPU's memory: what other processes hold (``other``), the HF weights caopd puts on it (through
    ``caopd.models.loading.to_device``, the one function that places a loaded model; the model itself stays on the
    CPU) and what the fake engines reserve. ``torch.cuda.mem_get_info`` reads it."""

    def __init__(self, total: int = 24 * GIB, other: int = 0) -> None:
        self.total, self.other = total, other
        self.hf_bytes = 0  # HF weights placed on the card
        self.hf_models = 0
        self.engine_bytes = 0  # what the engines hold now
        self.engines: list[FakeLLM] = []
        self.max_alive = 0  # the most engines alive at once
        self.empty_cache_calls = 0
        self.events: list[tuple[Any, ...]] = []  # (what, engine number, detail): the engines' calls, in order

    @property
    def used(self) -> int:
        return self.other + self.hf_bytes + self.engine_bytes

    @property
    def free(self) -> int:
        return self.total - self.used

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        return self.free, self.total

    def empty_cache(self) -> None:
        self.empty_cache_calls += 1
        self.events.append(("empty_cache", None, None))

    def place(self, model: torch.nn.Module, device: str) -> torch.nn.Module:
        """``caopd.models.loading.to_device``: weights bound for a GPU are accounted here and stay on the CPU."""
        if str(device).startswith("cuda"):
            nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
            self._take(nbytes, "HF model weights")
            self.hf_bytes += nbytes
            self.hf_models += 1
        return model

    def reserve(self, nbytes: int, what: str) -> None:
        self._take(nbytes, what)
        self.engine_bytes += nbytes

    def release(self, nbytes: int) -> None:
        self.engine_bytes -= nbytes

    def _take(self, nbytes: int, what: str) -> None:
        if nbytes > self.free:
            raise torch.OutOfMemoryError(f"CUDA out of memory (fake GPU): {format_gib(nbytes)} GiB for {what}, "
                                         f"{format_gib(self.free)} GiB free of {format_gib(self.total)} GiB")

    @property
    def alive(self) -> list[FakeLLM]:
        return [e for e in self.engines if not e.is_shut_down]


# --- vllm.SamplingParams, vllm.inputs, vllm.outputs ----------------------------------------------------------------
class SamplingParams:
    """vllm/sampling_params.py ``SamplingParams`` (the fields caopd uses)."""

    def __init__(self, n: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 max_tokens: int | None = 16, seed: int | None = None, stop_token_ids: list[int] | None = None,
                 skip_special_tokens: bool = True, ignore_eos: bool = False) -> None:
        self.n, self.temperature, self.top_p, self.top_k = n, temperature, top_p, top_k
        self.max_tokens, self.seed, self.skip_special_tokens, self.ignore_eos = max_tokens, seed, \
            skip_special_tokens, ignore_eos
        self.stop_token_ids = list(dict.fromkeys(stop_token_ids or []))
        self.eos_token_id: int | None = None
        if 0 < self.temperature < _MAX_TEMP:  # __post_init__
            self.temperature = _MAX_TEMP
        if self.seed == -1:
            self.seed = None
        if self.n < 1:
            raise VLLMValidationError(f"n must be at least 1, got {self.n}.")
        if not 0.0 <= self.temperature <= 2.0:  # _verify_args
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.temperature < _SAMPLING_EPS:  # greedy: _verify_greedy_sampling
            self.top_p, self.top_k = 1.0, 0
            if self.n > 1:
                raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")

    def clone(self) -> SamplingParams:
        copy = SamplingParams.__new__(SamplingParams)
        copy.__dict__.update(self.__dict__)
        copy.stop_token_ids = list(self.stop_token_ids)
        return copy

    def update_from_generation_config(self, generation_config: dict[str, Any], eos_token_id: int | None) -> None:
        """vllm/sampling_params.py: the tokenizer's EOS stops; so does every eos_token_id of the generation
        config (added to stop_token_ids)."""
        if not self.ignore_eos:
            self.eos_token_id = eos_token_id
        eos_ids = generation_config.get("eos_token_id")
        if eos_ids is not None:
            eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
            eos_ids.discard(eos_token_id)
            if eos_ids and not self.ignore_eos:
                self.stop_token_ids = list(eos_ids | set(self.stop_token_ids))


def TokensPrompt(*, prompt_token_ids: list[int], **extra: Any) -> dict[str, Any]:  # noqa: N802 -- vLLM's name
    """vllm/inputs: a TypedDict whose required key is ``prompt_token_ids``."""
    return {"prompt_token_ids": prompt_token_ids, **extra}


@dataclass
class CompletionOutput:  # vllm/outputs.py
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: Any
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # vllm/outputs.py
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


# --- the engine ----------------------------------------------------------------------------------------------------
class FakeModel(torch.nn.Module):
    """The model vLLM's worker holds; ``load_weights`` as vLLM's model classes have it."""

    def __init__(self, hf: torch.nn.Module, engine: FakeLLM) -> None:
        super().__init__()
        self.hf = hf
        self._engine = [engine]  # not a submodule

    def load_weights(self, weights: Any) -> set[str]:
        engine = self._engine[0]
        if "weights" in engine.sleeping_tags and engine.pooled:
            raise RuntimeError("fake vLLM: load_weights while the weights sleep writes to unmapped memory "
                               "(trl/generation/vllm_generation.py sync_weights: wake the weights first)")
        params = dict(self.hf.named_parameters())
        loaded = set()
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor.to(params[name].dtype))  # an unknown name raises KeyError, as in vLLM
                loaded.add(name)
        engine.gpu.events.append(("load_weights", engine.number, len(loaded)))
        engine.weights_loaded += len(loaded)
        return loaded


@dataclass
class _Runner:
    model: FakeModel


@dataclass
class _Worker:
    model_runner: _Runner


@dataclass
class _Executor:
    driver_worker: _Worker


class _InprocClient:
    """vllm/v1/engine/core_client.py ``InprocClient``: ``shutdown`` runs once."""

    def __init__(self, engine: FakeLLM) -> None:
        self._engine: FakeLLM | None = engine

    def shutdown(self, timeout: float | None = None) -> None:
        engine, self._engine = self._engine, None  # the finalizer's detach(): the second call does nothing
        if engine is not None:
            engine._shutdown()


class _LLMEngine:
    """vllm/v1/engine/llm_engine.py ``LLMEngine``: ``model_executor`` only with the engine in-process."""

    def __init__(self, engine: FakeLLM, multiprocess_mode: bool) -> None:
        self.engine_core = _InprocClient(engine)
        if not multiprocess_mode:
            self.model_executor = _Executor(_Worker(_Runner(engine.model)))


class FakeLLM:
    """``vllm.LLM`` (vllm/entrypoints/llm.py) on ``CURRENT_GPU``."""

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.92, trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, **kwargs: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        for name in kwargs:  # 10: EngineArgs is a dataclass
            if name not in KNOWN_ENGINE_ARGS:
                raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument '{name}'")
        gpu = CURRENT_GPU
        assert gpu is not None, "install the fake first"
        self.gpu, self.path, self.dtype, self.seed = gpu, model, dtype, seed
        self.kwargs = dict(kwargs, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed)
        self.is_shut_down = False
        self.sleeping_tags: set[str] = set()
        self.paused = False
        self.level = 0  # the last sleep's level
        self.weights_loaded = 0
        self.requests: list[dict[str, Any]] = []  # every request: prompt ids and its children's seeds
        self.number = len(gpu.engines)
        folder = Path(model)
        config = json.loads((folder / "config.json").read_text())
        generation = folder / "generation_config.json"
        self.generation_config = json.loads(generation.read_text()) if generation.is_file() else {}
        # 4: vllm/config/model.py _get_and_verify_max_len
        derived = int(config.get("max_position_embeddings") or 1 << 30)
        self.max_model_len = int(kwargs.get("max_model_len") or derived)
        if self.max_model_len > derived:
            raise ValueError(f"User-specified max_model_len ({self.max_model_len}) is greater than the derived "
                             f"max_model_len (max_position_embeddings={derived} or model_max_length=None in model's "
                             "config.json). To allow overriding this maximum, set the env var "
                             "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1.")
        # 10: vllm/engine/arg_utils.py defaults by card size; 4: vllm/config/scheduler.py verify_max_model_len
        big = gpu.total >= 70 * GIB
        self.max_num_seqs = int(kwargs.get("max_num_seqs") or (1024 if big else 256))
        self.max_num_batched_tokens = int(kwargs.get("max_num_batched_tokens") or (16384 if big else 8192))
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be greater than or equal "
                             f"to max_num_seqs ({self.max_num_seqs}).")
        self.enable_sleep_mode = bool(kwargs.get("enable_sleep_mode", False))
        self.pooled = self.enable_sleep_mode  # the cumem pool holds the weights and the KV cache
        # 1: vllm/config/parallel.py ParallelConfig.__post_init__
        self.backend = kwargs.get("distributed_executor_backend")
        if self.backend == "external_launcher":
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        multiprocess = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1").lower() not in ("0", "false")
        if self.backend == "external_launcher":
            assert not multiprocess, "To get deterministic execution, please set VLLM_ENABLE_V1_MULTIPROCESSING=0"
            self.rank, self.local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
            if not torch.distributed.is_initialized():  # vllm/distributed/parallel_state.py
                torch.distributed.init_process_group(backend="gloo", init_method="env://", world_size=1,
                                                     rank=self.rank)
        # 3: vllm/v1/worker/utils.py request_memory
        free, total = gpu.mem_get_info()
        requested = math.ceil(total * gpu_memory_utilization)
        if free < requested:
            raise ValueError(f"Free memory on device cuda:0 ({format_gib(free)}/{format_gib(total)} GiB) on startup "
                             f"is less than desired GPU memory utilization ({gpu_memory_utilization}, "
                             f"{format_gib(requested)} GiB). Decrease GPU memory utilization or reduce GPU memory "
                             "used by other processes.")
        from caopd.models.loading import hf_progress_bars

        with hf_progress_bars(False):
            hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.weights_bytes = sum(p.numel() for p in hf.parameters()) * DTYPE_BYTES[dtype]
        # 4: vllm/v1/core/kv_cache_planning.py _check_enough_kv_cache_memory (non-KV memory: the weights only)
        heads = config["num_attention_heads"]
        kv_per_token = (2 * config["num_hidden_layers"] * (config.get("num_key_value_heads") or heads)
                        * (config.get("head_dim") or config["hidden_size"] // heads) * DTYPE_BYTES[dtype])
        available_kv = requested - self.weights_bytes
        needed_kv = math.ceil(self.max_model_len / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS * kv_per_token
        if available_kv <= 0:
            raise ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
                             "when initializing the engine.")
        if needed_kv > available_kv:
            raise ValueError(f"To serve at least one request with the model's max seq len ({self.max_model_len}), "
                             f"({format_gib(needed_kv)} GiB KV cache is needed, which is larger than the available KV "
                             f"cache memory ({format_gib(available_kv)} GiB).")
        self.requested = requested
        gpu.reserve(requested, "vLLM engine")
        self.held = {"weights": self.weights_bytes, "kv_cache": requested - self.weights_bytes}
        self.model = FakeModel(hf, self)
        self.llm_engine = _LLMEngine(self, multiprocess)
        gpu.engines.append(self)
        gpu.max_alive = max(gpu.max_alive, len(gpu.alive))
        gpu.events.append(("start", self.number, gpu_memory_utilization))

    # --- 8: sleep mode -------------------------------------------------------------------------------------------
    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.paused = True  # EngineCore.sleep: pause_scheduler first
        self.gpu.events.append(("sleep", self.number, level))
        if level < 1:
            return
        if "weights" in self.sleeping_tags:  # Executor.sleep: "Executor is already sleeping."
            return
        if self.pooled:
            for tag in SLEEP_TAGS:
                self.gpu.release(self.held[tag])
        self.level = level
        self.sleeping_tags |= SLEEP_TAGS

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.gpu.events.append(("wake", self.number, tuple(tags) if tags else None))
        if not self.sleeping_tags:  # Executor.wake_up: "Executor is not sleeping."
            waking: set[str] = set()
        elif tags and any(tag not in self.sleeping_tags for tag in tags):  # a warning, nothing woken
            waking = set()
        else:
            waking = set(tags) if tags else set(self.sleeping_tags)
        for tag in sorted(waking):
            if self.pooled:
                self.gpu.reserve(self.held[tag], f"vLLM {tag} on waking")
            if tag == "weights" and self.level >= 2:  # discarded at level 2: the memory comes back undefined
                with torch.no_grad():
                    for param in self.model.hf.parameters():
                        param.fill_(float("nan"))
            self.sleeping_tags.discard(tag)
        if not self.sleeping_tags:
            self.paused = False  # EngineCore.wake_up: resume the scheduler once fully awake
        return not self.sleeping_tags

    def is_sleeping(self) -> bool:
        return self.paused or bool(self.sleeping_tags)

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.gpu.events.append(("reset_prefix_cache", self.number, None))
        return True

    # --- generation ----------------------------------------------------------------------------------------------
    def generate(self, prompts: Any, sampling_params: Any = None, *, use_tqdm: Any = True, **kwargs: Any
                 ) -> list[RequestOutput]:
        if self.is_shut_down:
            raise RuntimeError("fake vLLM: the engine was shut down")
        if self.paused:
            raise RuntimeError("fake vLLM: generate while asleep; vLLM 0.33 queues the requests behind the paused "
                               "scheduler and LLM.generate never returns (vllm/v1/engine/core.py pause_scheduler)")
        prompts = [prompts] if isinstance(prompts, dict) else list(prompts)
        params = sampling_params or SamplingParams()
        if isinstance(params, (list, tuple)):  # vllm/entrypoints/common/offline.py _params_to_seq
            if len(params) != len(prompts):
                raise VLLMValidationError(f"The lengths of prompts ({len(prompts)}) and params ({len(params)}) must "
                                          "be the same.")
        else:
            params = [params] * len(prompts)
        if any(torch.isnan(p).any() for p in self.model.hf.parameters()):
            raise RuntimeError("fake vLLM: sampling from weights discarded by sleep(level=2) and never reloaded")
        self.gpu.events.append(("generate", self.number, len(prompts)))
        outputs = []
        for request_id, (prompt, param) in enumerate(zip(prompts, params)):
            ids = list(prompt["prompt_token_ids"])
            self._validate_prompt_len(len(ids))
            param = param.clone()
            if param.max_tokens is None:  # input_processor: up to max_model_len
                param.max_tokens = self.max_model_len - len(ids)
            param.update_from_generation_config(self.generation_config, self.tokenizer.eos_token_id)
            seeds = [None if param.seed is None else param.seed + i for i in range(param.n)]  # 6
            self.requests.append({"prompt_token_ids": ids, "seeds": seeds})
            children = [self._sample(ids, param, index, seed) for index, seed in enumerate(seeds)]
            outputs.append(RequestOutput(str(request_id), None, ids, children))
        return outputs

    def _validate_prompt_len(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise VLLMValidationError("The decoder prompt cannot be empty")
        if prompt_len > self.max_model_len:
            raise VLLMValidationError(f"The decoder prompt (length {prompt_len}) is longer than the maximum model "
                                      f"length of {self.max_model_len}.")
        if prompt_len == self.max_model_len:
            raise VLLMValidationError(f"The decoder prompt (length {prompt_len}) plus the number of requested output "
                                      f"tokens (at least 1) is longer than the maximum model length of "
                                      f"{self.max_model_len}.")

    @torch.no_grad()
    def _sample(self, prompt_ids: list[int], param: SamplingParams, index: int, seed: int | None
                ) -> CompletionOutput:
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        tokens: list[int] = []
        finish, stop_reason = "length", None
        out = self.model.hf(torch.tensor([prompt_ids]), use_cache=True)
        while True:
            logits = out.logits[0, -1].float()
            if param.temperature < _SAMPLING_EPS:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / param.temperature, dim=-1)
                if param.top_p < 1.0:
                    sorted_probs, order = probs.sort(descending=True)
                    outside = sorted_probs.cumsum(-1) - sorted_probs > param.top_p
                    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
                token = int(torch.multinomial(probs, 1, generator=generator))
            tokens.append(token)  # 5: appended, then check_stop
            if token == param.eos_token_id:
                finish = "stop"
                break
            if token in param.stop_token_ids:
                finish, stop_reason = "stop", token
                break
            if len(prompt_ids) + len(tokens) >= self.max_model_len or len(tokens) >= param.max_tokens:
                break
            cache = getattr(out, CACHE_NAME)
            out = self.model.hf(torch.tensor([[token]]), use_cache=True, **{CACHE_NAME: cache})
        shown = tokens[:-1] if finish == "stop" else tokens  # the detokenizer leaves the stop token out
        text = self.tokenizer.decode(shown, skip_special_tokens=param.skip_special_tokens)
        return CompletionOutput(index, text, tokens, None, None, finish, stop_reason)

    # --- 9: shutdown ---------------------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        held = sum(self.held[tag] for tag in SLEEP_TAGS if tag not in self.sleeping_tags or not self.pooled)
        self.gpu.release(held)
        self.is_shut_down = True
        self.gpu.events.append(("shutdown", self.number, None))
        if torch.distributed.is_initialized():  # cleanup_dist_env_and_memory: destroy_distributed_environment
            torch.distributed.destroy_process_group()


# --- installing it -------------------------------------------------------------------------------------------------
ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING")


@dataclass
class Installed:
    gpu: FakeGPU
    modules: dict[str, types.ModuleType] = field(default_factory=dict)


def install(monkeypatch: Any, gpu: FakeGPU) -> Installed:
    """Put the fake ``vllm`` modules into ``sys.modules`` and the fake card behind ``torch.cuda`` and behind
    ``caopd.models.loading.to_device``, for one test (``monkeypatch`` undoes all of it, the environment variables
    vLLM's launcher reads included)."""
    import caopd.models.loading as loading

    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.33.0"
    vllm.LLM = FakeLLM
    vllm.SamplingParams = SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = TokensPrompt
    exceptions = types.ModuleType("vllm.exceptions")
    exceptions.VLLMValidationError = VLLMValidationError
    outputs = types.ModuleType("vllm.outputs")
    outputs.RequestOutput, outputs.CompletionOutput = RequestOutput, CompletionOutput
    vllm.inputs, vllm.exceptions, vllm.outputs = inputs, exceptions, outputs
    modules = {"vllm": vllm, "vllm.inputs": inputs, "vllm.exceptions": exceptions, "vllm.outputs": outputs}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", gpu.mem_get_info)
    monkeypatch.setattr(torch.cuda, "empty_cache", gpu.empty_cache)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    monkeypatch.setattr(loading, "to_device", gpu.place)
    for key in ENV_KEYS:  # recorded as they are, then cleared: whatever the code under test sets is undone
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setattr(sys.modules[__name__], "CURRENT_GPU", gpu)
    return Installed(gpu, modules)


def uninstall() -> None:
    """After a test: no process group left behind by an engine that was never shut down."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

