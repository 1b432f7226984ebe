"""The vLLM rollout engine against a fake vLLM 0.33.0 on a fake GPU (tests/fake_vllm.py: every behaviour it mirrors
cites the file of vLLM's wheel it was read from): the in-process external launcher, sizing and the start-up check,
sleep mode around the trainer's backward, per-request seeds, EOS, one engine at a time, and stages that load no HF
weights when vLLM samples. The sizing arithmetic is pinned against hand-computed values."""

import copy
import json
import math
import os
import shutil
import time

import pytest
import torch
from fake_vllm import GIB, FakeGPU, FakeLLM, SamplingParams, VLLMValidationError, install, uninstall

from caopd.config.engines import (
    HEADROOM_BYTES,
    STANDALONE_SHARE,
    DeviceMemory,
    ModelShape,
    RunLengths,
    VLLMConfig,
    check_startup,
    estimated_parameters,
    size_vllm,
)
from caopd.config.sampling import SamplingConfig
from caopd.config.stages import EvaluateConfig, RolloutConfig, TrainStageConfig
from caopd.config.training import TrainConfig
from caopd.errors import CaopdInputError
from caopd.io import read_jsonl, write_jsonl
from caopd.method.templates import render_prompt
from caopd.models.distributed import World
from caopd.models.loading import (
    config_context_length,
    encode_text,
    load_model,
    load_tokenizer_and_config,
    safetensors_parameters,
)
from caopd.models.packaged import PACKAGED_MODELS
from caopd.rollout import make_engine, trainer_pending_bytes, wants_vllm
from caopd.rollout.vllm_engine import request_seeds, use_external_launcher
from caopd.tasks.arithmetic import generate_rows
from caopd.tasks.base import Example
from caopd.training.objectives import StepContext, TrainItem, VerifiedRollouts, objective_for
from caopd.training.teachers import Teacher
from caopd.training.trainer import Trainer

TINY = str(PACKAGED_MODELS["tiny"])
# Qwen3-8B's config.json (the values sizing reads)
QWEN3_8B = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
            "tie_word_embeddings": False}


@pytest.fixture
def fake_gpu(monkeypatch):
    """The fake vLLM on a fake 24 GiB card with nothing else on it; the card, for the test to read."""
    gpu = FakeGPU()
    install(monkeypatch, gpu)
    yield gpu
    uninstall()


def tiny_engine(**settings):
    """A standalone engine on the tiny model, sized for prompts up to 16 tokens and 24 new ones, 4 at a time."""
    return make_engine(load_tokenizer_and_config("tiny"), "vllm", VLLMConfig(**settings), RunLengths(16, 24, 4))


