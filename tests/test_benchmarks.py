"""The benchmark code runs end to end on tiny sizes (it measures nothing here; no timing is asserted)."""

import json

import pytest

from benchmarks.__main__ import CASES, QUICK, SHAPE_CASES, main, markdown, summarize


def test_the_in_process_cases_summarize_into_the_report_table():
    from benchmarks import cases

    raw = {"rollout": cases.rollout_case(n_prompts=2, k=2, max_new_tokens=4, repeats=1),
           "scoring": cases.scoring_case(**{**QUICK["scoring"], "groups": 1}),
           "metrics": cases.metrics_case(n=1000, repeats=1)}
    result = summarize(raw)
    assert raw["rollout"]["completions"] == 2 * 2 and result["rollout"]["speedup_vs_generate"] > 0
    assert 0 < result["rollout"]["distinct_prefix_fraction"] <= 1
    assert len(result["scoring"]) == len(QUICK["scoring"]["shapes"]) and result["metrics"]["seconds_1m"] > 0
    table = markdown(result)
    assert "rollouts (completions/s)" in table and "metrics over 1 M predictions" in table
    assert cases.distinct_prefix_tokens([[5, 6, 1], [5, 7, 1], [5, 6, 1]]) == 3  # [5], [5 6], [5 7]


def test_the_shape_model_has_the_standins_layout_a_decoder_twice_its_head_and_one_token_per_word(tmp_path):
    from benchmarks import cases, shape_model
    from caopd.method.templates import render_prompt
    from caopd.models.loading import load_model

    paper = load_model(str(shape_model.build_shape_model(tmp_path / "paper", "paper")))
    config, standin = paper.model.config, shape_model.standin_config()
    assert (config.model_type, config.tie_word_embeddings, config.rope_parameters) == (
        "qwen3", True, standin["rope_parameters"])
    assert config.num_key_value_heads < config.num_attention_heads and config.vocab_size == 32768
    decoder, head = shape_model.decoder_and_head_parameters(paper.model)
    assert decoder >= 2 * head == 2 * 32768 * config.hidden_size  # as in Qwen3 models (0.6B: ~2.8×)
    # a plain-text prompt of n random words is n ids, no special token added, and no chat template to change it
    tokenizer = paper.tokenizer
    [prompt] = shape_model.shape_prompts(1, 50, seed=3)
    assert render_prompt(tokenizer, prompt) == prompt and len(tokenizer(prompt)["input_ids"]) == 50
    assert len(tokenizer) == 32768 and tokenizer.decode(tokenizer(prompt)["input_ids"]) == prompt
    assert shape_model.shape_prompts(1, 50, seed=3) == [prompt] != shape_model.shape_prompts(1, 50, seed=4)
    assert paper.template == "paper" and config._attn_implementation == "caopd_cpu"  # load_model's CPU attention
    # seeded: the same weights every time
    again = shape_model.build_shape_model(tmp_path / "again", "paper")
    assert (again / "model.safetensors").read_bytes() == (tmp_path / "paper" / "model.safetensors").read_bytes()
    # the cases' lengths: the shape's, a tiny run's where given; --quick runs every case
    assert cases.shape_setup("longshape", {"k": None}) == {"prompt_tokens": 500, "max_new_tokens": 1000, "k": 8,
                                                           "n_prompts": 1}
    assert cases.shape_setup("toolshape", {"k": 2})["k"] == 2 and set(CASES) <= set(QUICK)
    assert set(SHAPE_CASES) == {"toolshape", "toolshape_bf16", "longshape"}


@pytest.mark.slow  # a training process per micro-batch size
def test_the_memory_case_measures_a_step_per_micro_batch_with_the_planners_estimate_beside_it():
    from benchmarks import cases

    raw = {"memory": cases.memory_case(**QUICK["memory"])}
    shapes = raw["memory"]["shapes"]
    assert [shape["micro_batch_size"] for shape in shapes] == [4, 2]
    assert all(shape["measured_bytes"] > 0 and shape["estimated_bytes"] > 0 for shape in shapes)
    # a smaller micro-batch, a smaller estimate (the completions' length is the step's own, the same for both)
    assert shapes[0]["estimated_parts"]["activations"] > shapes[1]["estimated_parts"]["activations"]
    result = summarize(raw)
    assert [row["micro_batch_size"] for row in result["memory"]] == [4, 2]
    assert "training step peak memory (MiB), tiny, K = 4, micro-batch 2" in markdown(result)


