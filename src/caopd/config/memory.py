"""The memory plan: per-stage, per-GPU memory of a run, from the model's config.json and the settings, and the check
that refuses a configuration that cannot fit — before any pod starts (``caopd plan``) and at the start of the rollout
and training stages (torch-free: pure arithmetic, pinned by tests against hand-computed values).

How each stage is counted (bytes; ``P`` parameters, ``h`` hidden size, ``A`` = heads × head_dim, ``G`` = KV heads ×
head_dim, ``i`` intermediate size, ``V`` vocabulary, ``c`` the compute dtype's bytes: 4 in fp32, 2 in bf16):

* **rollout estimation, evaluation** — vLLM: ``size_vllm``'s own arithmetic (weights + KV cache + activations +
  overhead; the engine must at least start: one ``max_model_len`` sequence); transformers: the weights as the stage
  loads them (fp32) + the KV cache of one batch of prompts × K samples of prompt + max_new_tokens tokens + a
  decoding step's logits and the draw's temporaries (every sample × V × (2 · 4 + ``draw_bytes_per_entry``) bytes; the
  prefill projects each prompt's last position only) + the CUDA context.
* **training** — always resident: the student's weights (fp32 masters; a LoRA base in bf16 under bf16), the
  gradients and AdamW's two fp32 moments of what trains, the teacher (frozen: a copy, bf16 under bf16; EMA: a float32
  copy; under LoRA the frozen teacher is the base with the adapters off, no copy, and an EMA teacher a second set of
  adapters; the live student and a server teacher: nothing; a separate teacher: its own weights, from its config);
  under bf16 without FSDP, autocast's bf16 cast of the trained weights (its cache lives through the forward); the
  CUDA context. Then the larger of two phases: **sampling** (a colocated vLLM awake: its share; transformers: its
  KV cache, a decoding step's logits and the draw's temporaries, and under FSDP the whole student gathered) and
  **the loss** (one micro-batch's activations and logits, beside a sleeping vLLM's remainder, or its whole share
  without sleep mode; under FSDP the decoder layers gathered whole at a time). Under FSDP weights, gradients,
  optimizer state and the teacher divide by the GPU count; replicate: every GPU holds everything.
* **activations of one micro-batch** — ``micro_batch_size`` completions of ``max_new_tokens`` after one prompt of
  ``max_prompt_tokens`` per group (the prompt is computed once per group, its keys and values copied to each of the
  group's rows). Per token and layer the tensors autograd keeps for the backward of a Llama/Qwen3 decoder layer
  (counted with ``torch.autograd.graph.saved_tensors_hooks`` on transformers' Qwen3 layer): ``ACT_HIDDEN·h +
  ACT_ATTENTION·A + ACT_KV·G + ACT_MLP·i`` elements; per row and layer the keys and values it attends to, ``2·G·
  (prompt + completion)``; with eager attention (the CPU's) the fp32 softmax, ``heads × keys`` per query. With
  activation checkpointing: each layer's input (``h`` per token and layer) plus one layer's activations, recomputed.
* **the loss's logits** — ``LOGIT_COPIES`` fp32 tensors of one chunk of ``loss_chunk_tokens`` completion tokens × V
  (the loss projects both models' final hidden states through their heads a chunk at a time): the student's logits,
  its log-softmax, the teacher's logits and log-softmax, and the divergence's products and their gradients; plus the
  LM head's gradient (V·h, fp32) the chunks accumulate. Under FSDP, and for a model whose logits are not its head's
  output (soft-capped or scaled), the head is not bypassed, and the micro-batch's whole logits (student's, teacher's,
  the gradient of the student's) come on top.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from caopd.config.engines import (
    GIB,
    HEADROOM_BYTES,
    OVERHEAD_BYTES,
    DeviceMemory,
    ModelShape,
    RunLengths,
    VLLMConfig,
    logits_are_head_output,
    size_vllm,
)
from caopd.config.sampling import draw_bytes_per_entry
from caopd.errors import CaopdInputError

# The CUDA context, cuBLAS/NCCL workspaces and the caching allocator's slack: what a training or transformers
# process holds on the card beyond its tensors (about 0.5–1 GiB on an H100/H200; vLLM's share counts its own).
CUDA_OVERHEAD_BYTES = 1 * GIB
# Saved-for-backward elements per token and decoder layer, by the width they scale with (transformers' Qwen3 layer,
# fp32 on the CPU, counted by storage with saved_tensors_hooks): the residual stream and both RMSNorms' inputs and
# outputs (h); q, its per-head norm, rotary halves and output, the attention output (A); k and v, their norm and
# rotary (G); gate, up, SiLU(gate) and the product down_proj reads, plus the MLP input's share (i).
ACT_HIDDEN, ACT_ATTENTION, ACT_KV, ACT_MLP = 9.0, 4.5, 2.5, 4.7
# fp32 [chunk tokens × vocab] tensors alive at the loss's peak (measured on the stand-in, whose vocabulary dominates
# its step: see tests/test_plan.py).
LOGIT_COPIES = 7
# fp32 [completion tokens × vocab] tensors of a micro-batch when the head cannot be bypassed (FSDP): the student's
# logits, the teacher's and the gradient of the student's, which the chunks fill.
WHOLE_LOGIT_COPIES = 3
# vLLM asleep beside the trainer's backward keeps its CUDA graphs and workspaces (sleep level 1 frees the weights
# and the KV cache).
VLLM_ASLEEP_BYTES = OVERHEAD_BYTES
# The transformers engine's prompts per batch (``TransformersEngine.max_batch_prompts``).
TRANSFORMERS_BATCH_PROMPTS = 64
# The dtype the stages load a model in for the transformers engine (``load_model``'s default).
TRANSFORMERS_LOAD_BYTES = 4
# The linear layers of a Llama/Qwen3 decoder layer, as LoRA's target_modules names them: (in, out) widths.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FSDP_GATHERED_LAYERS = 2  # the layer computing and the next one prefetched
SHIPPED_CONFIGS = Path(__file__).with_name("model_configs")
HUB_PREFIX = "Qwen/"


# --- the model ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanModel:
    """What the plan reads from a config.json: ``ModelShape`` (the vLLM sizing's) and the query heads."""

    shape: ModelShape
    heads: int
    plain_head: bool = True  # its logits are its LM head's output: the loss projects a chunk of tokens at a time

    @classmethod
    def from_config(cls, config: Mapping[str, Any], parameters: int | None = None) -> PlanModel:
        text = config.get("text_config") or config
        return cls(ModelShape.from_config(config, parameters), int(text["num_attention_heads"]),
                   logits_are_head_output(config))

    @property
    def attention_width(self) -> int:  # A: query heads × head_dim
        return self.heads * self.shape.head_dim

    @property
    def kv_width(self) -> int:  # G: key/value heads × head_dim
        return self.shape.kv_heads * self.shape.head_dim

    def module_widths(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of a decoder layer."""
        h, a, g, i = self.shape.hidden_size, self.attention_width, self.kv_width, self.shape.intermediate_size
        return {"q_proj": (h, a), "k_proj": (h, g), "v_proj": (h, g), "o_proj": (a, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}

    def layer_parameters(self) -> int:
        """One decoder layer's parameters (its linear layers and two norms)."""
        return sum(i * o for i, o in self.module_widths().values()) + 2 * self.shape.hidden_size


def lora_parameters(model: PlanModel, r: int, target_modules: str | list[str]) -> int:
    """The adapters' parameters: r × (in + out) for each targeted linear layer of every decoder layer;
    ``"all-linear"`` targets all seven (PEFT leaves the LM head out)."""
    widths = model.module_widths()
    names = list(LORA_MODULES) if target_modules == "all-linear" else list(target_modules)
    unknown = [name for name in names if name not in widths]
    if unknown:
        raise CaopdInputError(f"unknown LoRA target modules {unknown}; the planner knows {list(LORA_MODULES)} "
                              "(a Llama/Qwen3 decoder layer's linear layers) or 'all-linear'",
                              field="train.lora.target_modules")
    return model.shape.layers * sum(r * sum(widths[name]) for name in dict.fromkeys(names))


# --- the settings -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainPlan:
    """The training settings the plan reads (``from_stage`` builds it from a ``TrainStageConfig``)."""

    gpus: int = 1
    precision: str = "fp32"
    finetune: str = "full"
    lora_r: int = 16
    lora_targets: str | list[str] = "all-linear"
    teacher: str = "frozen"
    teacher_parameters: int = 0  # a separate teacher's parameter count (0: the student's)
    sharding: str = "replicate"
    engine: str = "transformers"  # vllm: colocated beside the trainer
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    k: int = 8
    prompts_per_step: int = 16
    micro_batch_size: int = 64
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 1024
    activation_checkpointing: bool = False
    loss_chunk_tokens: int = 512
    attention: str = "fused"  # fused: SDPA / flash kernels keep no scores (GPUs); eager: the fp32 softmax is kept
    overhead_bytes: int = CUDA_OVERHEAD_BYTES

    @classmethod
    def from_stage(cls, cfg: Any, gpus: int, longest_prompt: int | None) -> TrainPlan:
        """From a ``TrainStageConfig``: the prompt length is the longest prompt as trained (cut to
        ``max_prompt_tokens``), else ``max_prompt_tokens``, else 1024 tokens (the paper's limit)."""
        train = cfg.train
        prompt = longest_prompt or train.max_prompt_tokens or 1024
        if train.max_prompt_tokens:
            prompt = min(prompt, train.max_prompt_tokens)
        engine = "transformers" if cfg.engine == "transformers" else "vllm"  # auto: what a GPU with vLLM runs
        return cls(gpus=gpus, precision=train.precision, finetune=train.finetune, lora_r=train.lora.r,
                   lora_targets=train.lora.target_modules, teacher=_teacher_kind(train), sharding=cfg.sharding,
                   engine=engine, vllm=cfg.vllm, k=train.k, prompts_per_step=train.prompts_per_step,
                   micro_batch_size=train.micro_batch_size, max_prompt_tokens=prompt,
                   max_new_tokens=train.sampling.max_new_tokens,
                   activation_checkpointing=train.activation_checkpointing,
                   loss_chunk_tokens=train.loss_chunk_tokens)

    @property
    def fsdp(self) -> bool:
        return self.sharding == "fsdp" and self.gpus > 1

    @property
    def compute_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


def _teacher_kind(train: Any) -> str:
    from caopd.method.types import TEACHERLESS_METHODS

    return "student" if train.method in TEACHERLESS_METHODS else train.teacher


# --- the arithmetic ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageMemory:
    """One stage's per-GPU memory: its parts (bytes, in the order printed) and the total they make (phases that do
    not overlap count as the larger of them, so the total is not always the parts' sum)."""

    stage: str
    parts: dict[str, int]
    total: int
    detail: str = ""

    def gib(self) -> dict[str, float]:
        return {name: round(value / GIB, 2) for name, value in {**self.parts, "total": self.total}.items()}


def micro_batch_layout(plan: TrainPlan) -> tuple[int, int]:
    """(completion rows, prompt groups) of the largest micro-batch: whole groups packed up to
    ``micro_batch_size`` completions, a group larger than it split (its prompt recomputed for each part)."""
    per_process = math.ceil(plan.prompts_per_step / plan.gpus) * plan.k
    rows = min(plan.micro_batch_size, per_process)
    return rows, math.ceil(rows / plan.k) if rows >= plan.k else 1


def activation_bytes(model: PlanModel, plan: TrainPlan) -> int:
    """The student's saved activations of one micro-batch (module docstring)."""
    s, c = model.shape, plan.compute_bytes
    rows, groups = micro_batch_layout(plan)
    prompt, completion = plan.max_prompt_tokens, plan.max_new_tokens
    tokens = rows * completion + groups * prompt
    per_token = (ACT_HIDDEN * s.hidden_size + ACT_ATTENTION * model.attention_width + ACT_KV * model.kv_width
                 + ACT_MLP * s.intermediate_size)
    kv_rows = rows * (prompt + completion) * 2 * model.kv_width  # each row's keys and values, its prompt's copied
    scores = 0
    if plan.attention == "eager":  # fp32 softmax: a completion query sees prompt + completion, a prompt query P/2
        scores = model.heads * (rows * completion * (prompt + completion) + groups * prompt * prompt) * 4 // c
    one_layer = tokens * per_token + kv_rows + scores
    if plan.activation_checkpointing:  # each layer's input kept, one layer recomputed at a time
        # autocast over float32 weights keeps the residual stream (each layer's input) in float32; FSDP's bf16
        # parameters and a bf16 LoRA base make it bf16
        residual = 4 if plan.precision == "bf16" and not plan.fsdp and plan.finetune != "lora" else c
        return int(s.layers * tokens * s.hidden_size * residual + one_layer * c)
    return int(s.layers * one_layer * c)


def logits_bytes(model: PlanModel, plan: TrainPlan) -> int:
    """The loss's fp32 tensors over the vocabulary (module docstring): ``LOGIT_COPIES`` of one chunk of a
    micro-batch's completion tokens, and the LM head's gradient the chunks accumulate (a trained head); under FSDP,
    whose sharded head the loss does not project with, or for a model whose logits are not its head's output, the
    micro-batch's whole logits too."""
    rows, _ = micro_batch_layout(plan)
    tokens, vocab = rows * plan.max_new_tokens, model.shape.vocab_size
    chunk = LOGIT_COPIES * min(tokens, plan.loss_chunk_tokens) * vocab * 4
    if plan.fsdp or not model.plain_head:
        return chunk + WHOLE_LOGIT_COPIES * tokens * vocab * 4
    return chunk + (0 if plan.finetune == "lora" else vocab * model.shape.hidden_size * 4)


def training_memory(model: PlanModel, plan: TrainPlan, gpu_bytes: int | None = None) -> StageMemory:
    """Per-GPU memory of the training stage (module docstring). ``gpu_bytes``: the card, for a colocated vLLM's share
    (its sizing is derived from the card; without it, a card as large as the share needs)."""
    s, c = model.shape, plan.compute_bytes
    lora = plan.finetune == "lora"
    adapters = lora_parameters(model, plan.lora_r, plan.lora_targets) if lora else 0
    trainable = adapters if lora else s.parameters
    base_bytes = 2 if (lora and plan.precision == "bf16") else 4
    weights = s.parameters * base_bytes + adapters * 4
    # a frozen copy in the compute dtype; an EMA copy stays float32 (a 0.01 step is below bf16's resolution)
    teacher = {"frozen": 0 if lora else s.parameters * c, "ema": adapters * 4 if lora else s.parameters * 4,
               "separate": (plan.teacher_parameters or s.parameters) * c}.get(plan.teacher, 0)
    share = plan.gpus if plan.fsdp else 1
    parts = {"weights": weights // share, "gradients": trainable * 4 // share, "optimizer": trainable * 8 // share,
             "teacher": teacher // share}
    # autocast caches its bf16 cast of each trained weight through the forward (FSDP's mixed precision gathers them)
    parts["bf16 copy"] = s.parameters * 2 if (plan.precision == "bf16" and not lora and not plan.fsdp) else 0
    gathered = FSDP_GATHERED_LAYERS * model.layer_parameters() * c * (2 if teacher else 1) if plan.fsdp else 0
    parts["activations"] = activation_bytes(model, plan)
    parts["logits"] = logits_bytes(model, plan)
    parts["gathered layers"] = gathered
    sampling, asleep = _training_sampling(model, plan, gpu_bytes)
    parts["sampling"] = sampling
    parts["overhead"] = plan.overhead_bytes
    resident = sum(parts[k] for k in ("weights", "gradients", "optimizer", "teacher", "bf16 copy", "overhead"))
    loss = parts["activations"] + parts["logits"] + gathered + asleep
    total = resident + max(loss, sampling)
    return StageMemory("training", parts, total, detail=f"{plan.gpus} GPU{'s' if plan.gpus > 1 else ''}, "
                       f"{plan.sharding}, {plan.precision}, {plan.finetune}; the total is what stays (weights, "
                       "gradients, optimizer, teacher, overhead) plus the larger of the two phases: the loss "
                       "(activations, logits, gathered layers) or sampling")


def _training_sampling(model: PlanModel, plan: TrainPlan, gpu_bytes: int | None) -> tuple[int, int]:
    """(sampling phase's bytes, what stays of it during the loss)."""
    s = model.shape
    per_process = math.ceil(plan.prompts_per_step / plan.gpus)
    if plan.engine == "vllm":
        run = RunLengths(plan.max_prompt_tokens, plan.max_new_tokens, per_process * plan.k)
        sizing = _vllm_sizing(plan.vllm, s, run, gpu_bytes, colocated=True)
        share = sizing.needed_bytes if not plan.vllm.gpu_memory_utilization or not gpu_bytes else math.ceil(
            gpu_bytes * plan.vllm.gpu_memory_utilization)
        return share, (VLLM_ASLEEP_BYTES if plan.vllm.sleep else share)
    # transformers samples from the live student: under FSDP gathered whole first
    gather = s.parameters * plan.compute_bytes if plan.fsdp else 0
    return gather + transformers_sampling_bytes(model, min(per_process, TRANSFORMERS_BATCH_PROMPTS), plan.k,
                                                plan.max_prompt_tokens, plan.max_new_tokens, plan.compute_bytes), 0


def transformers_sampling_bytes(model: PlanModel, prompts: int, k: int, prompt_tokens: int, new_tokens: int,
                                dtype_bytes: int) -> int:
    """The transformers engine's batch: KV cache of prompts × K samples of prompt + new tokens, and a decoding
    step's next-token logits with the draw's temporaries (``decoding_logits_bytes``)."""
    kv = prompts * k * (prompt_tokens + new_tokens) * model.shape.kv_bytes_per_token(dtype_bytes)
    return kv + decoding_logits_bytes(prompts * k, model.shape.vocab_size, dtype_bytes)


def decoding_logits_bytes(samples: int, vocab_size: int, dtype_bytes: int) -> int:
    """A decoding step's next-token logits with the transformers engine's draw: the logits and each sample's row of
    them (in the dtype), then ``draw_bytes_per_entry`` (the prefill projects only each prompt's last position)."""
    return samples * vocab_size * (2 * dtype_bytes + draw_bytes_per_entry(vocab_size))


def _vllm_sizing(cfg: VLLMConfig, shape: ModelShape, run: RunLengths, gpu_bytes: int | None, colocated: bool):
    # size_vllm's numbers without its refusal: on an unbounded card (the check is the planner's, with the stage
    # and the setting to change); a given utilisation is checked by the caller against the real card
    big = max(gpu_bytes or 0, 1 << 50)
    return size_vllm(cfg.model_copy(update={"gpu_memory_utilization": 0.0}), shape, run, DeviceMemory(big, big),
                     colocated)


def sampling_memory(stage: str, model: PlanModel, engine: str, vllm: VLLMConfig, prompts: int, k: int,
                    prompt_tokens: int, new_tokens: int, gpu_bytes: int | None = None) -> StageMemory:
    """Per-GPU memory of a sampling stage (rollout estimation, evaluation): vLLM's minimum to start and its wish
    (``size_vllm``), or the transformers engine's weights, KV cache and a decoding step's logits with the draw's
    temporaries."""
    s = model.shape
    if engine == "vllm":
        sizing = _vllm_sizing(vllm, s, RunLengths(prompt_tokens, new_tokens, prompts * k), gpu_bytes, False)
        one_sequence = sizing.minimum_bytes - sizing.weights_bytes - sizing.activation_bytes - sizing.overhead_bytes
        parts = {"weights": sizing.weights_bytes, "kv cache": one_sequence,
                 "activations": sizing.activation_bytes, "overhead": sizing.overhead_bytes + HEADROOM_BYTES}
        need = sizing.minimum_bytes + HEADROOM_BYTES
        if vllm.gpu_memory_utilization and gpu_bytes:
            need = max(need, math.ceil(gpu_bytes * vllm.gpu_memory_utilization))
        return StageMemory(stage, parts, need, detail=f"vLLM: starts with the KV cache of one sequence of "
                           f"{sizing.max_model_len} tokens (shown); it takes up to "
                           f"{sizing.kv_cache_bytes / GIB:.1f} GiB of KV cache for {sizing.max_num_seqs} at once "
                           "where the card has room")
    batch = min(prompts, TRANSFORMERS_BATCH_PROMPTS)
    kv = batch * k * (prompt_tokens + new_tokens) * s.kv_bytes_per_token(TRANSFORMERS_LOAD_BYTES)
    parts = {"weights": s.parameters * TRANSFORMERS_LOAD_BYTES, "kv cache": kv,
             "logits": decoding_logits_bytes(batch * k, s.vocab_size, TRANSFORMERS_LOAD_BYTES),
             "overhead": CUDA_OVERHEAD_BYTES}
    return StageMemory(stage, parts, sum(parts.values()), detail=f"transformers: {batch} prompts × {k} samples")


# --- the checks ---------------------------------------------------------------------------------------------------
# A change the refusal may suggest: its settings as the plan command and as a stage command spell them.
@dataclass(frozen=True)
class Change:
    plan_flags: str
    stage_flags: str
    apply: Callable[[TrainPlan], TrainPlan]


def _changes(plan: TrainPlan) -> list[Change]:
    """What the refusal tries, least disruptive first: memory-saving switches of this run, then more GPUs."""
    out: list[Change] = []
    if not plan.activation_checkpointing:
        out.append(Change("--activation-checkpointing", "--train.activation-checkpointing true",
                          lambda p: replace(p, activation_checkpointing=True)))
    size = plan.micro_batch_size
    while size > 1:
        size = max(1, size // 2)
        out.append(Change(f"--micro-batch-size {size}", f"--train.micro-batch-size {size}",
                          lambda p, size=size: replace(p, micro_batch_size=size)))
    if not plan.activation_checkpointing:
        for size in _halvings(plan.micro_batch_size):
            out.append(Change(f"--activation-checkpointing --micro-batch-size {size}",
                              f"--train.activation-checkpointing true --train.micro-batch-size {size}",
                              lambda p, size=size: replace(p, activation_checkpointing=True, micro_batch_size=size)))
    switches = []
    if plan.precision != "bf16":
        switches.append(("--precision bf16", "--train.precision bf16", {"precision": "bf16"}))
    if plan.finetune != "lora":
        lora = {"finetune": "lora", **({"precision": "bf16"} if plan.precision != "bf16" else {})}
        flags = " ".join(f"--{k} {v}" for k, v in lora.items())
        switches.append((flags, " ".join(f"--train.{k} {v}" for k, v in lora.items()), lora))
    if plan.gpus > 1 and plan.sharding != "fsdp":
        switches.append(("--sharding fsdp", "--sharding fsdp", {"sharding": "fsdp"}))
    for plan_flags, stage_flags, update in switches:
        out.append(Change(plan_flags, stage_flags, lambda p, u=update: replace(p, **u)))
        for size in [plan.micro_batch_size, *_halvings(plan.micro_batch_size)]:
            out.append(Change(f"{plan_flags} --activation-checkpointing --micro-batch-size {size}",
                              f"{stage_flags} --train.activation-checkpointing true --train.micro-batch-size {size}",
                              lambda p, u=update, size=size: replace(p, **u, activation_checkpointing=True,
                                                                     micro_batch_size=size)))
    for gpus in (2, 4, 8):
        if gpus > plan.gpus:
            out.append(Change(f"--gpus {gpus} --sharding fsdp", f"{gpus} GPUs (torchrun) with --sharding fsdp",
                              lambda p, g=gpus: replace(p, gpus=g, sharding="fsdp")))
    return out


def _halvings(size: int) -> list[int]:
    out = []
    while size > 1:
        size = max(1, size // 2)
        out.append(size)
    return out


def training_refusal(model: PlanModel, plan: TrainPlan, gpu_bytes: int, spelling: str = "plan") -> str | None:
    """None when training fits the card; else the one line that says the need, the card and the first change
    (``_changes``) that makes it fit, spelled as ``caopd plan``'s flags or a stage command's (``spelling``)."""
    memory = training_memory(model, plan, gpu_bytes)
    if memory.total <= gpu_bytes:
        return None
    fix = "no single setting makes it fit: use a smaller model or a larger GPU"
    for change in _changes(plan):
        changed = training_memory(model, change.apply(plan), gpu_bytes)
        if changed.total <= gpu_bytes:
            flags = change.plan_flags if spelling == "plan" else change.stage_flags
            fix = f"it fits with {flags} ({_gib(changed.total)} GiB)"
            break
    return (f"opd-training needs {_gib(memory.total)} GiB per GPU ({_breakdown(memory)}) on a {_gib(gpu_bytes)} "
            f"GiB GPU; {fix}")


def check_training_fits(cfg: Any, model_config: Mapping[str, Any], gpus: int, gpu_memory_bytes: int,
                        longest_prompt: int | None = None, parameters: int | None = None,
                        teacher_config: Mapping[str, Any] | None = None,
                        teacher_parameters: int | None = None) -> StageMemory:
    """The training stage's start-up check: raises ``CaopdInputError`` (one line: the stage, its need per GPU, the
    card and the setting to change) when ``cfg`` (a ``TrainStageConfig``) cannot fit ``gpu_memory_bytes`` per GPU
    on ``gpus`` GPUs; returns the plan otherwise. ``longest_prompt``: the longest training prompt in tokens as
    trained (None: ``max_prompt_tokens``, else 1024); ``parameters``: the exact count (safetensors headers) when
    known. ``teacher_config``/``teacher_parameters``: a separate teacher's (planned at its own size). The engine
    ``auto`` is planned as vLLM (what a GPU with vLLM runs)."""
    model = PlanModel.from_config(model_config, parameters)
    plan = TrainPlan.from_stage(cfg, gpus, longest_prompt)
    if teacher_config is not None:
        plan = replace(plan, teacher_parameters=PlanModel.from_config(teacher_config,
                                                                      teacher_parameters).shape.parameters)
    refusal = training_refusal(model, plan, gpu_memory_bytes, spelling="stage")
    if refusal:
        raise CaopdInputError(refusal, field="gpu_memory_gib")
    return training_memory(model, plan, gpu_memory_bytes)


def sampling_refusal(memory: StageMemory, gpu_bytes: int, engine: str, spelling: str = "plan") -> str | None:
    """None when a sampling stage fits; else its one line, with what to change."""
    if memory.total <= gpu_bytes:
        return None
    if engine == "vllm":
        fix = ("lower --max-new-tokens or --max-prompt-tokens (vLLM must hold one whole sequence), or use a larger GPU"
               if spelling == "plan" else "lower sampling.max_new_tokens or vllm.max_model_len, or use a larger GPU")
    else:
        fix = "sample with vLLM (--engine vllm), or fewer prompts per batch / shorter sequences"
    return (f"{memory.stage} needs {_gib(memory.total)} GiB ({_breakdown(memory)}) on a {_gib(gpu_bytes)} GiB GPU; "
            f"{fix}")


def check_rollout_fits(cfg: Any, model_config: Mapping[str, Any], gpu_memory_bytes: int, prompts: int,
                       longest_prompt: int, vllm: bool, parameters: int | None = None) -> StageMemory:
    """Rollout estimation's start-up check (``cfg`` a ``RolloutConfig``): raises ``CaopdInputError`` in one line when
    its engine cannot fit ``gpu_memory_bytes``."""
    model = PlanModel.from_config(model_config, parameters)
    engine = "vllm" if vllm else "transformers"
    memory = sampling_memory("rollout-estimation", model, engine, cfg.vllm, prompts, cfg.k, longest_prompt,
                             cfg.sampling.max_new_tokens, gpu_memory_bytes)
    refusal = sampling_refusal(memory, gpu_memory_bytes, engine, spelling="stage")
    if refusal:
        raise CaopdInputError(refusal, field="gpu_memory_gib")
    return memory


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def _breakdown(memory: StageMemory) -> str:
    return ", ".join(f"{name} {_gib(value)}" for name, value in memory.parts.items() if value)


# --- model configs ------------------------------------------------------------------------------------------------
def shipped_config(model: str) -> dict[str, Any] | None:
    """The config.json shipped with the package for a Qwen3 hub id (``Qwen/Qwen3-8B``) or its bare name."""
    name = model[len(HUB_PREFIX):] if model.startswith(HUB_PREFIX) else model
    path = SHIPPED_CONFIGS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() and "/" not in name else None


def shipped_models() -> list[str]:
    return sorted((HUB_PREFIX + p.stem for p in SHIPPED_CONFIGS.glob("*.json")), key=_size_key)


def _size_key(name: str) -> float:
    return float(name.rsplit("-", 1)[-1].rstrip("B"))


SAFETENSORS_INDEX = "model.safetensors.index.json"  # a checkpoint saved in shards: which file holds which tensor


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: the shards its index names (``save_pretrained`` splits a large
    model into ``model-0000i-of-0000n.safetensors``; a consolidated copy beside them is not read twice), else its
    ``model.safetensors``."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise CaopdInputError(f"unreadable safetensors index ({err})", file=str(index),
                                  field="weight_map") from None
        return [folder / name for name in names]
    return [folder / "model.safetensors"]


def safetensors_header_parameters(folder: Path) -> int | None:
    """The exact parameter count of a local checkpoint from its safetensors headers (read, not loaded): the files
    ``safetensors_files`` names. None without them."""
    files = [file for file in safetensors_files(folder) if file.is_file()]
    if not files:
        return None
    total = 0
    for file in files:
        with file.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def resolve_model_config(model: str, packaged: Mapping[str, Path] | None = None,
                         ) -> tuple[dict[str, Any], int | None, str]:
    """(config.json values, exact parameter count or None, where they came from) of a model as a user names it: a
    packaged alias (``packaged``: name → folder), a local folder (its config.json and safetensors headers), a Qwen3
    hub id whose config ships with the package, or another hub id (its config.json alone, downloaded)."""
    folder = Path((packaged or {}).get(model, model)).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
        if not path.is_file():
            raise CaopdInputError("no config.json in the model folder", file=str(folder), field="config.json")
        return json.loads(path.read_text()), safetensors_header_parameters(folder), str(path)
    shipped = shipped_config(model)
    if shipped is not None:
        return shipped, None, f"the config shipped with caopd ({model})"
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model, "config.json")
    except Exception as err:  # offline, unknown id, gated: one line, and what to do instead
        raise CaopdInputError(f"cannot read config.json of {model!r} from the hub ({type(err).__name__}); pass a "
                              "local model folder (with its config.json) instead", field="model") from None
    return json.loads(Path(path).read_text()), None, f"{model} on the hub"


# --- the whole run (caopd plan) -------------------------------------------------------------------------------------
PLAN_CONCURRENT_SEQUENCES = 256  # a sampling stage's sequences at once: vLLM's derived cap (MAX_NUM_SEQS_CAP)


@dataclass(frozen=True)
class RunPlan:
    """Every GPU stage's per-GPU memory, and the refusal of the first that cannot fit (None when all fit)."""

    stages: list[StageMemory]
    refusal: str | None
    train: TrainPlan
    source: str


def stage_configs(settings: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """The rollout, training and evaluation configs ``caopd plan`` plans: the preset's values (if any) under the
    settings given (None = not given)."""
    from caopd.config.presets import merge_over_preset, preset_config
    from caopd.config.stages import EvaluateConfig, RolloutConfig, TrainStageConfig

    preset = settings.get("preset") or ""
    given = {key: value for key, value in settings.items() if value is not None}
    train: dict[str, Any] = {}
    for key in ("precision", "finetune", "k", "prompts_per_step", "micro_batch_size", "max_prompt_tokens",
                "activation_checkpointing", "teacher"):
        if key in given:
            train[key] = given[key]
    if "lora_r" in given:
        train["lora"] = {"r": given["lora_r"]}
    if "max_new_tokens" in given:
        train["sampling"] = {"max_new_tokens": given["max_new_tokens"]}
    engine = given.get("engine", "vllm")
    stage: dict[str, Any] = {"train": train, "engine": engine, "records": "<records>"}
    if "sharding" in given:
        stage["sharding"] = given["sharding"]
    trained = TrainStageConfig(**merge_over_preset(preset_config(preset, TrainStageConfig), stage))
    sampled = {"engine": engine, "data": "<data>", **({"k": given["k"]} if "k" in given else {}),
               **({"sampling": {"max_new_tokens": given["max_new_tokens"]}} if "max_new_tokens" in given else {})}
    rollout = RolloutConfig(**merge_over_preset(preset_config(preset, RolloutConfig), sampled))
    evaluated = {"engine": engine, "data": "<data>", "models": {"model": "<model>"},
                 **({"sampling": {"max_new_tokens": given["max_new_tokens"]}} if "max_new_tokens" in given else {})}
    evaluate = EvaluateConfig(**merge_over_preset(preset_config(preset, EvaluateConfig), evaluated))
    return rollout, trained, evaluate


def plan_run(model_config: Mapping[str, Any], parameters: int | None, gpus: int, gpu_bytes: int,
             settings: Mapping[str, Any], source: str = "") -> RunPlan:
    """Rollout estimation, training and evaluation planned per GPU on ``gpus`` cards of ``gpu_bytes`` each
    (sampling stages run one engine per GPU); ``settings`` as ``stage_configs`` takes them."""
    model = PlanModel.from_config(model_config, parameters)
    rollout, trained, evaluate = stage_configs(settings)
    prompt = int(settings.get("max_prompt_tokens") or trained.train.max_prompt_tokens or 1024)
    train = TrainPlan.from_stage(trained, gpus, prompt)
    k = rollout.k
    stages = [sampling_memory("rollout-estimation", model, _engine(rollout.engine), rollout.vllm,
                              math.ceil(PLAN_CONCURRENT_SEQUENCES / k), k, prompt, rollout.sampling.max_new_tokens,
                              gpu_bytes),
              training_memory(model, train, gpu_bytes),
              sampling_memory("calibration-evaluation", model, _engine(evaluate.engine), evaluate.vllm,
                              PLAN_CONCURRENT_SEQUENCES, evaluate.sampling.n, prompt,
                              evaluate.sampling.max_new_tokens, gpu_bytes)]
    refusal = None
    for memory in stages:
        if memory.stage == "training":
            refusal = training_refusal(model, train, gpu_bytes)
        else:
            refusal = sampling_refusal(memory, gpu_bytes, _engine(rollout.engine))
        if refusal:
            break
    return RunPlan(stages, refusal, train, source)


def _engine(name: str) -> str:
    return "transformers" if name == "transformers" else "vllm"


def plan_rows(run: RunPlan, gpu_bytes: int) -> tuple[list[str], list[list[str]]]:
    """The per-stage table, GiB per GPU: a column per stage, a row per part, then the total and whether it fits."""
    names = list(dict.fromkeys(name for memory in run.stages for name in memory.parts))
    header = ["GiB per GPU", *(memory.stage for memory in run.stages)]
    rows = [[name, *(_gib(memory.parts[name]) if memory.parts.get(name) else "" for memory in run.stages)]
            for name in names if any(memory.parts.get(name) for memory in run.stages)]
    rows.append(["total", *(_gib(memory.total) for memory in run.stages)])
    rows.append(["fits", *("yes" if memory.total <= gpu_bytes else "NO" for memory in run.stages)])
    return header, rows


# --- the docs' table ---------------------------------------------------------------------------------------------
DOC_CARDS = ((1, 80), (8, 80), (1, 141), (8, 141))
# The official run's 32 completions per step on 8 GPUs: 4 per GPU per micro-batch; 8 prompts per step, so that each
# of 8 FSDP processes has a prompt (the trainer needs prompts_per_step >= processes).
DOC_MICRO_BATCH, DOC_PROMPTS = 4, 8


def docs_table(preset: str = "paper-tooluse") -> str:
    """docs/memory.md's table: each shipped Qwen3 size, full fine-tune and LoRA (bf16, the preset's training lengths,
    activation checkpointing, micro-batches of 4 completions, FSDP on 8 GPUs): the training stage's GiB per GPU on
    1× and 8× 80 GB and 141 GB cards, ✗ where it does not fit (a test checks the committed table equals this)."""
    header = ["model", "fine-tune", *(f"{gpus}× {gib} GB" for gpus, gib in DOC_CARDS)]
    rows = []
    for name in shipped_models():
        config = shipped_config(name)
        for finetune in ("full", "lora"):
            cells = [name, finetune]
            for gpus, gib in DOC_CARDS:
                card = gib * 10**9  # a card sold as "80 GB" holds 80·10⁹ bytes (74.5 GiB)
                settings = {"preset": preset, "precision": "bf16", "finetune": finetune,
                            "sharding": "fsdp" if gpus > 1 else "replicate", "prompts_per_step": DOC_PROMPTS,
                            "micro_batch_size": DOC_MICRO_BATCH, "activation_checkpointing": True}
                run = plan_run(config, None, gpus, card, settings)
                training = run.stages[1]
                cells.append(f"{_gib(training.total)}" + ("" if training.total <= card else " ✗"))
            rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(DOC_CARDS)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