# --- sizing (pure) -------------------------------------------------------------------------------------------------
def test_sizing_of_qwen3_8b_matches_the_hand_computed_numbers():
    shape = ModelShape.from_config(QWEN3_8B)
    assert shape.kv_bytes_per_token(2) == 2 * 36 * 8 * 128 * 2 == 147_456
    # embeddings and the untied head 2·151936·4096; per layer q, o 2·4096·4096, k, v 2·4096·1024, MLP 3·4096·12288,
    # norms 2·4096; the final norm 4096
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12288 + 2 * 4096
    assert shape.parameters == 2 * 151936 * 4096 + 36 * per_layer + 4096 == 8_190_726_144
    assert estimated_parameters(shape, 32, tied=True) == shape.parameters - 151936 * 4096
    total = 140 * GIB

    # rollout estimation, standalone: prompts up to 1000 tokens, 1024 new, 5000 prompts × K = 8
    standalone = size_vllm(VLLMConfig(), shape, RunLengths(1000, 1024, 40_000), DeviceMemory(total - GIB // 2, total),
                           colocated=False)
    assert (standalone.max_model_len, standalone.max_num_seqs, standalone.max_num_batched_tokens) == (2024, 256, 4096)
    assert standalone.weights_bytes == 16_381_452_288  # 8,190,726,144 × 2 bytes
    # 4096 tokens × (4·4096 + 3·12288) × 2 bytes + 3 × 256 sequences × 151936 × 4 bytes
    assert standalone.activation_bytes == 436_207_616 + 466_747_392 == 902_955_008
    # 2024 tokens are 127 blocks of 16 = 2032 tokens × 147,456 bytes, for 256 sequences
    assert standalone.kv_cache_bytes == 256 * 2032 * 147_456 == 76_705_431_552
    assert standalone.minimum_bytes == 16_381_452_288 + 902_955_008 + GIB + 2032 * 147_456 == 18_657_779_712
    assert standalone.needed_bytes == 95_063_580_672
    assert standalone.available_bytes == total - GIB // 2 - GIB
    assert standalone.gpu_memory_utilization == 0.9  # the card is the engine's, up to 0.9 of it

    # colocated training under FSDP: a process's 1 prompt × K = 8, prompts cut at 1024, 1024 new tokens; 120 GiB free
    # and the trainer still to allocate 12 GiB
    colocated = size_vllm(VLLMConfig(), shape, RunLengths(1024, 1024, 8), DeviceMemory(120 * GIB, total),
                          colocated=True, trainer_pending_bytes=12 * GIB)
    assert (colocated.max_model_len, colocated.max_num_seqs, colocated.max_num_batched_tokens) == (2048, 8, 4096)
    assert colocated.activation_bytes == 436_207_616 + 3 * 8 * 151936 * 4 == 450_793_472
    assert colocated.kv_cache_bytes == 8 * 2048 * 147_456 == 2_415_919_104
    assert colocated.needed_bytes == 16_381_452_288 + 450_793_472 + GIB + 2_415_919_104 == 20_321_906_688
    assert colocated.available_bytes == (120 - 1 - 12) * GIB
    # what it needs, rounded up to 0.001 of the card: 20,321,906,688 / 150,323,855,360 = 0.13519 → 0.136
    assert colocated.gpu_memory_utilization == 0.136
    assert colocated.engine_args() == {"gpu_memory_utilization": 0.136, "max_model_len": 2048, "max_num_seqs": 8,
                                       "max_num_batched_tokens": 4096}

    # given settings are kept; the context caps a derived max_model_len
    given = size_vllm(VLLMConfig(gpu_memory_utilization=0.5, max_num_seqs=64, max_num_batched_tokens=8192), shape,
                      RunLengths(40_000, 2000, 8), DeviceMemory(total, total), colocated=False)
    assert (given.gpu_memory_utilization, given.max_model_len, given.max_num_seqs,
            given.max_num_batched_tokens) == (0.5, 40_960, 64, 8192)


def test_sizing_refuses_what_vllm_would_refuse_naming_the_numbers_and_the_setting():
    shape, total = ModelShape.from_config(QWEN3_8B), 140 * GIB
    run, card = RunLengths(1024, 1024, 8), DeviceMemory(120 * GIB, total)
    # too little free for the weights and one sequence
    with pytest.raises(CaopdInputError, match=r"field 'vllm': vLLM needs at least 16\.96 GiB \(weights 15\.26 GiB "
                                              r"\+ KV cache of one 2048-token sequence 0\.28 GiB .* but has 9\.00 GiB"):
        size_vllm(VLLMConfig(), shape, run, DeviceMemory(10 * GIB, total), colocated=True)
    # the trainer's pending gradients and optimizer state count against it
    with pytest.raises(CaopdInputError, match=r"the 110\.00 GiB the trainer's gradients"):
        size_vllm(VLLMConfig(), shape, run, card, colocated=True, trainer_pending_bytes=110 * GIB)
    with pytest.raises(CaopdInputError, match=r"vllm.gpu_memory_utilization.*raise it to at least 0\.122"):
        size_vllm(VLLMConfig(gpu_memory_utilization=0.1), shape, run, card, colocated=False)
    with pytest.raises(CaopdInputError, match=r"vllm.gpu_memory_utilization.*lower it to at most 0\.771"):
        size_vllm(VLLMConfig(gpu_memory_utilization=0.8), shape, run, card, colocated=True,
                  trainer_pending_bytes=12 * GIB)
    with pytest.raises(CaopdInputError, match=r"vllm.max_model_len.*give at least 2048"):
        size_vllm(VLLMConfig(max_model_len=1500), shape, run, card, colocated=False)
    with pytest.raises(CaopdInputError, match=r"vllm.max_model_len.*beyond the model's context of 40960"):
        size_vllm(VLLMConfig(max_model_len=50_000), shape, run, card, colocated=False)
    with pytest.raises(CaopdInputError, match=r"vllm.max_num_batched_tokens.*below max_num_seqs \(512\)"):
        size_vllm(VLLMConfig(max_num_seqs=512, max_num_batched_tokens=256), shape, run, card, colocated=False)


def test_a_derived_share_is_never_below_what_vllm_needs_to_start():
    """Rounding to thousandths of the card, or the standalone ceiling of 0.9, must not leave vLLM less than the
    weights, one sequence and the activations: vLLM would pass the start-up check and fail its own KV cache check."""
    shape, total = ModelShape.from_config(QWEN3_8B), 140 * GIB
    run = RunLengths(1024, 1024, 8)
    minimum = size_vllm(VLLMConfig(), shape, run, DeviceMemory(120 * GIB, total), colocated=True).minimum_bytes
    # a free card barely larger than the model (1.5 GiB beyond the minimum): 0.9 of it is less than vLLM needs
    small = DeviceMemory(minimum + 3 * GIB // 2, minimum + 3 * GIB // 2)
    assert minimum > STANDALONE_SHARE * small.total
    sizing = size_vllm(VLLMConfig(), shape, run, small, colocated=False)
    assert sizing.gpu_memory_utilization > STANDALONE_SHARE
    assert math.ceil(small.total * sizing.gpu_memory_utilization) >= minimum
    # free memory just above the minimum, but below it once rounded down to a thousandth of the card: refused here
    tight = DeviceMemory(minimum + HEADROOM_BYTES + total // 2000, total)
    with pytest.raises(CaopdInputError, match=r"field 'vllm': vLLM needs at least"):
        size_vllm(VLLMConfig(), shape, run, tight, colocated=True)


def test_the_startup_check_fails_where_vllm_s_own_does(fake_gpu):
    # the old failure: a ~3B model's fp32 weights (12 GiB) on a 24 GiB card, then vLLM asked for 0.85 of it
    with pytest.raises(CaopdInputError) as caught:
        check_startup(12 * GIB, 24 * GIB, 0.85)
    message = str(caught.value)
    for part in ("field 'vllm.gpu_memory_utilization'", "12.00 GiB of the GPU's 24.00 GiB are free",
                 "0.85 × 24.00 = 20.40 GiB", "to 0.458 or less"):  # floor((12 − 1) / 24, 0.001)
        assert part in message
    check_startup(20 * GIB, 40 * GIB, 0.5)  # exactly enough: vLLM's condition is free ≥ ceil(total × utilization)
    with pytest.raises(CaopdInputError):
        check_startup(20 * GIB - 1, 40 * GIB, 0.5)
    # the fake mirrors vLLM's own check (vllm/v1/worker/utils.py request_memory), message and all
    fake_gpu.other = 12 * GIB
    use_external_launcher(0, 1)
    with pytest.raises(ValueError, match=r"^Free memory on device cuda:0 \(12\.0/24\.0 GiB\) on startup is less than "
                                         r"desired GPU memory utilization \(0\.85, 20\.4 GiB\)\. Decrease GPU"):
        FakeLLM(TINY, gpu_memory_utilization=0.85, distributed_executor_backend="external_launcher")


# --- the engine ----------------------------------------------------------------------------------------------------
def test_one_process_runs_the_engine_in_process_through_the_external_launcher(fake_gpu, tiny_model):
    engine = tiny_engine()
    llm = engine.llm
    assert llm.backend == "external_launcher" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert [os.environ[key] for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")] == ["0", "0", "1",
                                                                                                "localhost"]
    assert int(os.environ["MASTER_PORT"]) > 0 and torch.distributed.is_initialized()
    assert (llm.max_model_len, llm.max_num_seqs, llm.max_num_batched_tokens) == (40, 4, 4096)
    assert llm.kwargs["dtype"] == "bfloat16" and not llm.enable_sleep_mode
    # the trained weights go in through the in-process executor, every tensor
    student = copy.deepcopy(tiny_model.model)
    with torch.no_grad():
        student.model.norm.weight.add_(1.0)
    engine.sync_weights(student)
    assert llm.weights_loaded == len(list(student.named_parameters()))
    assert torch.equal(dict(llm.model.hf.named_parameters())["model.norm.weight"], student.model.norm.weight)
    assert ("reset_prefix_cache", 0, None) in fake_gpu.events
    engine.shutdown()
    engine.shutdown()  # idempotent
    assert llm.is_shut_down and fake_gpu.engine_bytes == 0 and not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate(["1+1="], SamplingConfig(max_new_tokens=4))
    # vLLM's default, a separate engine process, has no model_executor to load weights through (the old crash)
    del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    separate = FakeLLM(TINY, gpu_memory_utilization=0.5)
    with pytest.raises(AttributeError):
        separate.llm_engine.model_executor  # noqa: B018
    separate.llm_engine.engine_core.shutdown()
    # a vLLM engine starts from the path, the tokenizer and the config, never from a loaded HF model
    with pytest.raises(TypeError, match="load_tokenizer_and_config"):
        make_engine(tiny_model, "vllm", VLLMConfig(), RunLengths(16, 24, 4))


@pytest.mark.slow  # ~4 s on 2 cores
def test_every_sample_draws_its_own_stream_and_the_same_inputs_repeat(fake_gpu):
    seeds = request_seeds(7, 3, 4)
    assert seeds[1] - seeds[0] == seeds[2] - seeds[1] == 4 and 0 <= seeds[0] < 2**62  # children: seed + index
    assert request_seeds(7, 3, 4) == seeds and request_seeds(8, 3, 4)[0] != seeds[0]
    with tiny_engine() as engine:
        prompts = ["12*34=", "5+6=", "12*34="]  # the same prompt twice draws two sets of streams
        sampling = SamplingConfig(n=4, max_new_tokens=24, seed=7)
        first = engine.generate(prompts, sampling)
        drawn = [seed for request in engine.llm.requests for seed in request["seeds"]]
        assert drawn == [seed + i for seed in seeds for i in range(4)] and len(set(drawn)) == 12
        assert [c.text for c in first[0]] != [c.text for c in first[2]]
        again = engine.generate(prompts, sampling)
        assert [[c.token_ids for c in group] for group in again] == [[c.token_ids for c in group] for group in first]
        engine.generate(prompts, sampling.model_copy(update={"seed": 8}))
        other = [seed for request in engine.llm.requests[6:] for seed in request["seeds"]]
        assert not set(other) & set(drawn)
    assert engine.llm is None and fake_gpu.engine_bytes == 0  # the context manager shut it down


def test_greedy_with_several_samples_is_refused_before_vllm_sees_it(fake_gpu):
    with pytest.raises(VLLMValidationError, match=r"n must be 1 when using greedy sampling, got 2\."):
        SamplingParams(n=2, temperature=0.0)  # vLLM's own refusal (the fake mirrors vllm/sampling_params.py)
    greedy = SamplingConfig.model_construct(n=2, temperature=0.0, top_p=1.0, max_new_tokens=4, seed=0)
    with tiny_engine() as engine, pytest.raises(ValueError, match="sampling.temperature: 2 samples per prompt"):
        engine.generate(["1+1="], greedy)
    with pytest.raises(ValueError, match=r"sampling.temperature \(with k rollouts per prompt\)"):
        RolloutConfig(data="x.jsonl", k=8, sampling=SamplingConfig(temperature=0.0))


def test_a_finished_sample_ends_with_its_one_eos_and_trains_with_exactly_one(fake_gpu, tiny_model):
    tok = tiny_model.tokenizer
    with tiny_engine() as engine:
        # the tiny model's answers take 20 tokens and the EOS: cut at 20 none finishes, at 24 all do
        completions = [c for limit in (20, 24) for c in engine.generate(
            ["12*34="], SamplingConfig(n=4, temperature=1.0, max_new_tokens=limit, seed=5))[0]]
    assert [c.finished for c in completions] == [False] * 4 + [True] * 4
    for c in completions:
        assert c.token_ids.count(tok.eos_token_id) == c.finished and (c.token_ids[-1] == tok.eos_token_id) == c.finished
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True) and c.text.startswith(("4", "3"))
    rollouts = VerifiedRollouts(TrainItem(Example("p0", "12*34=", "408", "408\nConfidence: 1.00", {}), 0.5, None),
                                encode_text(tok, "12*34="), completions, [False] * 8, [None] * 8, 0.0)
    context = StepContext(tiny_model.model, Teacher("student", tiny_model.model), tok, tiny_model.template, World())
    for method in ("opd", "rlcr"):
        group = objective_for(TrainConfig(method=method)).group(rollouts, context)
        for ids, c in zip(group.completion_ids, completions):
            assert ids == c.token_ids and ids.count(tok.eos_token_id) == c.finished


def test_vllm_stops_on_every_eos_id_of_the_generation_config(fake_gpu, tmp_path, tiny_model):
    folder = shutil.copytree(TINY, tmp_path / "model")
    newline = tiny_model.tokenizer.convert_tokens_to_ids("\n")
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [1, newline]}))
    engine = make_engine(load_tokenizer_and_config(str(folder)), "vllm", VLLMConfig(), RunLengths(16, 24, 4))
    with engine:
        (group,) = engine.generate(["12*34="], SamplingConfig(n=3, max_new_tokens=24, seed=5))
    for c in group:  # stopped on the newline after the answer: it ends the ids, not the text
        assert c.finished and c.token_ids[-1] == newline and len(c.token_ids) == 4 and c.text == c.text.strip()


