"""The memory planner (caopd.config.memory) and `caopd plan`: the arithmetic against hand-computed values, the
shipped Qwen3 configs against their published sizes, the refusal, the stage's start-up check, the docs' table, and
(slow) the estimate against the peak memory a CPU training step measures."""

import json
import re
from pathlib import Path

import pytest

from caopd.cli import main
from caopd.config.engines import GIB
from caopd.config.memory import (
    PlanModel,
    TrainPlan,
    check_rollout_fits,
    check_training_fits,
    docs_table,
    lora_parameters,
    resolve_model_config,
    shipped_config,
    shipped_models,
    training_memory,
)
from caopd.config.stages import RolloutConfig, TrainStageConfig
from caopd.config.training import TrainConfig
from caopd.errors import CaopdInputError

SMALL = {"num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 2, "num_key_value_heads": 2,
         "head_dim": 16, "intermediate_size": 128, "vocab_size": 100, "tie_word_embeddings": True,
         "max_position_embeddings": 512}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "memory.md"


def test_the_shipped_qwen3_configs_count_their_published_sizes_within_two_percent():
    published = {"0.6B": 0.6e9, "1.7B": 1.7e9, "4B": 4.0e9, "8B": 8.2e9, "14B": 14.8e9, "32B": 32.8e9}
    assert [name.split("-")[-1] for name in shipped_models()] == list(published)
    for name in shipped_models():
        config = shipped_config(name)
        assert config["vocab_size"] == 151936 and config["head_dim"] == 128 and config["num_key_value_heads"] == 8
        parameters = PlanModel.from_config(config).shape.parameters
        assert abs(parameters / published[name.split("-")[-1]] - 1) < 0.02, name
    assert shipped_config("Qwen3-8B") == shipped_config("Qwen/Qwen3-8B") and shipped_config("Qwen/Qwen3-9B") is None


def test_lora_adapters_count_r_times_in_plus_out_of_each_targeted_layer():
    qwen3_8b = PlanModel.from_config(shipped_config("Qwen/Qwen3-8B"))
    # per layer: q 4096+4096, k and v 4096+1024, o 4096+4096, gate and up 4096+12288, down 12288+4096 = 75776
    assert lora_parameters(qwen3_8b, 16, "all-linear") == 36 * 16 * 75776 == 43_646_976
    small = PlanModel.from_config(SMALL)
    assert lora_parameters(small, 4, ["q_proj", "v_proj"]) == 2 * 4 * ((64 + 64) + (64 + 32))
    with pytest.raises(CaopdInputError, match="unknown LoRA target modules.*'c_attn'"):
        lora_parameters(small, 4, ["c_attn"])