@pytest.mark.slow  # every case in a process of its own, TRL's baseline included
@pytest.mark.timeout(1200)
def test_benchmarks_run_on_a_tiny_size_and_write_the_report(tmp_path, capsys):
    # `run` (a whole `caopd run`, which the main job's test runs) and the fp32 tool shape (the bf16 one runs the same
    # code with its precision) are left out to keep CI within its time
    cases = "rollout,training,scoring,metrics,memory,toolshape_bf16,loss_memory"
    assert main(["--quick", "--cases", cases, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "latest.json").read_text())
    for key in ("rollout.speedup_vs_generate", "training.cpu_peak_fraction", "metrics.seconds_1m"):
        case, metric = key.split(".")
        assert result[case][metric] > 0, key
    assert result["machine"]["cores"] >= 1 and "torch" in result["machine"]["versions"]
    assert result["raw"]["rollout"]["completions"] == 4 * 2
    # the baseline runs transformers' default attention; the engine the one load_model picks on the CPU
    setup = result["rollout"]["setup"]
    assert (setup["attention"], setup["baseline_attention"]) == ("caopd_cpu", "sdpa")
    assert result["rollout"]["speedup_vs_generate_same_attention"] > 0
    flops = result["training"]["flops_per_step"]
    # each distinct prefix once never counts more than every sequence's prompt + completion
    assert 0 < flops["distinct"]["total"] <= flops["per_sequence"]["total"]
    assert 0 < flops["distinct_prefix_tokens"] <= flops["completion_tokens"]
    assert 0 < result["rollout"]["distinct_prefix_fraction"] <= 1
    # the TRL baseline ran too (one round, checkpointing off), in a process of its own
    assert result["training"]["speedup_vs_trl"] > 0 and result["training"]["trl_gradient_checkpointing"] is False
    assert result["raw"]["training"]["trl"]["False"][0]["config"]["attention"] == "sdpa"
    # the scoring case times both paths and the automatic choice; the all-alike groups go the tree path
    assert [shape["tree_chosen"] for shape in result["scoring"]] == [False, True]
    assert all(shape["tree_vs_rows"] > 0 and shape["auto_vs_rows"] > 0 for shape in result["scoring"])
    assert [row["micro_batch_size"] for row in result["memory"]] == [4, 2]
    # the paper-shape cases on the shape model: both sides, the same prompts, K and lengths, and the cost model
    for name in ("toolshape_bf16",):
        shape = result[name]
        assert shape["speedup_vs_trl"] > 0 and shape["peak_memory_ratio_vs_trl"] > 0, name
        assert shape["trl_gradient_checkpointing"] is False and shape["rounds"] == 1
        # 1 prompt of 16 words × K = 2 × 8 tokens: each prompt once leaves less of the nominal work than TRL's rows
        assert shape["ours_cost"]["step"]["completion_tokens"] == shape["trl_cost"]["step"]["completion_tokens"] == 8
        assert shape["ours_cost"]["step"]["prompt_tokens"] == shape["trl_cost"]["step"]["prompt_tokens"] == 16
        assert 0 < shape["ours_executed_fraction"] < shape["trl_executed_fraction"] <= 1
        assert shape["ours_cost"]["seconds_at_peak"] > 0 and shape["predicted_speedup_vs_trl"] > 1
    bf16 = result["raw"]["toolshape_bf16"]
    assert result["toolshape_bf16"]["matmul_peak_dtype"] == "bf16" and bf16["ours"][0]["matmul_peak_gflops_bf16"] > 0
    assert bf16["trl"]["False"][0]["config"]["precision"] == bf16["ours"][0]["setup"]["precision"] == "bf16"
    # the loss's memory at each chunk size, in processes of their own, beside the chunk's logits
    chunks = result["loss_memory"]
    assert [c["loss_chunk_tokens"] for c in chunks] == [4, 16] and all(c["measured_bytes"] > 0 for c in chunks)
    assert chunks[1]["estimated_growth_bytes"] == 7 * (16 - 4) * 32768 * 4
    table = (tmp_path / "latest.md").read_text()
    assert "rollouts (completions/s)" in table and "caopd plan" in table
    assert "toolshape_bf16 (bf16; 1 × K = 2, prompt 16, ≤ 8 new): training step" in table
    assert "loss peak memory (MiB), chunks of 16 of 16" in table