# --- stages --------------------------------------------------------------------------------------------------------
def test_estimation_with_vllm_puts_no_hf_weights_on_the_gpu_and_writes_its_usual_outputs(fake_gpu, arithmetic_files,
                                                                                          tmp_path):
    from caopd.stages.estimate import run_rollout_estimation

    train, _ = arithmetic_files
    assert wants_vllm("auto")  # vLLM installed and a GPU present: auto takes it
    summary = run_rollout_estimation(RolloutConfig(data=str(train), k=2), tmp_path / "rollouts", progress=False)
    assert fake_gpu.hf_models == 0 and fake_gpu.hf_bytes == 0
    assert (summary["n_prompts"], summary["n_rollouts"], summary["skipped_too_long"]) == (6, 12, 0)
    rows = read_jsonl(tmp_path / "rollouts" / "rollouts.jsonl")
    assert len(rows) == 12 and all(row["completion"] and isinstance(row["finished"], bool) for row in rows)
    assert len(read_jsonl(tmp_path / "rollouts" / "estimates.jsonl")) == 6
    (engine,) = fake_gpu.engines
    assert engine.is_shut_down and fake_gpu.engine_bytes == 0
    longest = max(len(request["prompt_token_ids"]) for request in engine.requests)
    assert engine.max_model_len == longest + 24 == summary["vllm"]["max_model_len"]
    assert engine.max_num_seqs == 6 * 2 and summary["vllm"]["gpu_memory_utilization"] == 0.9


