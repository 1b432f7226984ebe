"""The training objectives behind one interface: which method needs a teacher and which records it trains from, the
groups each builds from a prompt's verified rollouts, and a loss that does not depend on the micro-batching."""

import copy
from typing import get_args

import pytest
import torch

from caopd.config.sampling import SamplingConfig
from caopd.config.training import TrainConfig
from caopd.method.protocol import parse_confidence
from caopd.method.types import TEACHERLESS_METHODS, TrainMethod
from caopd.models.distributed import World
from caopd.models.loading import encode_text
from caopd.rollout.base import Completion
from caopd.rollout.transformers_engine import TransformersEngine
from caopd.tasks.base import Example
from caopd.training.objectives import (
    DistillationObjective,
    PromptGroup,
    RLCRObjective,
    StepContext,
    TrainItem,
    VerifiedRollouts,
    micro_batches,
    objective_for,
    split_group,
)
from caopd.training.rlcr import group_advantages, rlcr_reward
from caopd.training.teachers import Teacher

TEXTS = ["15\nConfidence: 0.90", "14\nConfidence: 0.40", "15", "51\nConfidence: 1.00"]


def test_every_training_method_has_an_objective_and_the_torch_free_layers_agree_with_it():
    records = {"opd": "opd", "caopd": "caopd", "rlcr": "opd"}  # RLCR reads only the prompts and answers
    for method in get_args(TrainMethod):
        objective = objective_for(TrainConfig(method=method))
        assert objective.needs_teacher == (method not in TEACHERLESS_METHODS)
        assert objective.targets_method == records[method]
    assert isinstance(objective_for(TrainConfig(method="rlcr")), RLCRObjective)
    assert isinstance(objective_for(TrainConfig(method="opd")), DistillationObjective)


def _rollouts(tokenizer, texts=TEXTS, prompt="12+3=", answer="15", prompt_ids=(5, 6)):
    example = Example("p0", prompt, answer, f"{answer}\nConfidence: 1.00", {})
    # a finished sample's ids end with the stop token it drew (caopd.rollout.base.Completion)
    completions = [Completion(t, tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * done,
                              finished=done) for t, done in zip(texts, [i % 2 == 0 for i in range(len(texts))])]
    correct = [t.split("\n")[0] == answer for t in texts]
    return VerifiedRollouts(TrainItem(example, 0.5, None), list(prompt_ids), completions, correct,
                            [parse_confidence(t) for t in texts], sum(correct) / len(correct))


def _context(loaded, student=None):
    student = student or loaded.model
    return StepContext(student, Teacher("frozen", student), loaded.tokenizer, loaded.template, World())


def test_rlcr_groups_train_the_sampled_ids_on_their_reward_advantages(tiny_model):
    rollouts = _rollouts(tiny_model.tokenizer)
    objective = objective_for(TrainConfig(method="rlcr"))
    group = objective.group(rollouts, _context(tiny_model))
    assert group.completion_ids == [c.token_ids for c in rollouts.completions]  # as sampled, stop token included
    assert group.teacher_prompt_ids == [] and not any(m for mask in group.confidence_masks for m in mask)
    rewards = [rlcr_reward(ok, q) for ok, q in zip(rollouts.correct, rollouts.confidences)]
    assert group.rewards == rewards and group.advantages == group_advantages(rewards)
    sums = objective.sums([group, group])
    assert sums == {"reward": 2 * sum(rewards)}
    assert objective.statistics({**sums, "samples": 8}) == {"mean_reward": pytest.approx(sum(rewards) / 4)}


def test_distillation_groups_edit_caopd_targets_and_keep_the_opd_samples(tiny_model):
    rollouts, context = _rollouts(tiny_model.tokenizer), _context(tiny_model)
    caopd = objective_for(TrainConfig(method="caopd")).group(rollouts, context)
    opd = objective_for(TrainConfig(method="opd")).group(rollouts, context)
    decode = tiny_model.tokenizer.decode
    assert all(decode(ids, skip_special_tokens=True).endswith("Confidence: 0.50") for ids in caopd.completion_ids)
    assert all(any(mask) for mask in caopd.confidence_masks)
    assert opd.completion_ids == [c.token_ids for c in rollouts.completions]  # as sampled, stop token included
    # one teacher prompt per group; CaOPD's context states P, OPD's reference says 1.00
    assert caopd.teacher_prompt_ids and opd.teacher_prompt_ids and caopd.teacher_prompt_ids != opd.teacher_prompt_ids
    assert objective_for(TrainConfig(method="caopd")).sums([caopd]) == {}


