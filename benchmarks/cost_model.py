"""An analytic cost model of one on-policy distillation step: FLOPs and bytes moved per stage, for a dense
Llama/Qwen3-family decoder; pure arithmetic (no torch), pinned by tests/test_cost_model.py against hand-computed
values.

Notation: ``L`` layers, ``h`` hidden size, ``A`` = query heads × head_dim, ``G`` = key/value heads × head_dim, ``i``
intermediate size, ``V`` vocabulary, ``b`` the compute dtype's bytes; per group (a prompt and its ``K`` completions)
``P`` student prompt tokens, ``T`` teacher prompt tokens, ``C`` tokens per completion.

Unit costs (a multiply-add is 2 FLOPs):

* the decoder, per token: ``2·L·(h·A + 2·h·G + A·h + 3·h·i)`` — the q, k, v and o projections and the gated MLP
  (norms, rotary embeddings and residual adds are element-wise: bytes, not FLOPs, here);
* attention, per (query, key) pair: ``4·L·A`` — q·k and probabilities·v for every query head. A causal prefill of
  ``n`` tokens has n(n+1)/2 pairs; ``n`` tokens after ``c`` tokens of context n·c + n(n+1)/2;
* the LM head, per projected position: ``2·h·V``;
* a matmul's backward costs twice its forward (gradients of its input and of its weight; once when the weights are
  frozen, as a LoRA base), so a student forward + backward is 3× its forward (2× without weight gradients), and
  activation checkpointing adds one more forward of the decoder.

Stages (every group alike):

* **sampling** — a prefill, then ``K`` rows decode ``C − 1`` forwards each (the last token drawn is never fed back);
  the token fed at decode step ``t`` sees ``P + t`` keys. The head runs at every decode position and at the prefill's
  last one. Samples that coincide (the project's engine computes a shared prefix once) are not modelled: at random
  weights over a 32k vocabulary none do.
* **teacher_forward**, **student_forward_backward** — the decoder over the prompt and the completions: the logits
  predicting completion token ``j`` come from prompt + tokens ``< j``, so a completion adds ``C − 1`` positions after
  its prompt (its last token predicts nothing trained). Their LM head is counted in the loss.
* **loss** — the LM head where completion tokens are predicted (the student's forward and its two backward matmuls,
  the teacher's forward) and the element-wise work over the vocabulary per completion token (both log-softmaxes, the
  divergence and its gradient: ``LOSS_ELEMENTWISE_FLOPS`` per vocabulary entry).
* **optimizer** — AdamW over every parameter.

Strategies (``STRATEGIES``):

* ``prompt_once`` (the project's): each prompt's decoder forward runs once per group — one prefill in sampling, its
  keys and values read by the K rows, and once in each scoring forward (a group split across micro-batches: once per
  part) — and the head runs only where a completion token is predicted.
* ``row_per_completion`` (TRL 1.16's DistillationTrainer): each of the K rows is prefilled with its prompt in
  sampling (``generate`` on K copies) and scored as prompt + whole completion (its last position computed, then
  dropped); the head projects completion positions only (``logits_to_keep``), but its chunked divergence keeps no
  logits, so its backward projects both models' heads again (6 head matmuls per position, not 4).
* ``per_sequence`` — the nominal work: each completion a row of its own, the head at every position the decoder
  computes. ``executed_fraction`` divides a strategy's FLOPs by it.

Bytes moved (a roofline's second axis, to the order of magnitude): the weights once per forward call (each decode
step; each micro-batch's forward, and again in its backward), per token and layer the activations a forward reads
and writes (``ACTIVATION_TRAFFIC`` elements of h, A, G and i), the keys and values each row reads per layer (its whole
cache at every decode step; once per row in a prefill or scoring forward), per pair an eager kernel's fp32 scores
(``SCORE_PASSES``; a fused kernel, as TRL's SDPA on the CPU, keeps none), the fp32 logits (written once in sampling,
``LOGIT_PASSES`` passes per completion token in the loss), and AdamW's ``ADAMW_BYTES_PER_PARAMETER``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from caopd.config.memory import PlanModel

# Element-wise FLOPs per vocabulary entry per completion token in the loss: the student's and the teacher's
# log-softmax (max, subtract, exp, sum, log: ~5 each), the forward KL (exp, subtract, multiply, sum: ~4) and its
# gradient (softmax − target, times the token's weight: ~4).
LOSS_ELEMENTWISE_FLOPS = 18
# fp32 passes over a [completion tokens × vocab] tensor in the loss: both models' logits written, each log-softmax
# read and written, the divergence reading two and writing one, its gradient read and written.
LOGIT_PASSES = 12
# Per token and decoder layer, elements a forward reads and writes beyond the weights, by the width they scale with:
# the residual stream, both RMSNorms and the adds (h), q and the attention output (A), k and v (G), gate, up, SiLU and
# their product (i).
ACTIVATION_TRAFFIC = {"h": 17, "A": 2, "G": 2, "i": 6}
# fp32 [heads × queries × keys] passes of an eager attention kernel: scores written, the softmax reading them and
# writing probabilities, the second matmul reading those.
SCORE_PASSES = 4
ADAMW_BYTES_PER_PARAMETER = 28  # fp32 parameter, gradient and two moments read; parameter and moments written
ADAMW_FLOPS_PER_PARAMETER = 12
STAGES = ("sampling", "teacher_forward", "student_forward_backward", "loss", "optimizer")


@dataclass(frozen=True)
class StepShape:
    """One step's work: ``groups`` prompts × ``k`` completions of ``completion_tokens`` each (a mean will do), scored
    in micro-batches of ``micro_batch`` completions, in a compute dtype of ``dtype_bytes`` (4 fp32, 2 bf16)."""

    groups: int
    k: int
    prompt_tokens: float
    teacher_prompt_tokens: float
    completion_tokens: float
    micro_batch: int = 64
    dtype_bytes: int = 4


@dataclass(frozen=True)
class Strategy:
    """How a trainer lays a step out (module docstring)."""

    prompt_once: bool  # each prompt's forward once per group (else once per completion row)
    sampling_prompt_head: bool  # sampling's prefill projects every prompt position (else its last one)
    scoring_head_everywhere: bool  # scoring projects every position it computes (else where completions are predicted)
    head_recompute: bool  # the loss's backward projects both models' heads again (no logits kept)
    whole_completion: bool  # a scoring row holds the whole completion (its last token's position computed too)


STRATEGIES = {
    "prompt_once": Strategy(prompt_once=True, sampling_prompt_head=False, scoring_head_everywhere=False,
                            head_recompute=False, whole_completion=False),
    "row_per_completion": Strategy(prompt_once=False, sampling_prompt_head=False, scoring_head_everywhere=False,
                                   head_recompute=True, whole_completion=True),
    "per_sequence": Strategy(prompt_once=False, sampling_prompt_head=True, scoring_head_everywhere=True,
                             head_recompute=False, whole_completion=True),
}


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, factor: float) -> Cost:
        return Cost(self.flops * factor, self.bytes * factor)


def model_from_config(config: Mapping[str, Any], parameters: int | None = None) -> PlanModel:
    """A model's dimensions from its config.json values (``caopd.config.memory.PlanModel``: the planner's)."""
    return PlanModel.from_config(config, parameters)


def layer_linear(model: PlanModel) -> int:
    """The weights of one decoder layer's matmuls: h·A + 2·h·G + A·h + 3·h·i."""
    return sum(i * o for i, o in model.module_widths().values())