@pytest.mark.slow  # ~8 s on 2 cores
def test_evaluation_runs_one_engine_per_arm_over_its_sets_each_shut_down_before_the_next(fake_gpu, arithmetic_files,
                                                                                         tmp_path):
    from caopd.stages.evaluate import run_evaluation

    _, evaluation = arithmetic_files
    ood = tmp_path / "ood.jsonl"
    write_jsonl(ood, generate_rows(4, 2, id_prefix="ood"))
    summary = run_evaluation(EvaluateConfig(models={"base": "tiny", "again": "tiny"}, data=str(evaluation),
                                            extra_data={"ood": str(ood)}, engine="vllm", bootstrap_resamples=0),
                             tmp_path / "eval", progress=False)
    starts = [(what, number) for what, number, _ in fake_gpu.events if what in ("start", "shutdown")]
    assert starts == [("start", 0), ("shutdown", 0), ("start", 1), ("shutdown", 1)] and fake_gpu.max_alive == 1
    assert [sum(what == "generate" and number == n for what, number, _ in fake_gpu.events) for n in (0, 1)] == [2, 2]
    assert fake_gpu.hf_models == 0 and fake_gpu.engine_bytes == 0
    # the same model with the same seeds: the same answers from both engines
    assert summary["arms"]["base"]["accuracy"] == summary["arms"]["again"]["accuracy"]
    assert set(summary["sets"]["ood"]["arms"]) == {"base", "again"} and set(summary["vllm"]) == {"base", "again"}
    assert (tmp_path / "eval" / "report.md").is_file()


