"""Stage 1 — rollout estimation: K rollouts per prompt from the base model, verified; P = correct / K."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caopd.config.engines import RunLengths
from caopd.config.memory import check_rollout_fits
from caopd.config.stages import ESTIMATES, ROLLOUT_ESTIMATION, ROLLOUTS, SUMMARY, RolloutConfig
from caopd.errors import CaopdInputError
from caopd.evaluation.metrics import calibration_metrics
from caopd.io import file_digest, read_json, read_jsonl, write_json, write_jsonl
from caopd.method.templates import render_prompt
from caopd.models.loading import (
    config_context_length,
    encode_text,
    load_model,
    load_tokenizer_and_config,
    safetensors_parameters,
)
from caopd.rollout import make_engine, wants_vllm
from caopd.stages.common import fit_to_context, gpu_memory_bytes, score_completions
from caopd.stages.sources import Found, dataset_path, model_path
from caopd.tasks import get_task
from caopd.tasks.datasets import load_examples


def shard(items: list, index: int, count: int) -> list:
    size, extra = divmod(len(items), count)
    start = index * size + min(index, extra)
    return items[start: start + size + (index < extra)]


def per_prompt_estimates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        groups[row["prompt_id"]].append(bool(row["correct"]))
    return [{"prompt_id": pid, "n": len(c), "n_correct": sum(c), "p": sum(c) / len(c)} for pid, c in groups.items()]


def run_rollout_estimation(cfg: RolloutConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """K rollouts of every prompt that fits the model's context, scored; P per prompt. With vLLM sampling (asked
    for, or ``auto`` on a GPU with vLLM) the stage reads only the model's tokenizer and config, and vLLM alone puts
    weights on the GPU; its engine is sized for these prompts and shut down before the stage returns."""
    task = get_task(cfg.task, **cfg.prompt.task_options())
    found: Found = {}
    data = dataset_path(cfg.data, "train_data", found)
    examples = shard(load_examples(data, task), cfg.shard_index, cfg.num_shards)
    source = model_path(cfg.model, "model", found)
    vllm = wants_vllm(cfg.engine)
    # The tokenizer and config first: the prompts are measured and the fit checked before any weights load.
    tokenized = load_tokenizer_and_config(source)
    sampling = cfg.sampling.model_copy(update={"n": cfg.k})
    kept, skipped = fit_to_context(examples, tokenized.tokenizer, config_context_length(tokenized.config),
                                   sampling.max_new_tokens, source=data, thinking=cfg.prompt.thinking)
    prompts = [render_prompt(tokenized.tokenizer, e.prompt, cfg.prompt.thinking) for e in kept]
    longest = max(len(encode_text(tokenized.tokenizer, p)) for p in prompts)
    gpu_bytes = gpu_memory_bytes(cfg.gpu_memory_gib)
    if gpu_bytes:  # the plan's check (caopd plan), in seconds rather than after an out-of-memory error
        check_rollout_fits(cfg, tokenized.config.to_dict(), gpu_bytes, len(prompts), longest, vllm,
                           safetensors_parameters(tokenized.path))
    loaded = tokenized if vllm else load_model(source, progress=progress)
    run = RunLengths(longest, sampling.max_new_tokens, len(prompts) * cfg.k) if vllm else None
    engine = make_engine(loaded, cfg.engine, cfg.vllm, run)
    try:
        outputs = engine.generate(prompts, sampling, progress)
    finally:
        engine.shutdown()
    rows = score_completions(task, kept, outputs)
    sizing = {"vllm": engine.sizing.summary()} if vllm else {}
    return _write_outputs(out_dir, rows, skipped, {"config": cfg.model_dump(), "data_digest": file_digest(data),
                                                   "sources": found, "template": loaded.template,
                                                   "confidence_instruction": task.confidence_instruction_text,
                                                   **sizing})


def merge_rollout_shards(shard_dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """One rollout-estimation output from the outputs of its shards (the pipeline's fan-in step)."""
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}
    templates: set[str] = set()
    for shard_dir in map(Path, shard_dirs):
        summary = read_json(shard_dir / SUMMARY)
        skipped += summary.get("skipped_ids", [])
        templates.update([summary["template"]] if summary.get("template") else [])
        for i, row in enumerate(read_jsonl(shard_dir / ROLLOUTS)):
            owner = seen.setdefault(row["prompt_id"], str(shard_dir))
            if owner != str(shard_dir):
                raise CaopdInputError(f"prompt id {row['prompt_id']!r} is also in shard {owner}",
                                      file=str(shard_dir / ROLLOUTS), row=i, field="prompt_id")
            rows.append(row)
    if not rows:
        raise CaopdInputError("no rollouts in any shard", file=", ".join(map(str, shard_dirs)))
    # Every shard ran the same model: its teacher-context template family travels on to target replacement.
    template = {"template": templates.pop()} if len(templates) == 1 else {}
    return _write_outputs(out_dir, rows, skipped, {"shards": [str(d) for d in shard_dirs], **template})


def _write_outputs(out_dir: str | Path, rows: list[dict[str, Any]], skipped: list[str],
                   provenance: dict[str, Any]) -> dict[str, Any]:
    estimates = per_prompt_estimates(rows)
    metrics = calibration_metrics([r["confidence"] for r in rows], [r["correct"] for r in rows])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / ROLLOUTS, rows)
    write_jsonl(out / ESTIMATES, estimates)
    summary = {"stage": ROLLOUT_ESTIMATION.id, **provenance, "n_prompts": len(estimates), "n_rollouts": len(rows),
               "skipped_too_long": len(skipped), "skipped_ids": skipped[:100], "base_metrics": metrics,
               "outputs": {name: file_digest(out / name) for name in (ROLLOUTS, ESTIMATES)}}
    write_json(out / SUMMARY, summary)
    return summary