def causal_pairs(n: float, context: float = 0.0) -> float:
    """(query, key) pairs of ``n`` causal tokens after ``context`` tokens: n·context + n(n+1)/2."""
    return n * context + n * (n + 1) / 2


def forward_cost(model: PlanModel, tokens: float, pairs: float, kv_reads: float, calls: float,
                 dtype_bytes: int) -> Cost:
    """The decoder's forward over ``tokens`` with ``pairs`` attention pairs, reading ``kv_reads`` key/value positions
    per layer, in ``calls`` forward calls (each reads the weights once); the LM head is not in it."""
    s, b = model.shape, dtype_bytes
    flops = 2 * s.layers * layer_linear(model) * tokens + 4 * s.layers * model.attention_width * pairs
    traffic = (ACTIVATION_TRAFFIC["h"] * s.hidden_size + ACTIVATION_TRAFFIC["A"] * model.attention_width
               + ACTIVATION_TRAFFIC["G"] * model.kv_width + ACTIVATION_TRAFFIC["i"] * s.intermediate_size)
    moved = (calls * s.layers * layer_linear(model) * b + tokens * s.layers * traffic * b
             + kv_reads * s.layers * 2 * model.kv_width * b + pairs * s.layers * SCORE_PASSES * 4 * model.heads)
    return Cost(flops, moved)


def head_cost(model: PlanModel, positions: float, calls: float, dtype_bytes: int, logit_passes: int) -> Cost:
    """The LM head at ``positions`` (its weights read once per call), its fp32 logits moved ``logit_passes``
    times."""
    h, v = model.shape.hidden_size, model.shape.vocab_size
    return Cost(2 * h * v * positions, calls * h * v * dtype_bytes + positions * v * 4 * logit_passes)