def test_training_memory_of_a_small_model_by_hand():
    model = PlanModel.from_config(SMALL)
    # embeddings 100×64 (tied) + 2 layers × (2·64·64 + 2·64·32 + 3·64·128 + 2·64) + the final norm 64
    assert model.shape.parameters == 6400 + 2 * 36992 + 64 == 80448
    plan = TrainPlan(k=2, prompts_per_step=2, micro_batch_size=2, max_prompt_tokens=10, max_new_tokens=5,
                     overhead_bytes=0)
    memory = training_memory(model, plan)
    p = 80448
    assert (memory.parts["weights"], memory.parts["gradients"], memory.parts["optimizer"],
            memory.parts["teacher"]) == (4 * p, 4 * p, 8 * p, 4 * p)
    # one micro-batch: 2 rows × 5 completion tokens + 1 prompt of 10 = 20 tokens of 9·64 + 4.5·64 + 2.5·32 + 4.7·128
    # elements each, plus each row's keys and values (2 rows × 15 tokens × 2·32), per layer, fp32
    assert memory.parts["activations"] == round(2 * (20 * 1545.6 + 2 * 15 * 64) * 4) == 262656
    # LOGIT_COPIES fp32 [tokens × vocab] (the 10 tokens fit in one chunk) + the head's gradient (100 × 64)
    assert memory.parts["logits"] == 7 * 2 * 5 * 100 * 4 + 100 * 64 * 4
    # soft-capped logits (Gemma 2) are not the head's output: the micro-batch's whole logits, 3 copies, come on top
    capped = PlanModel.from_config({**SMALL, "final_logit_softcapping": 30.0})
    assert not capped.plain_head and model.plain_head
    assert training_memory(capped, plan).parts["logits"] == 7 * 2 * 5 * 100 * 4 + 3 * 2 * 5 * 100 * 4
    # transformers sampling: 2 prompts × K 2 × 15 tokens × (2·2 layers·32·4 bytes) + a decoding step's logits, each
    # sample's row of them, its probabilities and torch.multinomial's exponentials (2 × 2 samples × 100 × 4 bytes × 4;
    # the prefill keeps each prompt's last position only)
    assert memory.parts["sampling"] == 4 * 15 * 512 + 4 * 100 * 16
    # a real vocabulary's draw: the inverse CDF's float64 copy and cumulative sums instead of the exponentials
    wide = PlanModel.from_config({**SMALL, "vocab_size": 32768})
    assert training_memory(wide, plan).parts["sampling"] == 4 * 15 * 512 + 4 * 32768 * (4 + 4 + 4 + 16)
    assert memory.total == 20 * p + 262656 + 28000 + 25600  # resident + the loss phase (larger than sampling)

    lora = training_memory(model, TrainPlan(**{**plan.__dict__, "precision": "bf16", "finetune": "lora",
                                               "lora_r": 4, "teacher": "ema"}))
    adapters = lora_parameters(model, 4, "all-linear")
    assert (lora.parts["weights"], lora.parts["gradients"], lora.parts["optimizer"], lora.parts["teacher"]) == (
        2 * p + 4 * adapters, 4 * adapters, 8 * adapters, 4 * adapters)  # bf16 base; the EMA a second adapter set
    frozen = training_memory(model, TrainPlan(**{**plan.__dict__, "finetune": "lora"}))
    assert frozen.parts["teacher"] == 0  # the base with its adapters off

    fsdp = training_memory(model, TrainPlan(**{**plan.__dict__, "gpus": 4, "sharding": "fsdp", "prompts_per_step": 8}))
    assert fsdp.parts["weights"] == 4 * p // 4 and fsdp.parts["optimizer"] == 8 * p // 4
    assert fsdp.parts["gathered layers"] == 2 * model.layer_parameters() * 4 * 2  # 2 layers, student and teacher
    checkpointed = training_memory(model, TrainPlan(**{**plan.__dict__, "activation_checkpointing": True}))
    assert checkpointed.parts["activations"] == round((2 * 20 * 64 + 20 * 1545.6 + 2 * 15 * 64) * 4)
    # bf16 full fine-tune: a frozen copy in bf16, an EMA copy in float32; autocast keeps the residual stream float32
    bf16 = {**plan.__dict__, "precision": "bf16", "activation_checkpointing": True}
    assert training_memory(model, TrainPlan(**bf16)).parts["teacher"] == 2 * p
    assert training_memory(model, TrainPlan(**{**bf16, "teacher": "ema"})).parts["teacher"] == 4 * p
    assert training_memory(model, TrainPlan(**bf16)).parts["activations"] == round(
        2 * 20 * 64 * 4 + (20 * 1545.6 + 2 * 15 * 64) * 2)
    separate = training_memory(model, TrainPlan(**{**plan.__dict__, "teacher": "separate", "teacher_parameters": 10}))
    assert separate.parts["teacher"] == 10 * 4  # at its own size


def _stage(**train) -> TrainStageConfig:
    return TrainStageConfig(records="r.jsonl", train=TrainConfig(**train), engine="transformers")


def test_the_training_check_names_the_stage_the_need_the_card_and_the_change_that_fits():
    qwen3_8b = shipped_config("Qwen/Qwen3-8B")
    with pytest.raises(CaopdInputError) as refused:
        check_training_fits(_stage(micro_batch_size=8, max_prompt_tokens=512), qwen3_8b, 1, 80 * GIB)
    line = str(refused.value)
    assert "\n" not in line and line.startswith("field 'gpu_memory_gib': opd-training needs ")
    assert "on a 80.0 GiB GPU; it fits with --train.precision bf16" in line or "--train.finetune lora" in line
    fits = check_training_fits(_stage(micro_batch_size=8, max_prompt_tokens=512, precision="bf16", finetune="lora",
                                      activation_checkpointing=True), qwen3_8b, 1, 80 * GIB)
    assert fits.total <= 80 * GIB and fits.parts["teacher"] == 0
    # the tiny default fits any card; a card of 10 MiB does not, and nothing makes it fit
    tiny, parameters, _ = resolve_model_config("tiny", _packaged())
    assert check_training_fits(_stage(), tiny, 1, 2 * GIB, 20, parameters).total < 2 * GIB
    with pytest.raises(CaopdInputError, match="no single setting makes it fit"):
        check_training_fits(_stage(), tiny, 1, 10 << 20, 20, parameters)


def _packaged():
    from caopd.models.packaged import PACKAGED_MODELS

    return PACKAGED_MODELS


def test_model_configs_resolve_from_a_folder_the_package_or_fail_in_one_line(monkeypatch):
    config, parameters, source = resolve_model_config("tiny", _packaged())
    assert config["hidden_size"] == 128 and source.endswith("config.json")
    # the safetensors headers' exact count: the formula's, plus Qwen3's per-head q/k norms (2 × head_dim per layer)
    assert parameters == PlanModel.from_config(config).shape.parameters + 4 * 2 * 32
    assert resolve_model_config("Qwen/Qwen3-0.6B")[0]["num_hidden_layers"] == 28
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import: the variable alone comes too late
    with pytest.raises(CaopdInputError, match="cannot read config.json of 'someone/unknown-model'.*local model folder"):
        resolve_model_config("someone/unknown-model")