@pytest.mark.parametrize("overrides", [{"method": "caopd"}, {"method": "caopd", "variant": "decoupled"},
                                       {"method": "rlcr", "skip_first_tokens": 1},
                                       {"method": "caopd", "variant": "decoupled", "loss_normalization": "sequence",
                                        "skip_first_tokens": 3},
                                       {"method": "rlcr", "loss_normalization": "sequence", "skip_first_tokens": 2}])
def test_the_step_loss_and_its_gradients_do_not_depend_on_the_micro_batches_or_the_loss_chunks(tiny_model, overrides):
    tokenizer = tiny_model.tokenizer
    prompts = [("12+3=", "15"), ("7*8=", "56"), ("40+2=", "42")]
    results = []
    # the three groups of four in one micro-batch and one loss chunk, one group per micro-batch, each group split into
    # 3 + 1 completions in chunks of 7 tokens (chunks across completions), and the loss a token at a time
    for micro, chunk in ((100, 100_000), (4, 512), (3, 7), (100, 1)):
        cfg = TrainConfig(**overrides, micro_batch_size=micro, loss_chunk_tokens=chunk)
        objective, student = objective_for(cfg), copy.deepcopy(tiny_model.model).eval()
        context = _context(tiny_model, student)
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in prompts]
        groups = [objective.group(_rollouts(tokenizer, prompt=p, answer=a, prompt_ids=i), context)
                  for (p, a), i in zip(prompts, ids)]
        losses = objective.loss_and_backward(groups, context)
        results.append((losses, [p.grad.clone() for p in student.parameters()]))
    (whole, grads_whole), *others = results
    for split, grads_split in others:
        assert set(whole) == set(split) and whole["trained_tokens"] == split["trained_tokens"] > 0
        for key in whole:
            assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7)
        for a, b in zip(grads_whole, grads_split):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if overrides.get("variant") == "decoupled":
        assert whole["confidence_ce"] > 0


def test_opd_and_rlcr_train_on_sampled_sequences_with_exactly_one_eos(tiny_model):
    """The transformers engine's samples become training sequences as drawn: a finished one ends with its one EOS,
    an unfinished one has none (the vLLM engine's contract is the same: tests/test_vllm_engine.py)."""
    tok = tiny_model.tokenizer
    engine = TransformersEngine(tiny_model.model, tok)
    # the tiny model's answers take 20 tokens and the EOS: cut at 20 none finishes, at 24 all do
    completions = [c for limit in (20, 24) for c in engine.generate(
        ["12*34="], SamplingConfig(n=4, temperature=1.0, max_new_tokens=limit, seed=5))[0]]
    assert [c.finished for c in completions] == [False] * 4 + [True] * 4
    rollouts = VerifiedRollouts(TrainItem(Example("p0", "12*34=", "408", "408\nConfidence: 1.00", {}), 0.5, None),
                                encode_text(tok, "12*34="), completions, [False] * 8, [None] * 8, 0.0)
    for method in ("opd", "rlcr"):
        group = objective_for(TrainConfig(method=method)).group(rollouts, _context(tiny_model))
        for ids, c in zip(group.completion_ids, completions):
            assert ids.count(tok.eos_token_id) == c.finished and (ids[-1] == tok.eos_token_id) == c.finished


def test_micro_batches_pack_whole_groups_and_split_a_group_larger_than_the_setting():
    def group(name, k):
        return PromptGroup([name], [name], [[name, i] for i in range(k)], [[False, False]] * k,
                           [float(i) for i in range(k)], [])
    a, b, c = group(1, 2), group(2, 2), group(3, 5)
    # groups that fit are packed whole, as ever; the group of 5 becomes parts of 2, 2 and 1 with their advantages
    batches = micro_batches([a, b, c], 2)
    assert [[g.completion_ids for g in batch] for batch in batches] == [
        [[[1, 0], [1, 1]]], [[[2, 0], [2, 1]]], [[[3, 0], [3, 1]]], [[[3, 2], [3, 3]]], [[[3, 4]]]]
    assert [g.advantages for batch in batches[2:] for g in batch] == [[0.0, 1.0], [2.0, 3.0], [4.0]]
    assert all(g.prompt_ids == [3] and g.teacher_prompt_ids == [3] for batch in batches[2:] for g in batch)
    assert [len(batch) for batch in micro_batches([a, b, c], 4)] == [2, 1, 1]  # 2+2 | 4 | 1
    assert split_group(c, 5) == [c]
