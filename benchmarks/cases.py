"""The benchmark cases. Each returns a dict of raw timings; ``benchmarks.__main__`` runs each case in a process of
its own (so peak memory is the case's own) and turns the timings into medians, ranges and ratios.

Every timed figure is taken ``repeats`` times after one warm-up of the same work.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.memory import PeakRss


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    fn()  # warm-up: allocator, thread pool, lazy imports
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def _timed_in_turn(fns: list[Callable[[], Any]], repeats: int) -> tuple[list[list[float]], list[Any]]:
    """Every side warmed up, then timed in turn (ours, baseline, ours, ...), so drift on a shared machine hits all
    alike rather than whichever side ran last. Returns each side's times and last result."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    results: list[Any] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    return times, results


def matmul_peak_gflops(size: int = 1024, repeats: int = 20, dtype: torch.dtype = torch.float32) -> float:
    """The measured matmul throughput of this machine with torch's threads (fp32 unless told): the ceiling for
    useful FLOPs."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    times, _ = _timed(lambda: torch.mm(a, b), repeats)
    return 2 * size ** 3 / min(times) / 1e9


def _prompts(n: int, seed: int = 0) -> tuple[Any, list[str], list[Any]]:
    from caopd.method.templates import render_prompt
    from caopd.models.loading import load_model
    from caopd.tasks import get_task
    from caopd.tasks.arithmetic import generate_rows

    loaded = load_model("tiny")
    task = get_task("arithmetic")
    examples = [task.example_from_row(row, i) for i, row in enumerate(generate_rows(n, seed))]
    return loaded, [render_prompt(loaded.tokenizer, e.prompt) for e in examples], examples


# --- 1. rollouts --------------------------------------------------------------------------------------
def rollout_case(n_prompts: int = 64, k: int = 8, max_new_tokens: int = 24, repeats: int = 9) -> dict[str, Any]:
    """The project's engine against plain batched ``model.generate`` on the same prompts, K and sampling.

    The baseline model is the same weights with transformers' default attention (SDPA), as a user of ``generate``
    gets; ``generate`` on the project's model (its CPU attention) is timed too, to show the engine's own share."""
    from caopd.config.sampling import SamplingConfig
    from caopd.models.loading import encode_text
    from caopd.rollout.transformers_engine import TransformersEngine

    loaded, prompts, _ = _prompts(n_prompts)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    stock = copy.deepcopy(model)
    stock.set_attn_implementation("sdpa")
    sampling = SamplingConfig(n=k, temperature=1.0, max_new_tokens=max_new_tokens, seed=0)
    engine = TransformersEngine(model, tokenizer, max_batch_prompts=n_prompts)  # one batch, as generate gets

    encoded = [encode_text(tokenizer, p) for p in prompts]
    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])  # left padding
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(ids) for ids in encoded])[:, None]).long()

    @torch.no_grad()
    def plain_generate(on: Any):
        torch.manual_seed(0)
        return on.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                           top_k=0, num_return_sequences=k, max_new_tokens=max_new_tokens, use_cache=True,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)

    (ours_times, base_times, same_attention_times), (ours, generated, _) = _timed_in_turn(
        [lambda: engine.generate(prompts, sampling), lambda: plain_generate(stock), lambda: plain_generate(model)],
        repeats)
    ours_tokens = sum(len(c.token_ids) for group in ours for c in group)
    # distinct prefixes among the new tokens (the engine computes each once): how much of the speed-up comes from this
    # workload's samples coinciding
    eos = tokenizer.eos_token_id  # every prefix of a sample's tokens is a proper prefix of them + EOS (a finished
    # sample's tokens end with theirs)
    distinct = sum(distinct_prefix_tokens([c.token_ids if c.finished else c.token_ids + [eos] for c in group])
                   for group in ours)
    new = generated[:, width:]
    # A row's new tokens end at its EOS (inclusive); generate pads the rest.
    is_eos = (new == tokenizer.eos_token_id).int()
    ended = is_eos.cumsum(-1) - is_eos > 0
    base_tokens = int((~ended).sum())
    completions = n_prompts * k
    return {"completions": completions, "ours_seconds": ours_times, "ours_new_tokens": ours_tokens,
            "ours_distinct_prefixes": distinct,
            "generate_seconds": base_times, "generate_new_tokens": base_tokens,
            "generate_same_attention_seconds": same_attention_times,
            "setup": {"n_prompts": n_prompts, "k": k, "max_new_tokens": max_new_tokens, "model": "tiny",
                      "attention": model.config._attn_implementation, "baseline_attention": "sdpa"}}


# --- 2. distillation training ------------------------------------------------------------------------
def distinct_prefix_tokens(completions: list[list[int]]) -> int:
    """How many forward positions a group's completions need when each distinct prefix is computed once (the nodes
    of its prefix tree: all but the last token of each completion, shared where completions start alike)."""
    from caopd.models.batching import prefix_tree

    return len(prefix_tree(completions).tokens)


def flops_per_step(n_params: int, groups: list[Any]) -> dict[str, Any]:
    """FLOPs of one step by the 2·N·tokens rule (sampling 2N, the teacher's forward 2N under its longer privileged
    prompt, the student's forward + backward 6N), counted two ways:

    ``per_sequence`` — every sequence's prompt + completion: the step's nominal work, what a step that gives each
    sample a row of its own runs (TRL's; the issue's ~33 % of peak for TRL counts this way). Computing a shared
    prompt or prefix once does this work in less time.
    ``distinct`` — each prompt once per group and each distinct completion prefix once: what must be computed,
    so its rate is how well the hardware runs the work that is left.
    """
    prompts = sum(len(g.prompt_ids) for g in groups)
    teacher_prompts = sum(len(g.teacher_prompt_ids) for g in groups)
    completions = sum(len(ids) for g in groups for ids in g.completion_ids)
    distinct = sum(distinct_prefix_tokens(g.completion_ids) for g in groups)
    sequence_prompts = sum(len(g.completion_ids) * len(g.prompt_ids) for g in groups)
    sequence_teacher_prompts = sum(len(g.completion_ids) * len(g.teacher_prompt_ids) for g in groups)

    def parts(student_prompts: int, teacher: int, completion: int) -> dict[str, int]:
        counted = {"sampling": 2 * n_params * (student_prompts + completion),
                   "teacher_forward": 2 * n_params * (teacher + completion),
                   "student_forward_backward": 6 * n_params * (student_prompts + completion)}
        return {**counted, "total": sum(counted.values())}

    return {"per_sequence": parts(sequence_prompts, sequence_teacher_prompts, completions),
            "distinct": parts(prompts, teacher_prompts, distinct),
            "prompt_tokens": prompts, "teacher_prompt_tokens": teacher_prompts, "completion_tokens": completions,
            "distinct_prefix_tokens": distinct}


def mean_counts(counts: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each (nested) count over the steps, in whole units."""
    return {key: mean_counts([c[key] for c in counts]) if isinstance(value, dict)
            else sum(c[key] for c in counts) // len(counts) for key, value in counts[0].items()}


def training_case(n_prompts: int = 32, k: int = 8, max_new_tokens: int = 24, repeats: int = 5) -> dict[str, Any]:
    """One OPD/CaOPD step of the project (sampling, teacher scoring, loss, backward, optimizer) on the tiny model;
    ``trl_case`` is the baseline, run by ``benchmarks.__main__`` in turn with this one, each in a process of its
    own (so each side's peak memory is its own)."""
    from caopd.config.sampling import SamplingConfig
    from caopd.config.training import TrainConfig
    from caopd.rollout.transformers_engine import TransformersEngine
    from caopd.tasks import get_task
    from caopd.training.objectives import TrainItem
    from caopd.training.teachers import Teacher
    from caopd.training.trainer import Trainer

    loaded, _, examples = _prompts(n_prompts * (repeats + 1))
    # The default micro-batch (64 sequences), which is also TRL's per-device batch in the baseline.
    cfg = TrainConfig(method="caopd", steps=repeats + 1, prompts_per_step=n_prompts, k=k, warmup_steps=0,
                      sampling=SamplingConfig(max_new_tokens=max_new_tokens))
    items = [TrainItem(e, 0.5, None) for e in examples]
    student = loaded.model
    teacher = Teacher("frozen", copy.deepcopy(student), cfg.ema_rate, None)

    class RecordingTrainer(Trainer):  # keeps each step's scored groups, to count the step's FLOPs
        def loss_and_backward(self, groups):
            steps_groups.append(groups)
            return super().loss_and_backward(groups)

    steps_groups: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as out:
        trainer = RecordingTrainer(cfg, student, loaded.tokenizer, loaded.template, get_task("arithmetic"), items,
                                   TransformersEngine(student, loaded.tokenizer), teacher, Path(out), progress=False)
        records, step_times = [], []
        with PeakRss() as memory:
            for step in range(repeats + 1):
                start = time.perf_counter()
                records.append(trainer.train_step(step))
                step_times.append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in student.parameters())
    trained = [r["trained_tokens"] for r in records[1:]]
    measured = [flops_per_step(n_params, groups) for groups in steps_groups[1:]]
    flops = mean_counts(measured)
    return {"ours_seconds": step_times[1:], "ours_trained_tokens": trained, "ours_peak_rss": memory.peak,
            "n_params": n_params, "flops_per_step": flops, "matmul_peak_gflops": matmul_peak_gflops(),
            "setup": {"n_prompts": n_prompts, "k": k, "max_new_tokens": max_new_tokens, "model": "tiny",
                      "attention": student.config._attn_implementation}}


def trl_case(n_prompts: int = 32, k: int = 8, max_new_tokens: int = 24, repeats: int = 5,
             gradient_checkpointing: bool = False, attention: str = "sdpa") -> dict[str, Any]:
    """``trl.DistillationTrainer`` on the same model, prompts × K and completion length (``trl_baseline.py``)."""
    from benchmarks.trl_baseline import measure_trl_steps

    return measure_trl_steps(n_prompts=n_prompts, k=k, max_new_tokens=max_new_tokens, steps=repeats + 1,
                             gradient_checkpointing=gradient_checkpointing, attention=attention)


# --- 2b. the paper's shapes: the shape model, our step against TRL's, fp32 and bf16 ------------------------------
# Prompts of ~1,000 tokens and completions of up to 250 (the tool-use task, ToolAlpaca's long tool documentation) and
# completions of up to 1,000 after ~500-token prompts (the official limits: max completion 1024); K = 8 as the paper.
# One prompt per step keeps a run of the three cases within minutes on 2 cores (benchmarks/README.md).
SHAPES = {"toolshape": {"prompt_tokens": 1000, "max_new_tokens": 250, "k": 8, "n_prompts": 1},
          "longshape": {"prompt_tokens": 500, "max_new_tokens": 1000, "k": 8, "n_prompts": 1}}


def shape_setup(shape: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A shape's lengths (``SHAPES``) with the given ones replacing them (--quick's tiny sizes)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    return {**SHAPES[shape], **{key: value for key, value in overrides.items() if value is not None}}


def machine_peaks(precision: str) -> dict[str, float]:
    """The matmul peaks (fp32, and bf16 for a bf16 case: a 1024² ``torch.mm`` in bfloat16) and the memory bandwidth
    (a 256 MiB copy) the cost model's predictions use."""
    peaks = {"matmul_peak_gflops": matmul_peak_gflops(), "copy_gb_per_s": copy_bandwidth_gb()}
    if precision == "bf16":
        peaks["matmul_peak_gflops_bf16"] = matmul_peak_gflops(dtype=torch.bfloat16)
    return peaks


def copy_bandwidth_gb(mib: int = 256, repeats: int = 5) -> float:
    """Bytes moved per second by a large tensor copy (read + write), GB/s."""
    source = torch.ones(mib * 2**20 // 4)
    target = torch.empty_like(source)
    times, _ = _timed(lambda: target.copy_(source), repeats)
    return 2 * source.numel() * 4 / min(times) / 1e9


def shape_training_case(shape: str = "toolshape", precision: str = "fp32", size: str = "paper",
                        n_prompts: int | None = None, k: int | None = None, prompt_tokens: int | None = None,
                        max_new_tokens: int | None = None, repeats: int = 2,
                        activation_checkpointing: bool = False, seed: int = 0) -> dict[str, Any]:
    """One OPD step of the project at a paper shape on the shape model (``benchmarks.shape_model``), as
    ``training_case`` builds it: ``Trainer.train_step`` with a frozen teacher copy (bfloat16 under bf16, as the
    training stage stores it), ``TransformersEngine`` sampling at temperature 1 (top-k/top-p off), forward KL, the
    ``TrainConfig`` defaults otherwise. Activation checkpointing: off unless asked (``TrainConfig`` defaults it on for
    the training stage, which applies it; TRL runs with it off, and once with it on at the tool shape). ``repeats``
    measured steps after a warm-up step; ``shape_trl_case`` is the other side, each in a process of its own."""
    from benchmarks.shape_model import build_shape_model, decoder_and_head_parameters, shape_prompts
    from caopd.config.sampling import SamplingConfig
    from caopd.config.training import TrainConfig
    from caopd.models.compat import enable_activation_checkpointing
    from caopd.models.loading import load_model
    from caopd.models.precision import compute_dtype
    from caopd.rollout.transformers_engine import TransformersEngine
    from caopd.tasks import get_task
    from caopd.training.objectives import TrainItem
    from caopd.training.teachers import Teacher
    from caopd.training.trainer import Trainer

    setup = shape_setup(shape, {"n_prompts": n_prompts, "k": k, "prompt_tokens": prompt_tokens,
                                "max_new_tokens": max_new_tokens})
    steps = repeats + 1
    task = get_task("arithmetic")  # verifies nothing here (random words): every sample is wrong, P = 0
    prompts = shape_prompts(setup["n_prompts"] * steps, setup["prompt_tokens"], seed)
    items = [TrainItem(task.example_from_row({"prompt": text, "answer": 0}, i), 0.5, None)
             for i, text in enumerate(prompts)]
    cfg = TrainConfig(method="opd", teacher="frozen", steps=steps, prompts_per_step=setup["n_prompts"],
                      k=setup["k"], warmup_steps=0, precision=precision,
                      activation_checkpointing=activation_checkpointing,
                      sampling=SamplingConfig(max_new_tokens=setup["max_new_tokens"]))
    with tempfile.TemporaryDirectory() as folder:
        built = time.perf_counter()
        loaded = load_model(str(build_shape_model(Path(folder) / "model", size, seed)))
        build_seconds = time.perf_counter() - built
    student = loaded.model
    teacher = Teacher("frozen", student, cfg.ema_rate, None, frozen_dtype=compute_dtype(precision))
    if activation_checkpointing:
        enable_activation_checkpointing(student)

    class RecordingTrainer(Trainer):  # keeps each step's groups: their lengths feed the cost model
        def loss_and_backward(self, groups):
            steps_groups.append(groups)
            return super().loss_and_backward(groups)

    steps_groups: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as out:
        trainer = RecordingTrainer(cfg, student, loaded.tokenizer, loaded.template, task, items,
                                   TransformersEngine(student, loaded.tokenizer), teacher, Path(out), progress=False)
        records, step_times = [], []
        memory = PeakRss()
        for step in range(steps):
            if step == 1:
                memory.start()  # the measured steps' peak, as TRL's side measures it
            start = time.perf_counter()
            records.append(trainer.train_step(step))
            step_times.append(time.perf_counter() - start)
        memory.stop()
    decoder, head = decoder_and_head_parameters(student)
    return {"ours_seconds": step_times[1:], "warmup_seconds": step_times[0],
            "ours_trained_tokens": [r["trained_tokens"] for r in records[1:]], "ours_peak_rss": memory.peak,
            "lengths": [group_lengths(groups) for groups in steps_groups[1:]],
            "model_config": student.config.to_dict(), "n_params": sum(p.numel() for p in student.parameters()),
            "decoder_parameters": decoder, "head_parameters": head, "build_seconds": build_seconds,
            **machine_peaks(precision),
            "setup": {"shape": shape, "precision": precision, "size": size, **setup, "method": "opd",
                      "teacher": "frozen", "micro_batch_size": cfg.micro_batch_size,
                      "activation_checkpointing": activation_checkpointing,
                      "loss_chunk_tokens": cfg.loss_chunk_tokens,
                      "attention": student.config._attn_implementation}}


def group_lengths(groups: list[Any]) -> dict[str, float]:
    """A step's mean prompt, teacher prompt and completion lengths (tokens), and its groups and K: the cost model's
    step shape."""
    completions = [len(ids) for g in groups for ids in g.completion_ids]
    return {"groups": len(groups), "k": len(groups[0].completion_ids),
            "prompt_tokens": sum(len(g.prompt_ids) for g in groups) / len(groups),
            "teacher_prompt_tokens": sum(len(g.teacher_prompt_ids) for g in groups) / len(groups),
            "completion_tokens": sum(completions) / len(completions)}


def shape_trl_case(shape: str = "toolshape", precision: str = "fp32", size: str = "paper",
                   n_prompts: int | None = None, k: int | None = None, prompt_tokens: int | None = None,
                   max_new_tokens: int | None = None, repeats: int = 2, gradient_checkpointing: bool = False,
                   seed: int = 0) -> dict[str, Any]:
    """``trl.DistillationTrainer`` on the same shape model, prompts, K and lengths (``trl_baseline.py``)."""
    from benchmarks.shape_model import build_shape_model, shape_prompts
    from benchmarks.trl_baseline import measure_trl_steps

    setup = shape_setup(shape, {"n_prompts": n_prompts, "k": k, "prompt_tokens": prompt_tokens,
                                "max_new_tokens": max_new_tokens})
    steps = repeats + 1
    with tempfile.TemporaryDirectory() as folder:
        model = build_shape_model(Path(folder) / "model", size, seed)
        result = measure_trl_steps(n_prompts=setup["n_prompts"], k=setup["k"], max_new_tokens=setup["max_new_tokens"],
                                   steps=steps, gradient_checkpointing=gradient_checkpointing, seed=seed,
                                   model=str(model), prompts=shape_prompts(setup["n_prompts"] * steps,
                                                                           setup["prompt_tokens"], seed),
                                   precision=precision)
    return {**result, **machine_peaks(precision),
            "setup": {"shape": shape, "precision": precision, "size": size, **setup,
                      "gradient_checkpointing": gradient_checkpointing}}


# --- 2c. the loss's memory: a chunk's logits, not the micro-batch's -------------------------------------------------
LOSS_CHUNKS = (64, 512, 2048)  # 2048: the tool shape's whole micro-batch (8 × 250 = 2000 completion tokens) at once


def loss_chunk_memory(loss_chunk_tokens: int = 512, size: str = "paper", prompt_tokens: int = 1000, k: int = 8,
                      completion_tokens: int = 250, seed: int = 0) -> dict[str, Any]:
    """Peak RSS of one micro-batch's loss forward + backward (``DistillationObjective.loss_and_backward``: both
    models' scoring forwards, the chunked loss, the student's backward) on the shape model at
    ``TrainConfig(loss_chunk_tokens=...)``: one prompt of ``prompt_tokens`` random words and ``k`` random completions
    of ``completion_tokens``, a frozen teacher. Measured above the RSS after the models are loaded, in a process of
    its own (``loss_memory_case``), beside the planner's count of the loss's logits (``LOGIT_COPIES`` fp32
    [chunk × vocab] tensors)."""
    import random

    import transformers.models.qwen3.modeling_qwen3  # noqa: F401  (imported before the baseline is read)

    from benchmarks.memory import rss_bytes
    from benchmarks.shape_model import SPECIALS, build_shape_model
    from caopd.config.memory import LOGIT_COPIES
    from caopd.config.training import TrainConfig
    from caopd.models.distributed import World
    from caopd.models.loading import load_model
    from caopd.training.objectives import PromptGroup, StepContext, objective_for
    from caopd.training.teachers import Teacher

    with tempfile.TemporaryDirectory() as folder:
        loaded = load_model(str(build_shape_model(Path(folder) / "model", size, seed)))
    student = loaded.model.train()
    teacher = Teacher("frozen", student)
    vocab = student.config.vocab_size
    rng = random.Random(seed)

    def words(n: int) -> list[int]:
        return [rng.randrange(len(SPECIALS), vocab) for _ in range(n)]

    prompt = words(prompt_tokens)
    group = PromptGroup(prompt, prompt, [words(completion_tokens) for _ in range(k)],
                        [[False] * completion_tokens for _ in range(k)])
    cfg = TrainConfig(method="opd", prompts_per_step=1, k=k, loss_chunk_tokens=loss_chunk_tokens)
    context = StepContext(student, teacher, loaded.tokenizer, loaded.template, World())
    before = rss_bytes()
    start = time.perf_counter()
    with PeakRss() as memory:
        objective_for(cfg).loss_and_backward([group], context)
    tokens = k * completion_tokens
    return {"loss_chunk_tokens": loss_chunk_tokens, "completion_tokens": tokens, "vocab_size": vocab,
            "prompt_tokens": prompt_tokens, "k": k, "measured_bytes": memory.peak - before,
            "seconds": time.perf_counter() - start,
            "logits_estimate_bytes": LOGIT_COPIES * min(loss_chunk_tokens, tokens) * vocab * 4,
            "whole_logits_bytes": LOGIT_COPIES * tokens * vocab * 4, "size": size}


def loss_memory_case(chunks: tuple[int, ...] = LOSS_CHUNKS, **common: Any) -> dict[str, Any]:
    """``loss_chunk_memory`` at each chunk size, each in a process of its own, RSS following the memory in use
    (``MEMORY_CASE_ENV``): the loss's peak grows with the chunk, not with the micro-batch's tokens × vocabulary."""
    from benchmarks.__main__ import run_case

    return {"chunks": [run_case("loss_chunk_memory", {**common, "loss_chunk_tokens": chunk}, env=MEMORY_CASE_ENV)
                       for chunk in chunks]}


# --- 3. scoring: the prefix-tree path against a row per completion, from no sharing to much ----------------------
SHARING_SHAPES = ((5, 20, 8, 8), (5, 20, 8, 2), (30, 60, 8, 8), (30, 60, 8, 4), (30, 60, 8, 2), (5, 60, 16, 16))


def scoring_case(shapes: tuple[tuple[int, int, int, int], ...] = SHARING_SHAPES, groups: int = 8,
                 repeats: int = 5) -> dict[str, Any]:
    """The student's scoring forward + backward (``completion_logits``) on synthetic groups — prompt length,
    completion length, K, distinct answers among the K — by the tree path, a row per completion, and the automatic
    choice between them (``batching.tree_pays``), in turn. Random tokens, so completions share nothing beyond coinciding
    answers: where the tree path does not pay, the automatic choice must not lose."""
    import random

    from caopd.models import batching
    from caopd.models.loading import load_model

    model = load_model("tiny").model.train()
    rng = random.Random(0)
    results = []
    for prompt_len, completion_len, k, answers in shapes:
        prompts = [[rng.randrange(3, 54) for _ in range(prompt_len)] for _ in range(groups)]
        completions = []
        for _ in prompts:
            choices = [[rng.randrange(3, 54) for _ in range(completion_len)] for _ in range(answers)]
            completions.append([list(rng.choice(choices)) for _ in range(k)])

        def score(margin: float | None, prompts=prompts, completions=completions) -> None:
            saved = batching.TREE_COST_MARGIN
            if margin is not None:
                batching.TREE_COST_MARGIN = margin
            try:
                batching.completion_logits(model, prompts, completions, 0).logsumexp(-1).sum().backward()
            finally:
                batching.TREE_COST_MARGIN = saved

        (tree, rows, auto), _ = _timed_in_turn([lambda: score(float("inf")), lambda: score(0.0),
                                                 lambda: score(None)], repeats)
        trees = [batching.prefix_tree(group) for group in completions]
        results.append({"prompt": prompt_len, "completion": completion_len, "k": k, "answers": answers,
                        "distinct_prefix_fraction": sum(len(t.tokens) for t in trees) / sum(
                            len(ids) - 1 for group in completions for ids in group),
                        "tree_chosen": batching.tree_pays(prompts, completions, trees, model.config.hidden_size),
                        "tree_seconds": tree, "rows_seconds": rows, "auto_seconds": auto})
    return {"shapes": results, "groups": groups}


# --- 4. metrics ----------------------------------------------------------------------------------------
def metrics_case(n: int = 1_000_000, repeats: int = 5) -> dict[str, Any]:
    from caopd.evaluation.metrics import calibration_metrics

    rng = torch.Generator().manual_seed(0)
    confidence = torch.rand(n, generator=rng, dtype=torch.float64).numpy()
    correct = torch.rand(n, generator=rng, dtype=torch.float64).numpy() < confidence
    confidence[::97] = float("nan")  # some missing confidences, as real predictions have
    times, _ = _timed(lambda: calibration_metrics(confidence, correct), repeats)
    return {"seconds": times, "n": n}


# --- 5. the whole run -------------------------------------------------------------------------------------
def run_case(args: tuple[str, ...] = ()) -> dict[str, Any]:
    """``caopd run`` once on the defaults (a warm-up and five more 2-minute runs would not fit in the benchmark's
    15 minutes)."""
    import resource
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "caopd.cli", "run", "--out", out, "--quiet", *args], check=True)
        seconds = time.perf_counter() - start
    # ru_maxrss of children: the largest single task process (KiB on Linux).
    return {"seconds": [seconds], "peak_rss_largest_task": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            * 1024, "args": list(args)}


