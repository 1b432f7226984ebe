"""The vLLM engine's settings and its sizing: what the engine asks of the GPU, derived from the model's config.json,
the run's lengths and the card, and checked against vLLM's own start-up condition before vLLM is started
(torch-free: pure arithmetic, pinned by tests against hand-computed values).

Facts of vLLM 0.33.0 this mirrors (paths inside its wheel):

* start-up: ``vllm/v1/worker/utils.py`` ``request_memory`` refuses to start when the free memory is below
  ``ceil(total × gpu_memory_utilization)`` ("Free memory on device ... on startup is less than desired GPU memory
  utilization"); the free memory is the whole card's (``torch.accelerator.get_memory_info``), so whatever this
  process or another already holds on the card counts against it.
* KV cache: 2 (K and V) × layers × KV heads × head dim × dtype bytes per token, allocated in blocks of 16 tokens;
  the engine must hold at least one ``max_model_len`` sequence (``vllm/v1/core/kv_cache_planning.py``
  ``_check_enough_kv_cache_memory``), else it refuses to start.
* ``max_num_batched_tokens`` must be at least ``max_num_seqs`` (``vllm/config/scheduler.py``
  ``verify_max_model_len``; chunked prefill is on, so it may be below ``max_model_len``), and ``max_model_len`` may
  not exceed the config's context (``vllm/config/model.py`` ``_get_and_verify_max_len``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from caopd.errors import CaopdInputError

GIB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
KV_BLOCK_TOKENS = 16  # vLLM's default KV block on CUDA: a sequence's cache is whole blocks
MAX_NUM_SEQS_CAP = 256  # the derived concurrency's ceiling: beyond it decode steps gain little and the KV cache grows
# TRL's colocate mode passes 4096 (trl/generation/vllm_generation.py: "vLLM v1 memory profiler is misled by the high
# default value"); vLLM's own default on an H100/H200 is 16384, whose profiled activations take room from the cache.
MIN_BATCHED_TOKENS = 4096
STANDALONE_SHARE = 0.9  # a standalone engine's ceiling on the card (vLLM's LLM default is 0.92)
# Beyond the weights, the KV cache and the profiled activations: CUDA graphs, cuBLAS and NCCL workspaces, allocator
# slack (vLLM charges them to its share too).
OVERHEAD_BYTES = 1 * GIB
# Kept free beside vLLM's share: what the process allocates after it measures the card (the CUDA context and NCCL
# buffers vLLM creates before its own start-up check) must not make that check fail.
HEADROOM_BYTES = 1 * GIB

VLLM_UTILIZATION = "vllm.gpu_memory_utilization"  # the settings' names as a user types them (CLI: --vllm.…)


class VLLMConfig(BaseModel):
    """How the vLLM rollout engine is sized; a 0 is derived from the model, the run and the card (``size_vllm``)."""

    model_config = ConfigDict(extra="forbid")

    gpu_memory_utilization: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of the GPU's total memory vLLM takes (weights, KV cache, "
        "activations); 0 = derived: standalone (rollout estimation, evaluation) up to 0.9 of the card as far as it "
        "is free; colocated with training, what the run needs (weights + KV cache for max_num_seqs sequences of "
        "max_model_len tokens + activations + 1 GiB), within what the trainer leaves free")
    max_model_len: int = Field(0, ge=0, description="longest sequence (prompt + completion) the engine holds; 0 = "
                               "derived: the run's longest prompt + max_new_tokens (within the model's context)")
    max_num_seqs: int = Field(0, ge=0, description="sequences decoded at once; 0 = derived: the prompts of one "
                              f"batch × samples per prompt, at most {MAX_NUM_SEQS_CAP}")
    max_num_batched_tokens: int = Field(0, ge=0, description="tokens per engine step (prefill chunks included); 0 = "
                                        f"derived: max({MIN_BATCHED_TOKENS}, max_num_seqs)")
    sleep: bool = Field(True, description="colocated training: the engine sleeps (its weights and KV cache "
                        "released) from the end of each step's sampling to the next step's weight load, so the "
                        "trainer's forward and backward have the memory; standalone engines never sleep")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="the engine's weight and KV "
                                                             "cache dtype")


# Config attributes that transform a causal LM's logits after its head (Gemma 2/3's soft-capping; Cohere's
# logit_scale, Granite/MiniCPM3's logits_scaling, Falcon-H1's lm_head_multiplier: the attributes TRL 1.16's
# distillation trainer reads for the same purpose). With any set to other than the identity, the head's output is
# not the logits.
LOGIT_SOFTCAP_ATTRIBUTES = ("final_logit_softcapping",)
LOGIT_SCALE_ATTRIBUTES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def logits_are_head_output(config: Mapping[str, Any]) -> bool:
    """Whether a model's logits are its LM head applied to the final hidden states, from its config.json: the
    training loss then projects a chunk of hidden states at a time (``caopd.models.heads``)."""
    text = config.get("text_config") or config
    if any(text.get(name) is not None for name in LOGIT_SOFTCAP_ATTRIBUTES):
        return False
    return all(text.get(name) in (None, 1, 1.0) for name in LOGIT_SCALE_ATTRIBUTES)


@dataclass(frozen=True)
class ModelShape:
    """What sizing reads from a model's config.json."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    parameters: int
    context_length: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any], parameters: int | None = None) -> ModelShape:
        """From config.json's values (a multimodal model's ``text_config`` when it has one). ``parameters``: the
        exact count when known (e.g. from the checkpoint's safetensors headers), else ``estimated_parameters``."""
        config = config.get("text_config") or config
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        partial = cls(layers=int(config["num_hidden_layers"]),
                      kv_heads=int(config.get("num_key_value_heads") or heads),
                      head_dim=int(config.get("head_dim") or hidden // heads), hidden_size=hidden,
                      intermediate_size=int(config.get("intermediate_size") or 4 * hidden),
                      vocab_size=int(config["vocab_size"]), parameters=0,
                      context_length=int(config.get("max_position_embeddings") or 1 << 30))
        count = parameters if parameters else estimated_parameters(partial, heads,
                                                                   bool(config.get("tie_word_embeddings", False)))
        return cls(**{**asdict(partial), "parameters": int(count)})

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def estimated_parameters(shape: ModelShape, heads: int, tied: bool) -> int:
    """A dense decoder's parameters from its shape: embeddings (and an untied head); per layer the query and output
    projections (hidden × heads·head_dim each), key and value (hidden × kv_heads·head_dim each), a gated MLP
    (3 × hidden × intermediate) and two norms; the final norm. (Mixture-of-experts models need the exact count.)"""
    h, d = shape.hidden_size, shape.head_dim
    per_layer = 2 * h * heads * d + 2 * h * shape.kv_heads * d + 3 * h * shape.intermediate_size + 2 * h
    return shape.vocab_size * h * (1 if tied else 2) + shape.layers * per_layer + h


@dataclass(frozen=True)
class RunLengths:
    """What the stage knows of its requests when it starts the engine."""

    longest_prompt: int  # tokens of the longest prompt the engine will see
    max_new_tokens: int
    concurrent: int  # sequences the stage asks for at once: the prompts of one generate call × samples per prompt


@dataclass(frozen=True)
class DeviceMemory:
    free: int  # bytes free on the card now (all processes)
    total: int


@dataclass(frozen=True)
class VLLMSizing:
    """The engine's settings and the arithmetic behind them (bytes)."""

    gpu_memory_utilization: float
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    weights_bytes: int
    kv_bytes_per_token: int
    kv_cache_bytes: int  # for max_num_seqs sequences of max_model_len tokens
    activation_bytes: int
    overhead_bytes: int
    needed_bytes: int  # weights + kv_cache + activations + overhead
    minimum_bytes: int  # the same with the KV cache of one sequence: below it vLLM refuses to start
    available_bytes: int  # what the engine may take: free − headroom (− what the trainer will still allocate)

    def engine_args(self) -> dict[str, Any]:
        """The keyword arguments of ``vllm.LLM`` these settings are."""
        return {"gpu_memory_utilization": self.gpu_memory_utilization, "max_model_len": self.max_model_len,
                "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens}

    def summary(self) -> dict[str, Any]:
        """For a stage's summary: the settings, and the byte counts in GiB."""
        return {key: (round(value / GIB, 3) if key.endswith("_bytes") and key != "kv_bytes_per_token" else value)
                for key, value in asdict(self).items()}


def kv_cache_bytes(shape: ModelShape, dtype_bytes: int, sequences: int, max_model_len: int) -> int:
    """The KV cache of ``sequences`` sequences of ``max_model_len`` tokens, in whole blocks."""
    blocks = math.ceil(max_model_len / KV_BLOCK_TOKENS)
    return sequences * blocks * KV_BLOCK_TOKENS * shape.kv_bytes_per_token(dtype_bytes)


def activation_bytes(shape: ModelShape, dtype_bytes: int, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """The stated estimate of vLLM's profiled activation peak: per batched token the residual stream and attention
    (4 × hidden) and the MLP (3 × intermediate) in the engine's dtype; per sequence the fp32 logits and the
    sampler's two working copies (3 × vocab × 4 bytes)."""
    per_token = (4 * shape.hidden_size + 3 * shape.intermediate_size) * dtype_bytes
    return max_num_batched_tokens * per_token + 3 * max_num_seqs * shape.vocab_size * 4


def size_vllm(cfg: VLLMConfig, shape: ModelShape, run: RunLengths, device: DeviceMemory, colocated: bool,
              trainer_pending_bytes: int = 0) -> VLLMSizing:
    """The engine's settings: each one ``cfg`` leaves at 0 derived, the utilisation from the memory they need.

    ``available`` = free − ``HEADROOM_BYTES`` − ``trainer_pending_bytes`` (colocated: the gradients and optimizer
    state the trainer allocates after the engine has started). A derived utilisation is, standalone, all of
    ``available`` up to ``STANDALONE_SHARE`` of the card (the KV cache beyond ``needed`` keeps prefixes); colocated,
    ``needed`` rounded up to 0.001 of the card, within ``available`` (fewer sequences at once when less is free);
    ``available`` counts in whole thousandths of the card, rounded down, and the share is never below ``minimum``
    (a model that needs more than ``STANDALONE_SHARE`` of the card gets what it needs when that is free). Raises
    ``CaopdInputError`` naming the numbers and the setting to change when the engine could not start: less than
    ``minimum`` available, or a given setting that vLLM would refuse.
    """
    dtype_bytes = DTYPE_BYTES[cfg.dtype]
    wanted_len = run.longest_prompt + run.max_new_tokens
    if cfg.max_model_len and cfg.max_model_len < wanted_len:
        raise CaopdInputError(f"{cfg.max_model_len} tokens cannot hold the longest prompt ({run.longest_prompt} "
                              f"tokens) and max_new_tokens ({run.max_new_tokens}); give at least {wanted_len}, or 0 "
                              "to derive it", field="vllm.max_model_len")
    max_model_len = cfg.max_model_len or min(wanted_len, shape.context_length)
    if max_model_len > shape.context_length:
        raise CaopdInputError(f"{max_model_len} is beyond the model's context of {shape.context_length} tokens "
                              "(vLLM refuses it)", field="vllm.max_model_len")
    max_num_seqs = cfg.max_num_seqs or min(MAX_NUM_SEQS_CAP, max(1, run.concurrent))
    batched = cfg.max_num_batched_tokens or max(MIN_BATCHED_TOKENS, max_num_seqs)
    if batched < max_num_seqs:  # vLLM's SchedulerConfig refuses it
        raise CaopdInputError(f"{batched} is below max_num_seqs ({max_num_seqs}); vLLM needs at least one token per "
                              "sequence in a step", field="vllm.max_num_batched_tokens")
    weights = shape.parameters * dtype_bytes
    activations = activation_bytes(shape, dtype_bytes, batched, max_num_seqs)
    fixed = weights + activations + OVERHEAD_BYTES
    needed = fixed + kv_cache_bytes(shape, dtype_bytes, max_num_seqs, max_model_len)
    minimum = fixed + kv_cache_bytes(shape, dtype_bytes, 1, max_model_len)
    available = device.free - HEADROOM_BYTES - (trainer_pending_bytes if colocated else 0)
    breakdown = (f"weights {_gib(weights)} GiB + KV cache of one {max_model_len}-token sequence "
                 f"{_gib(minimum - fixed)} GiB + activations and overhead {_gib(activations + OVERHEAD_BYTES)} GiB")
    where = (f"the GPU's {_gib(device.free)} GiB free of {_gib(device.total)} GiB, less {_gib(HEADROOM_BYTES)} GiB "
             "headroom" + (f" and the {_gib(trainer_pending_bytes)} GiB the trainer's gradients and optimizer state "
                           "will take" if colocated else ""))
    if cfg.gpu_memory_utilization:
        utilization = cfg.gpu_memory_utilization
        share = math.ceil(device.total * utilization)
        if share < minimum:
            raise CaopdInputError(f"{utilization} of the GPU ({_gib(share)} GiB) is below the {_gib(minimum)} GiB "
                                  f"vLLM needs to start ({breakdown}); raise it to at least "
                                  f"{math.ceil(minimum * 1000 / device.total) / 1000}, or lower vllm.max_model_len "
                                  "or max_new_tokens", field=VLLM_UTILIZATION)
        if colocated and share > device.free - trainer_pending_bytes:
            most = max(0.0, math.floor((device.free - trainer_pending_bytes) * 1000 / device.total) / 1000)
            raise CaopdInputError(f"{utilization} of the GPU ({_gib(share)} GiB) leaves less than the "
                                  f"{_gib(trainer_pending_bytes)} GiB the trainer's gradients and optimizer state "
                                  f"need of the {_gib(device.free)} GiB free; lower it to at most {most} (or 0 to "
                                  "derive it)", field=VLLM_UTILIZATION)
    else:
        # in thousandths of the card: the share may take no more than is available, and no less than vLLM needs to
        # start (a share rounded below it would pass the start-up check and fail vLLM's own KV cache check)
        most = math.floor(available * 1000 / device.total)
        least = math.ceil(minimum * 1000 / device.total)
        if most < least:
            raise CaopdInputError(f"vLLM needs at least {_gib(minimum)} GiB ({breakdown}) but has {_gib(available)} "
                                  f"GiB ({where}); lower vllm.max_model_len or max_new_tokens, use a smaller model or "
                                  "free the GPU", field="vllm")
        wanted = math.ceil(needed * 1000 / device.total) if colocated else max(round(STANDALONE_SHARE * 1000), least)
        utilization = min(most, wanted) / 1000
    return VLLMSizing(gpu_memory_utilization=utilization, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=batched, weights_bytes=weights,
                      kv_bytes_per_token=shape.kv_bytes_per_token(dtype_bytes),
                      kv_cache_bytes=needed - fixed, activation_bytes=activations, overhead_bytes=OVERHEAD_BYTES,
                      needed_bytes=needed, minimum_bytes=minimum, available_bytes=available)


def check_startup(free: int, total: int, utilization: float, setting: str = VLLM_UTILIZATION) -> None:
    """Fail as vLLM 0.33 would at start-up (``vllm/v1/worker/utils.py`` ``request_memory``: free memory below
    ``ceil(total × utilization)``), but now, before it loads anything, with the numbers and the setting to change."""
    requested = math.ceil(total * utilization)
    if free < requested:
        most = math.floor(max(0, free - HEADROOM_BYTES) * 1000 / total) / 1000
        raise CaopdInputError(f"vLLM would refuse to start: {_gib(free)} GiB of the GPU's {_gib(total)} GiB are "
                              f"free, less than {utilization} × {_gib(total)} = {_gib(requested)} GiB (vLLM needs the "
                              f"free memory at start-up to be at least total × gpu_memory_utilization); lower "
                              f"{setting} to {most} or less (0 derives it from what is free), or free the GPU "
                              "(another process, or model weights this process holds)", field=setting)


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"
