"""A few real training steps: checkpoints that load and generate, exact resume, variants, bad configs."""

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from caopd.config.sampling import SamplingConfig
from caopd.config.stages import TrainStageConfig
from caopd.config.training import TrainConfig
from caopd.errors import CaopdInputError
from caopd.io import read_jsonl
from caopd.models.loading import load_model
from caopd.models.tiny import build_tokenizer
from caopd.rollout.transformers_engine import TransformersEngine
from caopd.stages.train import run_training
from caopd.training.checkpoints import latest_checkpoint
from caopd.training.objectives import completion_tokens
from caopd.training.trainer import prompt_order

SMALL = dict(steps=3, prompts_per_step=3, k=2, save_every=1, micro_batch_size=4,
             sampling=SamplingConfig(max_new_tokens=24))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_few_step_training_saves_a_checkpoint_that_loads_and_generates(tmp_path, records):
    summary = run_training(TrainStageConfig(records=records, train=TrainConfig(**SMALL)), tmp_path / "t",
                           progress=False)
    assert summary["steps"] == 3
    log = read_jsonl(tmp_path / "t" / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] >= 0 for r in log)
    loaded = load_model(str(tmp_path / "t" / "model"))
    assert loaded.template == "compact"
    base = load_model("tiny")
    assert any(not torch.equal(a, b) for a, b in zip(loaded.model.parameters(), base.model.parameters()))
    (out,) = TransformersEngine(loaded.model, loaded.tokenizer).generate(
        ["12+3="], SamplingConfig(temperature=0.0, max_new_tokens=24))
    assert out[0].text
    assert (tmp_path / "t" / "training_curves.png").stat().st_size > 0
    assert latest_checkpoint(tmp_path / "t").name == "step-0000003"


@pytest.mark.parametrize("mode", [
    {"activation_checkpointing": False},
    # the bf16 ones in the slow tier (4-8 s each on 2 cores): the fast tier keeps fp32's resume
    pytest.param({"precision": "bf16"}, marks=pytest.mark.slow),  # and activation checkpointing, the default
    pytest.param({"precision": "bf16", "finetune": "lora"}, marks=pytest.mark.slow),  # the EMA teacher averages
], ids=["fp32", "bf16", "bf16-lora"])
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, records, mode):
    cfg = TrainConfig(**{**SMALL, "teacher": "ema", **mode})
    run_training(TrainStageConfig(records=records, train=cfg), tmp_path / "straight", progress=False)
    # interrupted after step 2: train 2 steps, then ask for 3 in the same folder
    run_training(TrainStageConfig(records=records, train=cfg.model_copy(update={"steps": 2})), tmp_path / "resumed",
                 progress=False)
    run_training(TrainStageConfig(records=records, train=cfg), tmp_path / "resumed", progress=False)
    a = load_model(str(tmp_path / "straight" / "model")).model.state_dict()
    b = load_model(str(tmp_path / "resumed" / "model")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = read_jsonl(tmp_path / "resumed" / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3]
    written = {f.name for f in latest_checkpoint(tmp_path / "resumed").iterdir()}
    if mode.get("finetune") == "lora":  # the adapters alone (the student's and the EMA's): the base never changes
        assert "adapters.safetensors" in written and "model.safetensors" not in written
        adapters = load_file(latest_checkpoint(tmp_path / "resumed") / "adapters.safetensors")
        assert adapters and all("lora_" in name for name in adapters)
        assert any(".ema." in name for name in adapters)


@pytest.mark.parametrize("overrides", [
    {"method": "opd", "teacher_context": "correct_solution", "divergence": "reverse_kl"},
    {"variant": "decoupled", "confidence_weight": 5.0, "divergence": "jsd", "beta": 0.3, "top_k": 8},
    {"teacher": "student", "p_source": "offline", "skip_first_tokens": 1},
])
def test_variants_train(tmp_path, records, overrides):
    cfg = TrainConfig(**{**SMALL, "steps": 1, **overrides})
    summary = run_training(TrainStageConfig(records=records, train=cfg), tmp_path / "v", progress=False)
    final = summary["final"]
    assert final["loss"] > 0 and torch.isfinite(torch.tensor(final["loss"]))
    if overrides.get("variant") == "decoupled":
        assert final["confidence_ce"] > 0


@pytest.mark.parametrize("bad, message", [
    ({"k": 0}, "k"), ({"lr": 0}, "lr"), ({"beta": 1.5}, "beta"), ({"teacher": "separate"}, "teacher_model"),
    ({"method": "opd", "variant": "decoupled"}, "decoupled"), ({"top_k": 0}, "top_k"),
])
def test_bad_training_configs_are_refused_up_front(bad, message):
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**bad)


def test_prompt_order_is_a_pure_function_of_seed_and_step():
    # steps continue through the epoch: the first 5 drawn indices are a permutation
    assert sorted(prompt_order(5, 0, 0, 3) + prompt_order(5, 0, 1, 3)[:2]) == list(range(5))
    first_epoch = prompt_order(5, 0, 0, 5)
    assert sorted(first_epoch) == list(range(5))
    assert prompt_order(5, 0, 3, 4) == prompt_order(5, 0, 3, 4)
    assert prompt_order(5, 0, 0, 5) != prompt_order(5, 1, 0, 5)


def test_completion_tokens_mark_the_confidence_line():
    tok = build_tokenizer()
    ids, mask = completion_tokens(tok, "408\nConfidence: 0.50", None)
    assert ids[-1] == tok.eos_token_id and len(ids) == len("408\nConfidence: 0.50") + 1
    assert mask == [False] * 4 + [True] * (len("Confidence: 0.50") + 1)
    sampled = tok("7\nConfidence: 0.9", add_special_tokens=False)["input_ids"]
    ids, mask = completion_tokens(tok, "7\nConfidence: 0.9", sampled)
    assert ids == sampled and not any(mask)


def test_each_process_samples_its_own_noise_and_rank_0_keeps_the_one_process_seed():
    from caopd.training.trainer import step_sampling

    cfg = TrainConfig(seed=3, k=4)
    seeds = {rank: step_sampling(cfg, 7, rank).seed for rank in range(4)}
    assert seeds[0] == 3 * 100_003 + 7 and len(set(seeds.values())) == 4
    assert step_sampling(cfg, 7, 0).n == 4
    # no process's seed is another's at another step of a long run
    assert not {step_sampling(cfg, s, 1).seed for s in range(10_000)} & {step_sampling(cfg, s, 0).seed
                                                                         for s in range(10_000)}


def test_a_run_that_cannot_fit_its_gpu_fails_before_any_weights_load(tmp_path, records, monkeypatch):
    import caopd.stages.train as stage

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the fit check")

    monkeypatch.setattr(stage, "load_model", no_loading)
    cfg = TrainStageConfig(records=records, train=TrainConfig(**SMALL), gpu_memory_gib=0.001)  # a 1 MiB card
    with pytest.raises(CaopdInputError, match="opd-training needs .* GiB per GPU .* it fits with|gpu_memory_gib"):
        run_training(cfg, tmp_path / "t", progress=False)
    assert not (tmp_path / "t" / "model").exists()
