"""The step's cost model (benchmarks/cost_model.py) against hand-computed values on a model small enough to count by
hand: 1 layer, hidden 2, one query head and one key/value head of 2, intermediate 4, vocabulary 10, tied.

Per token the decoder is 2·(h·A + 2·h·G + A·h + 3·h·i) = 2·(4 + 8 + 4 + 24) = 80 FLOPs, an attention pair 4·A = 8,
a head position 2·h·V = 40; the parameters 66 (embedding 20, layer 40 + norms 4, final norm 2). The step: 1 prompt
of 3 tokens (the teacher's 4) × K = 2 completions of 3 tokens."""

import pytest

from benchmarks import cost_model
from benchmarks.cost_model import Cost, StepShape, causal_pairs, executed_fraction, stage_costs, total
from caopd.config.memory import shipped_config

SMALL = {"num_hidden_layers": 1, "hidden_size": 2, "num_attention_heads": 1, "num_key_value_heads": 1,
         "head_dim": 2, "intermediate_size": 4, "vocab_size": 10, "tie_word_embeddings": True}
MODEL = cost_model.model_from_config(SMALL)
STEP = StepShape(groups=1, k=2, prompt_tokens=3, teacher_prompt_tokens=4, completion_tokens=3)


def flops(strategy, **options):
    return {name: cost.flops for name, cost in stage_costs(MODEL, STEP, strategy, **options).items()}


def test_the_unit_costs_and_pairs_count_by_hand():
    assert MODEL.shape.parameters == 66 and cost_model.layer_linear(MODEL) == 40
    assert causal_pairs(3) == 6 and causal_pairs(2, 3) == 2 * 3 + 3  # 2 tokens after 3 see 4 and 5 keys
    assert cost_model.forward_cost(MODEL, tokens=1, pairs=1, kv_reads=0, calls=0, dtype_bytes=4).flops == 80 + 8
    assert cost_model.head_cost(MODEL, positions=1, calls=0, dtype_bytes=4, logit_passes=0).flops == 40


def test_prompt_once_computes_each_prompt_once_per_group_and_the_head_where_completions_are_predicted():
    assert flops("prompt_once") == {
        # prefill 3 tokens, 6 pairs; 2 rows × 2 decode steps seeing 4 and 5 keys; heads: the prefill's last + 4
        "sampling": (3 * 80 + 6 * 8) + (4 * 80 + 18 * 8) + 5 * 40,
        # the teacher's prompt (4 tokens, 10 pairs) once, then 2 rows of 2 tokens after it (8 + 3 pairs each)
        "teacher_forward": (4 + 2 * 2) * 80 + (10 + 2 * 11) * 8,
        # the student's prompt (3 tokens, 6 pairs) once, 2 rows of 2 after it (6 + 3 pairs each): forward + backward
        "student_forward_backward": 3 * ((3 + 2 * 2) * 80 + (6 + 2 * 9) * 8),
        # 6 completion tokens: the student's head 3× (forward, two backward matmuls), the teacher's once, and 18
        # element-wise FLOPs per vocabulary entry
        "loss": 6 * 40 * 3 + 6 * 40 + 18 * 10 * 6,
        "optimizer": 12 * 66}
    assert total(stage_costs(MODEL, STEP, "prompt_once")).flops == 952 + 896 + 2256 + 2040 + 792


def test_a_row_per_completion_prefills_and_scores_every_row_with_its_prompt_and_recomputes_the_heads():
    assert flops("row_per_completion") == {
        "sampling": (6 * 80 + 12 * 8) + (4 * 80 + 18 * 8) + 6 * 40,  # the prompt prefilled twice
        # each row: prompt + the whole completion (4 + 3 tokens; 10 + 3·4 + 6 pairs)
        "teacher_forward": 2 * (7 * 80 + 28 * 8),
        "student_forward_backward": 3 * 2 * (6 * 80 + 21 * 8),
        # both heads again in the backward: the student's 4×, the teacher's 2×
        "loss": 6 * 40 * 4 + 6 * 40 * 2 + 18 * 10 * 6,
        "optimizer": 12 * 66}


