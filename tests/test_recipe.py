"""The official training recipe's options: the cosine schedule and warm-up ratio (against transformers' own), epochs,
the per-sequence loss normalisation (by hand), left-truncated prompts that are sampled and trained as cut, engines
that take token ids, the thinking switch reaching every prompt, and a short real run with all of them at once."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import TrainingArguments
from transformers.optimization import get_cosine_schedule_with_warmup

from caopd.config.sampling import SamplingConfig
from caopd.config.stages import TrainStageConfig
from caopd.config.training import TrainConfig, total_steps, warmup_steps
from caopd.io import read_jsonl
from caopd.method.protocol import parse_confidence
from caopd.models.distributed import World
from caopd.models.loading import encode_text, load_model
from caopd.rollout.base import Completion
from caopd.rollout.transformers_engine import TransformersEngine
from caopd.stages.train import run_training
from caopd.tasks import get_task
from caopd.tasks.base import Example
from caopd.training.losses import token_cross_entropy, token_divergence
from caopd.training.objectives import (
    PromptGroup,
    StepContext,
    TrainItem,
    VerifiedRollouts,
    cut_teacher_prompt,
    left_truncate,
    objective_for,
    step_normalizer,
    token_weights,
)
from caopd.training.rlcr import policy_gradient_terms
from caopd.training.teachers import Teacher
from caopd.training.trainer import Trainer, learning_rate, prompt_order


# --- the schedule -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_steps, ratio", [(10, 0.1), (30, 0.1), (7, 0.0), (150, 0.25), (1, 0.5)])
def test_cosine_schedule_is_transformers_own_step_for_step(n_steps, ratio):
    cfg = TrainConfig(lr=2e-5, lr_schedule="cosine", warmup_ratio=ratio)
    # the warm-up as transformers resolves a ratio (TrainingArguments folds it into warmup_steps below 1)
    warmup = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), n_steps) if ratio else 0
    assert warmup_steps(cfg, n_steps) == warmup
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, n_steps)
    for step in range(n_steps):  # the rate the Hugging Face Trainer applies at its optimizer step `step`
        assert learning_rate(cfg, step, n_steps) == scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()


def test_cosine_and_constant_schedules_by_hand():
    cosine = TrainConfig(lr=1.0, lr_schedule="cosine", warmup_ratio=0.2)  # 10 steps: ceil(2.0) = 2 warm-up steps
    rates = [learning_rate(cosine, s, 10) for s in range(10)]
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert rates == pytest.approx(expected, abs=1e-12)
    assert rates[2] == 1.0 and 0 < rates[-1] < 0.04
    # constant: the schedule the project always had, (step + 1) / warmup then lr, with warmup_steps or a ratio
    assert [learning_rate(TrainConfig(lr=1.0, warmup_steps=4), s, 150) for s in (0, 1, 3, 4, 149)] == \
        [0.25, 0.5, 1.0, 1.0, 1.0]
    assert [learning_rate(TrainConfig(lr=1.0, warmup_ratio=0.1), s, 20) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert learning_rate(TrainConfig(lr=1.0, warmup_steps=0), 0, 5) == 1.0


def test_epochs_resolve_the_number_of_optimizer_steps():
    assert total_steps(TrainConfig(steps=7), 1000) == 7
    assert total_steps(TrainConfig(epochs=1, prompts_per_step=4), 10) == 3  # ceil(2.5): the last step spills over
    assert total_steps(TrainConfig(epochs=2, prompts_per_step=4), 10) == 5
    assert total_steps(TrainConfig(epochs=0.5, prompts_per_step=4), 10) == 2
    assert total_steps(TrainConfig(epochs=0.1, prompts_per_step=1), 30) == 3  # not 4: 0.1 × 30 > 3 in floats
    assert total_steps(TrainConfig(epochs=1, prompts_per_step=16), 2000) == 125
    assert total_steps(TrainConfig(epochs=0.001, prompts_per_step=4), 10) == 1


@pytest.mark.parametrize("bad, message", [
    ({"epochs": 1, "steps": 5}, "leave steps at its default"),
    ({"warmup_ratio": 0.1, "warmup_steps": 3}, "leave warmup_steps at its default"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"), ({"epochs": 0}, "epochs"), ({"max_prompt_tokens": 0}, "max_prompt_tokens"),
    ({"lr_schedule": "linear"}, "lr_schedule"), ({"loss_normalization": "batch"}, "loss_normalization"),
])
def test_the_length_and_the_warmup_are_each_given_one_way(bad, message):
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**bad)


# --- the loss normalisation ---------------------------------------------------------------------------------------
def _groups(*lengths_per_group):
    return [PromptGroup([1], [1], [[7] * n for n in lengths], [[False] * n for n in lengths])
            for lengths in lengths_per_group]


def _weighted_loss(terms, lengths, skip, normalization):
    groups = _groups(lengths)
    flat = groups[0].completion_ids
    weight = token_weights(flat, skip, normalization)
    cfg = TrainConfig(skip_first_tokens=skip, loss_normalization=normalization)
    return float((torch.tensor([t for row in terms for t in row]) * weight).sum()) / step_normalizer(groups, cfg,
                                                                                                     World())


def test_token_and_sequence_normalisation_by_hand():
    terms = [[0.9], [0.3, 0.6, 1.2]]  # two completions of lengths 1 and 3
    assert token_weights([[7], [7, 7, 7]], 0, "token").tolist() == [True] * 4
    assert token_weights([[7], [7, 7, 7]], 0, "sequence").tolist() == pytest.approx([1, 1 / 3, 1 / 3, 1 / 3])
    assert _weighted_loss(terms, [1, 3], 0, "token") == pytest.approx((0.9 + 0.3 + 0.6 + 1.2) / 4)
    assert _weighted_loss(terms, [1, 3], 0, "sequence") == pytest.approx((0.9 + (0.3 + 0.6 + 1.2) / 3) / 2)
    # skip_first_tokens=1: the length-1 completion has no counted token, adds nothing and is not counted
    terms = [[0.9], [0.3, 0.6, 1.2], [0.4, 0.8]]
    assert token_weights([[7], [7, 7, 7], [7, 7]], 1, "sequence").tolist() == pytest.approx([0, 0, .5, .5, 0, 1])
    assert _weighted_loss(terms, [1, 3, 2], 1, "token") == pytest.approx((0.6 + 1.2 + 0.8) / 3)
    assert _weighted_loss(terms, [1, 3, 2], 1, "sequence") == pytest.approx(((0.6 + 1.2) / 2 + 0.8) / 2)
    # the normaliser counts across every group of the step
    cfg = TrainConfig(skip_first_tokens=2, loss_normalization="sequence")
    assert step_normalizer(_groups([1, 3], [2, 5, 4]), cfg, World()) == 3
    assert step_normalizer(_groups([1, 3], [2, 5, 4]), cfg.model_copy(update={"loss_normalization": "token"}),
                           World()) == 1 + 3 + 2
    assert step_normalizer(_groups([1, 2]), cfg, World()) == 1  # nothing counted: a zero loss, not a division by 0


TEXTS = ["15\nConfidence: 0.90", "14\nConfidence: 0.40", "1", "51\nConfidence: 1.00"]


def _verified(tokenizer, prompt, answer, texts=TEXTS):
    example = Example(prompt, prompt, answer, f"{answer}\nConfidence: 1.00", {})
    completions = [Completion(t, tokenizer(t, add_special_tokens=False)["input_ids"], True) for t in texts]
    correct = [t.split("\n")[0] == answer for t in texts]
    return VerifiedRollouts(TrainItem(example, 0.5, None), encode_text(tokenizer, prompt), completions, correct,
                            [parse_confidence(t) for t in texts], sum(correct) / len(correct))


def _reference_logits(model, prompt_ids, completion_ids):
    """Next-token logits at each completion token, from one plain forward over prompt + completion."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(completion_ids)]