# --- 6. memory: a training step's peak against the planner's estimate, by micro-batch size ------------------------
# glibc keeps freed blocks of a size it has freed before in its heap (its mmap threshold rises to them), so a
# process's RSS would stay at its high-water mark of garbage; a fixed threshold returns every large block to the
# system on free, and RSS follows the memory in use. run_case sets it for this case's processes.
MEMORY_CASE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def training_step_memory(model: str = "tiny", micro_batch_size: int = 8, prompts_per_step: int = 16, k: int = 8,
                         max_new_tokens: int = 24, steps: int = 2, precision: str = "fp32", finetune: str = "full",
                         activation_checkpointing: bool = False) -> dict[str, Any]:
    """Peak RSS of ``steps`` training steps as stages/train.py builds them (a ``Trainer`` with a frozen teacher and
    ``make_training_engine``'s transformers engine; sampling included) above the RSS before the model loads, beside
    ``caopd.config.memory.training_memory`` at the steps' own longest prompt and completion (the planner's
    ``max_prompt_tokens`` and ``max_new_tokens``), with the CPU's eager attention and no CUDA overhead.

    The scoring forward takes the per-row path a GPU takes (``tree_forward`` runs on CPU parameters only; the
    prefix-tree packing would make memory a function of how much the samples coincide)."""
    import transformers.models.qwen3.modeling_qwen3  # noqa: F401  (imported before the baseline is read)

    from benchmarks.memory import rss_bytes
    from caopd.config.memory import PlanModel, TrainPlan, training_memory
    from caopd.config.sampling import SamplingConfig
    from caopd.config.training import TrainConfig
    from caopd.models import batching
    from caopd.models.compat import enable_activation_checkpointing
    from caopd.models.loading import load_model
    from caopd.models.lora import add_adapters
    from caopd.models.precision import compute_dtype
    from caopd.rollout import make_training_engine
    from caopd.tasks import get_task
    from caopd.tasks.arithmetic import generate_rows
    from caopd.training.objectives import TrainItem
    from caopd.training.teachers import Teacher
    from caopd.training.trainer import Trainer

    batching.TREE_COST_MARGIN = 0.0  # the per-row path, as on a GPU
    task = get_task("arithmetic")
    items = [TrainItem(task.example_from_row(row, i), 0.5, None)
             for i, row in enumerate(generate_rows(prompts_per_step * steps, 0))]
    cfg = TrainConfig(method="caopd", steps=steps, prompts_per_step=prompts_per_step, k=k, warmup_steps=0,
                      micro_batch_size=micro_batch_size, sampling=SamplingConfig(max_new_tokens=max_new_tokens),
                      precision=precision, finetune=finetune, activation_checkpointing=activation_checkpointing)
    scored: list[Any] = []
    before = rss_bytes()
    with PeakRss() as memory, tempfile.TemporaryDirectory() as out:
        # as stages/train.py builds the student and its teacher
        loaded = load_model(model, dtype=compute_dtype(precision) if finetune == "lora" else torch.float32)
        adapters = add_adapters(loaded.model, cfg.lora) if finetune == "lora" else None
        teacher = Teacher("frozen", loaded.model, cfg.ema_rate, None, adapters=adapters,
                          frozen_dtype=compute_dtype(precision))
        if activation_checkpointing:
            enable_activation_checkpointing(loaded.model)
        trainer = Trainer(cfg, loaded.model, loaded.tokenizer, loaded.template, task, items, None, teacher, Path(out),
                          progress=False)
        trainer.engine = make_training_engine(loaded, "transformers")
        loss_and_backward = trainer.loss_and_backward
        trainer.loss_and_backward = lambda groups: (scored.extend(groups), loss_and_backward(groups))[1]
        for step in range(steps):
            trainer.train_step(step)
    prompt = max(len(group.prompt_ids) for group in scored)
    completion = max(len(ids) for group in scored for ids in group.completion_ids)
    parameters = sum(p.numel() for p in loaded.model.parameters())
    plan = TrainPlan(k=k, prompts_per_step=prompts_per_step, micro_batch_size=micro_batch_size,
                     max_prompt_tokens=prompt, max_new_tokens=completion, attention="eager", overhead_bytes=0,
                     precision=precision, finetune=finetune, lora_r=cfg.lora.r,
                     activation_checkpointing=activation_checkpointing)
    estimate = training_memory(PlanModel.from_config(loaded.model.config.to_dict(), parameters), plan)
    return {"model": model, "micro_batch_size": micro_batch_size, "k": k, "prompts_per_step": prompts_per_step,
            "precision": precision, "finetune": finetune, "activation_checkpointing": activation_checkpointing,
            "measured_bytes": memory.peak - before, "estimated_bytes": estimate.total,
            "estimated_parts": estimate.parts, "longest_prompt": prompt, "longest_completion": completion}


# The stand-in (Qwen3's layout; its vocabulary makes the loss's logits count), 8 prompts × K = 8 completions of up to
# 48 tokens a step: micro-batches of 64 (the whole step), 16 (two groups), 4 (each group split in two).
MEMORY_SHAPES = tuple({"model": "standin", "prompts_per_step": 8, "max_new_tokens": 48, "micro_batch_size": size}
                      for size in (64, 16, 4))


def memory_case(shapes: tuple[dict[str, Any], ...] = MEMORY_SHAPES, **common: Any) -> dict[str, Any]:
    """``training_step_memory`` for each shape, each in a process of its own (peak RSS is the process's): K = 8
    completions per prompt in micro-batches of 64, 16 and 4 — the step's memory bounded by the setting."""
    from benchmarks.__main__ import run_case

    return {"shapes": [run_case("training_step_memory", {**common, **shape}, env=MEMORY_CASE_ENV)
                       for shape in shapes]}