def test_the_nominal_work_projects_every_position_and_the_fraction_executed_divides_by_it():
    nominal = flops("per_sequence")
    assert nominal["sampling"] == (6 * 80 + 12 * 8) + (4 * 80 + 18 * 8) + (2 * 3 + 4) * 40
    assert nominal["loss"] == (2 * 3 + 6) * 40 * 3 + (2 * 4 + 6) * 40 + 18 * 10 * 6
    assert sum(nominal.values()) == 1440 + 1568 + 3888 + 3080 + 792
    assert executed_fraction(MODEL, STEP, "prompt_once") == pytest.approx(6936 / 10768)


def test_checkpointing_adds_a_decoder_forward_and_lora_drops_the_weight_gradients():
    forward = (3 + 2 * 2) * 80 + (6 + 2 * 9) * 8
    assert flops("prompt_once", recompute_layers=True)["student_forward_backward"] == 4 * forward
    lora = flops("prompt_once", weight_gradients=False)
    assert lora["student_forward_backward"] == 2 * forward and lora["loss"] == 6 * 40 * 2 + 6 * 40 + 18 * 10 * 6


def test_a_group_split_across_micro_batches_computes_its_prompt_once_per_part():
    split = StepShape(groups=1, k=2, prompt_tokens=3, teacher_prompt_tokens=4, completion_tokens=3, micro_batch=1)
    teacher = stage_costs(MODEL, split, "prompt_once")["teacher_forward"].flops
    assert teacher == (2 * 4 + 2 * 2) * 80 + (2 * 10 + 2 * 11) * 8


def test_bytes_count_weights_activations_keys_scores_and_logits():
    costs = stage_costs(MODEL, STEP, "prompt_once")
    # weights once (40 × 4 B), 8 tokens × 66 elements × 4 B, 16 key/value reads × 2·G × 4 B, 32 pairs × 4 passes × 4 B
    assert costs["teacher_forward"].bytes == 160 + 8 * 66 * 4 + 16 * 2 * 2 * 4 + 32 * 4 * 4
    # the heads' weights once per pass (80 B each: 3 student, 1 teacher), 12 fp32 passes over 6 × 10 logits
    assert costs["loss"].bytes == 4 * 80 + 12 * 4 * 10 * 6
    assert costs["optimizer"].bytes == 28 * 66
    bf16 = stage_costs(MODEL, StepShape(**{**STEP.__dict__, "dtype_bytes": 2}), "prompt_once")
    assert bf16["teacher_forward"].flops == costs["teacher_forward"].flops
    assert bf16["teacher_forward"].bytes < costs["teacher_forward"].bytes


def test_the_predicted_time_is_each_stage_at_the_peak_or_at_the_slower_of_flops_and_bytes():
    costs = {"a": Cost(100.0, 10.0), "b": Cost(10.0, 100.0)}
    assert cost_model.predicted_seconds(costs, peak_flops=10.0) == 11.0
    assert cost_model.predicted_seconds(costs, peak_flops=10.0, bytes_per_s=10.0) == 10.0 + 10.0
    report = cost_model.summary(MODEL, STEP, "prompt_once", peak_flops=1e3)
    assert report["gflop"] == 6936 / 1e9 and report["seconds_at_peak"] == pytest.approx(6936 / 1e3)
    assert report["executed_fraction"] == pytest.approx(6936 / 10768) and report["seconds_roofline"] is None


def test_at_qwen3_0_6b_and_the_tool_shape_a_prompt_once_per_group_is_most_of_the_saving():
    """A real model at the paper's tool-use shape (1,000-token prompts, K = 8 × 250 tokens): computing each prompt
    once per group leaves under a third of the nominal work; TRL's layout over four fifths of it."""
    model = cost_model.model_from_config(shipped_config("Qwen3-0.6B"))
    step = StepShape(groups=4, k=8, prompt_tokens=1000, teacher_prompt_tokens=1200, completion_tokens=250)
    ours, trl = executed_fraction(model, step, "prompt_once"), executed_fraction(model, step, "row_per_completion")
    assert 0.25 < ours < 0.32 and 0.8 < trl < 0.86