@pytest.mark.parametrize("overrides", [{"method": "caopd"}, {"method": "opd"},
                                       {"method": "caopd", "variant": "decoupled", "confidence_weight": 3.0},
                                       {"method": "rlcr"}])
def test_the_sequence_normalised_loss_is_the_mean_of_each_completions_token_mean(tiny_model, overrides):
    tokenizer = tiny_model.tokenizer
    cfg = TrainConfig(**overrides, loss_normalization="sequence", skip_first_tokens=3, micro_batch_size=4)
    objective, student = objective_for(cfg), copy.deepcopy(tiny_model.model).eval()
    context = StepContext(student, Teacher("frozen", student), tokenizer, tiny_model.template, World())
    groups = [objective.group(_verified(tokenizer, p, a), context) for p, a in (("12+3=", "15"), ("7*8=", "56"))]
    means = []
    for g in groups:
        for j, ids in enumerate(g.completion_ids):
            if len(ids) <= 3:  # "1" + EOS has no counted token under skip_first_tokens=3
                continue
            s_logits = _reference_logits(student, g.prompt_ids, ids)
            if cfg.method == "rlcr":
                terms = policy_gradient_terms(s_logits, torch.tensor(ids), torch.full((len(ids),), g.advantages[j]))
            else:
                t_logits = _reference_logits(context.teacher.model, g.teacher_prompt_ids, ids)
                terms = token_divergence(s_logits, t_logits, cfg.divergence)
                if cfg.variant == "decoupled":  # the Confidence line by cross-entropy, normalised alike
                    conf = torch.tensor(g.confidence_masks[j])
                    ce = token_cross_entropy(s_logits, torch.tensor(ids)) * cfg.confidence_weight
                    terms = torch.where(conf, ce, terms)
            means.append(float(terms[3:].mean()))
    # the sampled "1" + EOS (OPD, RLCR) is too short to count; CaOPD's edit gives it a Confidence line
    assert len(means) == (8 if cfg.method == "caopd" else 6)
    losses = objective.loss_and_backward(groups, context)
    assert losses["loss"] == pytest.approx(sum(means) / len(means), rel=1e-4)
    assert losses["trained_sequences"] == len(means)
    if cfg.variant == "decoupled":
        assert losses["confidence_ce"] > 0
    # the token normalisation of the same groups: one mean over every counted token
    token = objective_for(cfg.model_copy(update={"loss_normalization": "token"}))
    assert "trained_sequences" not in token.loss_and_backward(groups, context)