def test_a_stage_that_would_trip_vllms_startup_check_fails_first_in_seconds(fake_gpu, arithmetic_files, tmp_path):
    from caopd.stages.estimate import run_rollout_estimation

    train, _ = arithmetic_files
    fake_gpu.other = 20 * GIB  # another process holds most of the card
    start = time.perf_counter()
    with pytest.raises(CaopdInputError, match=r"field 'vllm.gpu_memory_utilization': vLLM would refuse to start: "
                                              r"4\.00 GiB of the GPU's 24\.00 GiB are free, less than 0\.85 × 24\.00 = "
                                              r"20\.40 GiB .* lower vllm.gpu_memory_utilization to 0\.125 or less"):
        run_rollout_estimation(RolloutConfig(data=str(train), k=2, engine="vllm",
                                             vllm=VLLMConfig(gpu_memory_utilization=0.85)), tmp_path / "a",
                               progress=False)
    fake_gpu.other = 23 * GIB + GIB // 2  # derived: what is left cannot hold the engine
    with pytest.raises(CaopdInputError, match=r"field 'vllm': vLLM needs at least 1\.01 GiB .* but has -0\.50 GiB"):
        run_rollout_estimation(RolloutConfig(data=str(train), k=2, engine="vllm"), tmp_path / "b", progress=False)
    assert not fake_gpu.engines and time.perf_counter() - start < 10


