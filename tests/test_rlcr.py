"""RLCR: the reward, GRPO advantages and the policy-gradient term against hand-computed values; a real run."""

import math

import pytest
import torch
from pydantic import ValidationError

from caopd.config.sampling import SamplingConfig
from caopd.config.stages import TrainStageConfig
from caopd.config.training import TrainConfig
from caopd.io import read_jsonl
from caopd.models.loading import load_model
from caopd.stages.train import run_training
from caopd.training.rlcr import group_advantages, policy_gradient_terms, rlcr_reward


@pytest.mark.parametrize("correct, confidence, reward", [
    (True, 1.0, 1.0),            # right and sure
    (True, 0.8, 1.0 - 0.04),     # right, Brier (0.8 - 1)^2
    (False, 0.8, -0.64),         # wrong and sure
    (False, 0.0, 0.0),           # wrong and says so
    (False, None, 0.0),          # missing counts as 0.0
    (True, None, 0.0),           # right but no confidence: 1 - 1
    (True, 1.7, 1.0),            # out of range is clipped to [0, 1]
])
def test_rlcr_reward_is_correctness_minus_brier(correct, confidence, reward):
    assert rlcr_reward(correct, confidence) == pytest.approx(reward)


def test_group_advantages_by_hand():
    # rewards 1, 0, 0, -1: mean 0, population std sqrt(0.5)
    adv = group_advantages([1.0, 0.0, 0.0, -1.0])
    assert adv == pytest.approx([1 / math.sqrt(0.5), 0.0, 0.0, -1 / math.sqrt(0.5)])
    assert group_advantages([1.0, 0.0, 0.0, -1.0], scale=False) == pytest.approx([1.0, 0.0, 0.0, -1.0])
    assert group_advantages([0.3, 0.3, 0.3]) == [0.0, 0.0, 0.0]  # no signal in an all-equal group
    assert group_advantages([]) == []


def test_policy_gradient_raises_rewarded_tokens_and_lowers_punished_ones():
    logits = torch.zeros(2, 4, requires_grad=True)  # uniform: log pi = log 1/4
    targets = torch.tensor([1, 2])
    terms = policy_gradient_terms(logits, targets, torch.tensor([2.0, -1.0]))
    assert terms.tolist() == pytest.approx([2.0 * math.log(4), -math.log(4)])
    terms.sum().backward()
    # d(-A log softmax_t)/d logit_j = -A (1[j=t] - 1/4)
    assert logits.grad[0].tolist() == pytest.approx([0.5, -1.5, 0.5, 0.5])
    assert logits.grad[1].tolist() == pytest.approx([-0.25, -0.25, 0.75, -0.25])
    with torch.no_grad():
        stepped = logits - 0.1 * logits.grad
    probs = stepped.softmax(-1)
    assert probs[0, 1] > 0.25 and probs[1, 2] < 0.25


def test_rlcr_refuses_teacher_settings():
    with pytest.raises(ValidationError, match="rlcr"):
        TrainConfig(method="rlcr", teacher="ema")
    with pytest.raises(ValidationError, match="rlcr"):
        TrainConfig(method="rlcr", top_k=5)


def test_rlcr_trains_without_a_teacher(tmp_path, records):
    cfg = TrainConfig(method="rlcr", steps=3, prompts_per_step=4, k=4, micro_batch_size=8, lr=1e-3,
                      sampling=SamplingConfig(max_new_tokens=24))
    summary = run_training(TrainStageConfig(records=records, train=cfg),
                           tmp_path / "t", progress=False)
    log = read_jsonl(tmp_path / "t" / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(-1.0 <= r["mean_reward"] <= 1.0 and math.isfinite(r["policy_loss"]) for r in log)
    assert summary["final"]["trained_tokens"] > 0
    trained = load_model(str(tmp_path / "t" / "model"))
    base = load_model("tiny")
    assert any(not torch.equal(a, b) for a, b in zip(trained.model.parameters(), base.model.parameters()))