# --- prompt truncation --------------------------------------------------------------------------------------------
def test_left_truncation_keeps_the_last_tokens():
    assert left_truncate([1, 2, 3, 4, 5], 3) == [3, 4, 5]
    assert left_truncate([1, 2, 3], 3) == [1, 2, 3]
    assert left_truncate([1, 2, 3], None) == [1, 2, 3]


def test_the_teacher_loses_the_tokens_the_student_lost_and_keeps_its_privileged_context():
    student = [1, 2, 3, 4, 5]  # the student's whole prompt; truncation drops its first 2
    # the paper's layout: the question first, then the privileged context (9 9 9), then the template's tail
    assert cut_teacher_prompt([1, 2, 3, 4, 9, 9, 9, 5], student, 2) == [3, 4, 9, 9, 9, 5]
    # the compact layout: the privileged context first, the student's prompt closing the teacher's
    assert cut_teacher_prompt([9, 9, 1, 2, 3, 4, 5], student, 2) == [9, 9, 3, 4, 5]
    # neither (a cut past the shared part): the teacher's first tokens go, as in left truncation
    assert cut_teacher_prompt([8, 9, 9, 7, 5], student, 2) == [9, 7, 5]
    assert cut_teacher_prompt([8, 9, 9], student, 0) == [8, 9, 9]


class RecordingEngine(TransformersEngine):
    """The transformers engine, noting the prompts it is asked for."""

    def __init__(self, model, tokenizer) -> None:
        super().__init__(model, tokenizer)
        self.prompts: list = []

    def generate(self, prompts, sampling, progress=False):
        self.prompts.append(prompts)
        return super().generate(prompts, sampling, progress)


def _items(prompts):
    return [TrainItem(Example(f"p{i}", q, a, f"{a}\nConfidence: 1.00", {}), 0.5, None)
            for i, (q, a) in enumerate(prompts)]


PROMPTS = [("63*15=", "945"), ("75+7=", "82"), ("2+1=", "3")]


def test_truncated_prompts_are_sampled_and_trained_exactly_as_cut(tiny_model, tmp_path):
    tokenizer, student = tiny_model.tokenizer, copy.deepcopy(tiny_model.model)
    engine = RecordingEngine(student, tokenizer)
    cfg = TrainConfig(max_prompt_tokens=4, prompts_per_step=3, k=2, micro_batch_size=8,
                      sampling=SamplingConfig(max_new_tokens=12))
    trainer = Trainer(cfg, student, tokenizer, tiny_model.template, get_task("arithmetic"), _items(PROMPTS), engine,
                      Teacher("frozen", student), tmp_path, progress=False)
    full = {p: encode_text(tokenizer, p) for p, _ in PROMPTS}
    assert trainer.prompt_truncation() == {"max_prompt_tokens": 4, "training_prompts": 3, "truncated_prompts": 2,
                                           "longest_prompt_tokens": 6}
    batch = trainer.items
    asked = [trainer.prompt_ids[it.example.id] for it in batch]
    assert asked == [full[p][-4:] for p, _ in PROMPTS]  # the last 4 tokens: "*15=", "5+7=", and "2+1=" whole
    rollouts = engine.generate(asked, cfg.sampling.model_copy(update={"n": 2}))
    groups, sums = trainer.build_groups(batch, rollouts)
    assert sums["truncated"] == 2 and trainer.step_statistics(sums)["truncated_prompts"] == 2
    for (prompt, _), group in zip(PROMPTS, groups):
        assert group.prompt_ids == full[prompt][-4:]
        teacher = tokenizer.decode(group.teacher_prompt_ids)  # compact: "[reference|P]" then the question as cut
        assert teacher.startswith("[") and teacher.endswith("]" + tokenizer.decode(full[prompt][-4:]))
    # a whole step: the sampled prompts are the cut ones, and the record counts them
    record = trainer.train_step(0)
    assert engine.prompts[-1] == [asked[i] for i in prompt_order(3, cfg.seed, 0, 3)]
    assert record["truncated_prompts"] == 2