def stage_costs(model: PlanModel, step: StepShape, strategy: str | Strategy, *, recompute_layers: bool = False,
                weight_gradients: bool = True) -> dict[str, Cost]:
    """FLOPs and bytes of each stage of one step (``STAGES``; module docstring). ``recompute_layers``: activation
    checkpointing (one more decoder forward in the backward); ``weight_gradients``: False when only adapters train
    (LoRA: the frozen weights' backward computes input gradients only)."""
    how = STRATEGIES[strategy] if isinstance(strategy, str) else strategy
    s, b = model.shape, step.dtype_bytes
    n, k, p, t, c = step.groups, step.k, step.prompt_tokens, step.teacher_prompt_tokens, step.completion_tokens
    rows = n * k
    micro = math.ceil(rows / step.micro_batch)

    # sampling: a prefill per group (or per row), then C − 1 decode steps of every row, one forward call each,
    # each row reading its whole cache
    copies = 1 if how.prompt_once else k
    prefill = forward_cost(model, n * copies * p, n * copies * causal_pairs(p), n * copies * p, 1, b)
    decode_pairs = rows * causal_pairs(c - 1, p)
    decode = forward_cost(model, rows * (c - 1), decode_pairs, decode_pairs, c - 1, b)
    sampled_heads = n * copies * (p if how.sampling_prompt_head else 1) + rows * (c - 1)
    sampling = prefill + decode + head_cost(model, sampled_heads, c, b, logit_passes=1)

    # scoring: a prompt once per group part (prompt once) or in every row, then each row's completion positions
    parts = math.ceil(k / step.micro_batch) if how.prompt_once else k
    scored = c if how.whole_completion else c - 1

    def scoring(prompt: float) -> Cost:
        return forward_cost(model, n * (parts * prompt + k * scored),
                            n * (parts * causal_pairs(prompt) + k * causal_pairs(scored, prompt)),
                            n * (parts * prompt + k * (prompt + scored)), micro, b)

    def head_positions(prompt: float) -> float:  # every position computed, or the completion-predicting ones
        return n * (parts * prompt + k * scored) if how.scoring_head_everywhere else rows * c

    backward = 2 if weight_gradients else 1
    teacher = scoring(t)
    student = scoring(p) * (1 + backward + (1 if recompute_layers else 0))

    # the loss: the heads (student forward + backward, teacher forward; both again in a recomputing backward) and
    # the element-wise work over the vocabulary at the completion tokens
    again = 1 if how.head_recompute else 0
    completion_heads = rows * c
    loss = (head_cost(model, head_positions(p), micro, b, 0) * (1 + backward + again)
            + head_cost(model, head_positions(t), micro, b, 0) * (1 + again)
            + Cost(LOSS_ELEMENTWISE_FLOPS * s.vocab_size * completion_heads,
                   LOGIT_PASSES * 4 * s.vocab_size * completion_heads))
    optimizer = Cost(ADAMW_FLOPS_PER_PARAMETER * s.parameters, ADAMW_BYTES_PER_PARAMETER * s.parameters)
    return {"sampling": sampling, "teacher_forward": teacher, "student_forward_backward": student, "loss": loss,
            "optimizer": optimizer}


def total(costs: Mapping[str, Cost]) -> Cost:
    return sum(costs.values(), Cost(0.0, 0.0))


def executed_fraction(model: PlanModel, step: StepShape, strategy: str | Strategy, **options: bool) -> float:
    """A strategy's FLOPs as a fraction of the nominal ``per_sequence`` work of the same step."""
    return total(stage_costs(model, step, strategy, **options)).flops / total(
        stage_costs(model, step, "per_sequence", **options)).flops


def predicted_seconds(costs: Mapping[str, Cost], peak_flops: float, bytes_per_s: float | None = None) -> float:
    """The step's time with every stage at the matmul peak (``peak_flops`` FLOP/s); with ``bytes_per_s``, each stage
    at the slower of its FLOPs and its bytes (a roofline per stage)."""
    return sum(max(cost.flops / peak_flops, cost.bytes / bytes_per_s if bytes_per_s else 0.0)
               for cost in costs.values())


def summary(model: PlanModel, step: StepShape, strategy: str, peak_flops: float, bytes_per_s: float | None = None,
            **options: bool) -> dict[str, Any]:
    """One side's account of a step, as the benchmark reports it: each stage's GFLOP and GB, the totals, the nominal
    work and the fraction of it executed, and the time predicted at the matmul peak (and on the roofline, given
    ``bytes_per_s``)."""
    costs = stage_costs(model, step, strategy, **options)
    whole = total(costs)
    nominal = total(stage_costs(model, step, "per_sequence", **options)).flops
    return {"strategy": strategy, "step": asdict(step),
            "stages": {name: {"gflop": cost.flops / 1e9, "gb": cost.bytes / 1e9} for name, cost in costs.items()},
            "gflop": whole.flops / 1e9, "gb": whole.bytes / 1e9, "nominal_gflop": nominal / 1e9,
            "executed_fraction": whole.flops / nominal, "seconds_at_peak": predicted_seconds(costs, peak_flops),
            "seconds_roofline": predicted_seconds(costs, peak_flops, bytes_per_s) if bytes_per_s else None}