def test_colocated_training_sleeps_through_every_backward_and_samples_from_the_trained_weights(
        fake_gpu, records, tmp_path, monkeypatch):
    from caopd.stages.train import run_training

    states = []
    backward = Trainer.loss_and_backward

    def watched(self, groups):  # the engine's state whenever the trainer takes its loss and backward
        states.append((set(self.engine.llm.sleeping_tags), fake_gpu.engine_bytes))
        fake_gpu.events.append(("backward", None, None))
        return backward(self, groups)

    monkeypatch.setattr(Trainer, "loss_and_backward", watched)
    train = TrainConfig(steps=2, prompts_per_step=2, k=2, warmup_steps=1, save_every=2)
    summary = run_training(TrainStageConfig(records=records, train=train, engine="vllm"), tmp_path / "train",
                           progress=False)
    assert summary["steps"] == 2
    assert states == [({"weights", "kv_cache"}, 0)] * 2  # asleep, its memory released, through each backward
    (llm,) = fake_gpu.engines
    assert llm.enable_sleep_mode and llm.backend == "external_launcher" and llm.max_num_seqs == 2 * 2
    events = [event[:2] for i, event in enumerate(fake_gpu.events)
              if event[0] != "load_weights" or fake_gpu.events[i - 1][0] != "load_weights"]  # one per weight load
    start, end = events.index(("start", 0)), events.index(("shutdown", 0))
    step = [("generate", 0), ("sleep", 0), ("backward", None), ("empty_cache", None), ("wake", 0),
            ("load_weights", 0), ("reset_prefix_cache", 0)]
    assert events[start + 1: end] == step + [("wake", 0)] + step
    wakes = [detail for what, _, detail in fake_gpu.events if what == "wake"]
    assert wakes == [("weights",), ("kv_cache",), ("weights",)]  # the weights first, the KV cache just before sampling
    # every tensor of the student went in after each step: the engine holds the trained model
    trained = load_model(str(tmp_path / "train" / "model"), device="cpu").model
    assert llm.weights_loaded == 2 * len(list(trained.named_parameters()))
    for name, param in llm.model.hf.named_parameters():
        assert torch.equal(param, dict(trained.named_parameters())[name]), name
    # the student alone is on the card beside the engine; the engine is gone at the end
    assert fake_gpu.hf_models == 1 and llm.is_shut_down and fake_gpu.engine_bytes == 0
    assert summary["vllm"]["max_num_seqs"] == 4 and 0 < summary["vllm"]["gpu_memory_utilization"] < 0.1