def test_the_thinking_switch_reaches_the_student_and_the_teacher_prompts(tiny_model, tmp_path):
    tokenizer = copy.deepcopy(tiny_model.tokenizer)
    # a chat template that shows the switch (Qwen3's keyword), in characters the tiny vocabulary has
    tokenizer.chat_template = ("{{ messages[-1]['content'] }}"
                               "{% if enable_thinking is defined and not enable_thinking %}off{% endif %}")
    trainer = Trainer(TrainConfig(), tiny_model.model, tokenizer, tiny_model.template, get_task("arithmetic"),
                      _items(PROMPTS), TransformersEngine(tiny_model.model, tokenizer),
                      Teacher("student", tiny_model.model), tmp_path, progress=False, thinking="off")
    assert tokenizer.decode(trainer.prompt_ids["p0"]) == "63*15=off"
    assert trainer.context().thinking == "off"
    group = objective_for(TrainConfig()).group(_verified(tokenizer, "12+3=", "15"), trainer.context())
    assert tokenizer.decode(group.teacher_prompt_ids).endswith("12+3=off")
    default = Trainer(TrainConfig(), tiny_model.model, tokenizer, tiny_model.template, get_task("arithmetic"),
                      _items(PROMPTS), TransformersEngine(tiny_model.model, tokenizer),
                      Teacher("student", tiny_model.model), tmp_path, progress=False)
    assert tokenizer.decode(default.prompt_ids["p0"]) == "63*15="


# --- engines take token ids ---------------------------------------------------------------------------------------
def test_the_transformers_engine_samples_the_same_from_a_text_and_its_ids(tiny_model):
    engine = TransformersEngine(tiny_model.model, tiny_model.tokenizer, max_batch_prompts=2)
    texts = ["12*34=", "3+4=", "56*7="]
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=16, seed=5)
    ids = [encode_text(tiny_model.tokenizer, t) for t in texts]

    def flat(out):
        return [(c.text, c.token_ids, c.finished) for group in out for c in group]

    from_text = flat(engine.generate(texts, sampling))
    assert flat(engine.generate(ids, sampling)) == from_text
    assert flat(engine.generate([texts[0], ids[1], tuple(ids[2])], sampling)) == from_text  # mixed, any sequence


# --- a short real run with the whole recipe -----------------------------------------------------------------------
def test_a_run_with_the_official_recipe_options(tmp_path, records):
    cfg = TrainConfig(lr_schedule="cosine", warmup_ratio=0.2, epochs=2, loss_normalization="sequence",
                      max_prompt_tokens=3, skip_first_tokens=3, teacher="ema", prompts_per_step=2, k=2,
                      micro_batch_size=4, save_every=1, keep_checkpoints=10, sampling=SamplingConfig(max_new_tokens=24))
    summary = run_training(TrainStageConfig(records=records, train=cfg), tmp_path / "t", progress=False)
    n_prompts = len({r["prompt_id"] for r in read_jsonl(records)})
    assert n_prompts == 6 and summary["total_steps"] == summary["steps"] == 6  # 2 epochs of 6 prompts, 2 a step
    truncation = summary["prompt_truncation"]  # every arithmetic prompt is longer than 3 tokens
    assert truncation["truncated_prompts"] == 6 and truncation["longest_prompt_tokens"] > 3
    log = read_jsonl(tmp_path / "t" / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    # warm-up ceil(0.2 × 6) = 2 steps (lr·0, lr·½), then the cosine over the 4 steps after it
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [r["lr"] / cfg.lr for r in log] == pytest.approx(expected, abs=1e-12)
    assert all(r["truncated_prompts"] == 2 and r["trained_sequences"] >= 1 for r in log)
    assert all(math.isfinite(r["loss"]) and r["loss"] >= 0 for r in log)
    # the EMA teacher after every optimizer step: 0.99·teacher + 0.01·student, step after step from the base
    checkpoints = tmp_path / "t" / "checkpoints"
    teacher = {k: v for k, v in load_model("tiny").model.state_dict().items()}
    for step in range(1, 7):
        student = load_file(checkpoints / f"step-{step:07d}" / "model.safetensors")
        saved = load_file(checkpoints / f"step-{step:07d}" / "teacher.safetensors")
        shared = saved.keys() & student.keys()  # a tied weight is stored once, under either of its names
        assert len(shared) >= len(saved) - 1
        for name in shared:
            expected_teacher = 0.99 * teacher[name] + 0.01 * student[name]
            torch.testing.assert_close(saved[name], expected_teacher, rtol=1e-5, atol=1e-7)
            teacher[name] = saved[name]
        if step == 1:  # the first step's rate is 0: the student has not moved, nor has the teacher
            assert all(torch.equal(saved[k], student[k]) for k in shared)