@pytest.mark.slow  # the FSDP mode runs torchrun
def test_the_gpu_smoke_script_skips_without_a_gpu_and_runs_its_path_on_a_tiny_model(tmp_path, capsys):
    from benchmarks import gpu_smoke

    assert gpu_smoke.main(["--out", str(tmp_path / "skipped.json")]) == 0
    assert "no GPU here" in capsys.readouterr().out and not (tmp_path / "skipped.json").exists()
    out = tmp_path / "smoke.json"
    assert gpu_smoke.main(["--size", "tiny", "--allow-cpu", "--prompts", "8", "--k", "2", "--steps", "2",
                           "--prompts-per-step", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rollout"]["samples_per_s"] > 0 and result["rollout_engine"] == "transformers"
    assert set(result["training"]) == {"lora", "fsdp"}  # the second under torchrun, as one FSDP process
    for mode in result["training"].values():
        assert mode["steps"] == 2 and mode["trained_tokens_per_s"] > 0 and mode["model_tflops_per_s"] > 0
        assert mode["settings"]["precision"] == "bf16" and mode["settings"]["activation_checkpointing"]
        assert mode["mfu"] is None  # no datasheet peak for a CPU
        assert mode["activation_checkpointing"]
    assert result["training"]["fsdp"]["sharded"] and not result["training"]["lora"]["sharded"]
    assert result["parameters"] > 0 and result["versions"]["torch"]
    # the cost model's FLOPs (tests/test_cost_model.py's hand-counted model): with LoRA the student's weight-gradient
    # matmuls drop out, the decoder's forward (7 tokens, 24 pairs) and the head at the 6 completion tokens
    from test_cost_model import MODEL, STEP

    assert gpu_smoke.step_flops(MODEL, STEP, "full") == 6936
    assert gpu_smoke.step_flops(MODEL, STEP, "lora") == 6936 - (7 * 80 + 24 * 8) - 6 * 40
    assert gpu_smoke.peak_flops("NVIDIA H200") == 989e12


def test_the_gpu_smoke_script_runs_its_vllm_path_on_a_fake_gpu(tmp_path, monkeypatch):
    """With vLLM installed and a GPU (here tests/fake_vllm.py's, whose behaviours cite vLLM 0.33's source) the
    estimation runs a standalone engine and the training a colocated one; the card's peak use is recorded."""
    from fake_vllm import FakeGPU, install, uninstall

    from benchmarks import gpu_smoke

    gpu = FakeGPU()
    install(monkeypatch, gpu)
    try:
        out = tmp_path / "smoke.json"
        assert gpu_smoke.main(["--size", "tiny", "--prompts", "4", "--k", "2", "--steps", "1",
                               "--prompts-per-step", "2", "--modes", "lora", "--out", str(out)]) == 0
    finally:
        uninstall()
    result = json.loads(out.read_text())
    lora = result["training"]["lora"]
    assert (result["rollout_engine"], lora["engine"]) == ("vllm", "vllm (colocated)")
    assert result["rollout"]["samples_per_s"] > 0 and lora["trained_tokens_per_s"] > 0
    assert result["vllm"]["rollout"]["max_num_seqs"] == 4 * 2 and result["vllm"]["training"]["max_num_seqs"] == 2 * 2
    # the standalone engine took 0.9 of the card; the colocated one only what it needs
    assert lora["peak_memory_gib"] >= 0.9 * 24 and result["vllm"]["training"]["gpu_memory_utilization"] < 0.1
    assert [what for what, *_ in gpu.events if what in ("start", "shutdown")] == ["start", "shutdown"] * 2
    assert result["device"] == "fake GPU" and gpu.engine_bytes == 0