# --- loading without weights ---------------------------------------------------------------------------------------
def test_tokenizer_and_config_load_without_weights(fake_gpu, tiny_model):
    info = load_tokenizer_and_config("tiny")
    assert fake_gpu.hf_models == 0 and info.path == TINY and info.template == tiny_model.template
    assert config_context_length(info.config) == 256 == tiny_model.model.config.max_position_embeddings
    assert info.tokenizer.eos_token_id == tiny_model.tokenizer.eos_token_id == 1
    prompt = render_prompt(info.tokenizer, "12*34=", "template")
    assert encode_text(info.tokenizer, prompt) == encode_text(tiny_model.tokenizer, prompt)
    n_params = sum(p.numel() for p in tiny_model.model.parameters())
    assert safetensors_parameters(info.path) == n_params and safetensors_parameters("Qwen/Qwen3-8B") is None
    assert trainer_pending_bytes(tiny_model.model) == 3 * 4 * n_params  # gradient + 2 AdamW moments, fp32
    assert ModelShape.from_config(info.config.to_dict(), n_params).kv_bytes_per_token(2) == 2 * 4 * 2 * 32 * 2
    with pytest.raises(CaopdInputError, match="checkpoint folder does not exist"):
        load_tokenizer_and_config("./no/such/model")


def test_a_sharded_checkpoint_counts_the_files_its_index_names(tmp_path, tiny_model):
    """A folder may hold a consolidated copy beside its shards (Mistral's do): the index decides what is counted."""
    from safetensors.torch import save_file

    state = {name: p.detach().clone().contiguous() for name, p in tiny_model.model.named_parameters()}
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({key: state[key] for key in keys}, str(tmp_path / file))
    n_params = sum(t.numel() for t in state.values())
    save_file(state, str(tmp_path / "consolidated.safetensors"))
    # without an index only model.safetensors loads (and counts): shards and copies alone are no model
    assert safetensors_parameters(str(tmp_path)) is None
    weight_map = {key: file for file, keys in shards.items() for key in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert safetensors_parameters(str(tmp_path)) == n_params  # the shards, not the consolidated copy beside them
    (tmp_path / "model.safetensors.index.json").unlink()
    save_file(state, str(tmp_path / "model.safetensors"))
    assert safetensors_parameters(str(tmp_path)) == n_params