def test_the_rollout_check_refuses_a_card_too_small_for_its_engine():
    tiny, parameters, _ = resolve_model_config("tiny", _packaged())
    cfg = RolloutConfig(data="d.jsonl")
    memory = check_rollout_fits(cfg, tiny, 2 * GIB, prompts=16, longest_prompt=20, vllm=False, parameters=parameters)
    assert memory.parts["weights"] == 4 * parameters  # loaded in fp32
    # 16 prompts × K 8 samples × the tiny model's 54 entries × (2 fp32 copies of the logits + probabilities and
    # torch.multinomial's exponentials), as the training stage's sampling counts them
    assert memory.parts["logits"] == 16 * 8 * 54 * (8 + 8) == 16 * 8 * 54 * 4 * 4
    with pytest.raises(CaopdInputError, match=r"rollout-estimation needs .* GiB GPU; sample with vLLM"):
        check_rollout_fits(cfg, tiny, 1 << 20, prompts=16, longest_prompt=20, vllm=False, parameters=parameters)
    with pytest.raises(CaopdInputError, match=r"rollout-estimation needs .*vllm.max_model_len"):
        check_rollout_fits(cfg, shipped_config("Qwen/Qwen3-8B"), 16 * GIB, 16, 1024, vllm=True)


def test_rollout_estimation_checks_the_fit_before_the_model_loads(tmp_path, monkeypatch):
    from caopd.io import write_jsonl
    from caopd.stages import estimate
    from caopd.tasks.arithmetic import generate_rows

    write_jsonl(tmp_path / "train.jsonl", generate_rows(4, 0))
    monkeypatch.setattr(estimate, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    cfg = RolloutConfig(data=str(tmp_path / "train.jsonl"), k=2, engine="transformers", gpu_memory_gib=0.001)
    with pytest.raises(CaopdInputError, match="rollout-estimation needs"):
        estimate.run_rollout_estimation(cfg, tmp_path / "out", progress=False)


def test_caopd_plan_refuses_fp32_8b_on_one_80_gib_card_and_prints_the_table_when_it_fits(capsys):
    base = ["plan", "--model", "Qwen/Qwen3-8B", "--gpus", "1", "--gpu-memory-gib", "80"]
    assert main([*base, "--precision", "fp32", "--finetune", "full"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "opd-training needs" in err and "it fits with --" in err
    assert main([*base, "--precision", "bf16", "--finetune", "lora"]) == 0
    assert main([*base, "--precision", "bf16", "--finetune", "lora", "--no-activation-checkpointing"]) == 2
    out = capsys.readouterr().out
    for word in ("rollout-estimation", "training", "calibration-evaluation", "weights", "optimizer", "total"):
        assert word in out
    assert re.search(r"fits\s+yes\s+yes\s+yes", out)
    # a preset's shapes are the defaults: the paper's 1024 + 1024 tokens
    assert main(["plan", "--model", "tiny", "--gpu-memory-gib", "80", "--preset", "paper-tooluse"]) == 0
    assert "1024 + 1024 tokens" in capsys.readouterr().out


def test_the_docs_table_is_the_planners():
    text = DOCS.read_text()
    start = text.index("<!-- table: docs_table() -->") + len("<!-- table: docs_table() -->\n")
    end = text.index("<!-- end table -->")
    assert text[start:end] == docs_table()


@pytest.mark.slow  # training processes of 2 steps each (~20 s each on 2 cores)
@pytest.mark.timeout(600)
# (the stand-in in fp32 with a full fine-tune: 0.90, docs/memory.md; the benchmarks' memory case measures it too)
@pytest.mark.parametrize("shape", [{"model": "tiny", "micro_batch_size": 128},
                                   {"model": "standin", "micro_batch_size": 64, "prompts_per_step": 8,
                                    "max_new_tokens": 48, "finetune": "lora", "activation_checkpointing": True}],
                         ids=["tiny", "standin-lora-checkpointing"])
def test_the_estimate_is_within_25_percent_of_a_cpu_training_steps_peak(shape):
    from benchmarks.__main__ import run_case
    from benchmarks.cases import MEMORY_CASE_ENV

    result = run_case("training_step_memory", shape, env=MEMORY_CASE_ENV)
    ratio = result["estimated_bytes"] / result["measured_bytes"]
    # the step's memory dominates the ~20 MiB that is not the model's (the stand-in's LoRA step with checkpointing,
    # its loss in chunks of 512 of its 3,392 tokens, measures ~100 MiB)
    assert result["measured_bytes"] > 80 << 20, json.dumps(result)
    assert 0.75 <= ratio <= 1.25, json.dumps(result)
