"""Stage 2 — target replacement: training records with the edited completion and the teacher's context."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from caopd.config.stages import RECORDS, SUMMARY, TARGET_REPLACEMENT, TargetsConfig
from caopd.errors import CaopdInputError
from caopd.io import file_digest, read_json, read_jsonl, write_json, write_jsonl
from caopd.method.targets import choose_reference, student_target, teacher_context
from caopd.method.templates import TEMPLATES, teacher_prompt
from caopd.models.loading import model_template, resolve_model_path
from caopd.stages.sources import Found, dataset_path, model_path
from caopd.tasks import get_task
from caopd.tasks.datasets import load_examples


def rollouts_template(rollouts: str) -> str | None:
    """The teacher-context template family of the model the rollouts came from, as rollout estimation recorded it
    beside them: this CPU stage then needs no copy of a remote model to read it."""
    summary = Path(rollouts).parent / SUMMARY
    return read_json(summary).get("template") if summary.is_file() else None


def run_target_replacement(cfg: TargetsConfig, out_dir: str | Path) -> dict[str, Any]:
    task = get_task(cfg.task, **cfg.prompt.task_options())
    found: Found = {}
    examples = {e.id: e for e in load_examples(dataset_path(cfg.data, "train_data", found), task)}
    template = cfg.template or rollouts_template(cfg.rollouts) or \
        model_template(resolve_model_path(model_path(cfg.model, "model", found)))
    if template not in TEMPLATES:
        raise CaopdInputError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}", field="template")
    estimates = {}
    for i, row in enumerate(read_jsonl(cfg.estimates)):
        if not isinstance(row.get("p"), (int, float)) or not 0.0 <= row["p"] <= 1.0:
            raise CaopdInputError("p must be a number in [0, 1]", file=cfg.estimates, row=i, field="p")
        estimates[row["prompt_id"]] = float(row["p"])
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for i, row in enumerate(read_jsonl(cfg.rollouts)):
        for key in ("prompt_id", "sample", "completion", "correct"):
            if key not in row:
                raise CaopdInputError("missing field", file=cfg.rollouts, row=i, field=key)
        if row["prompt_id"] not in examples:
            raise CaopdInputError(f"prompt id {row['prompt_id']!r} is not in {cfg.data}", file=cfg.rollouts, row=i,
                                  field="prompt_id")
        by_prompt[row["prompt_id"]].append(row)
    records = []
    for prompt_id, rollouts in by_prompt.items():
        if prompt_id not in estimates:
            raise CaopdInputError(f"no estimate for prompt id {prompt_id!r}", file=cfg.estimates, field="prompt_id")
        example, p = examples[prompt_id], estimates[prompt_id]
        correct_rollout = next((r["completion"] for r in rollouts if r["correct"]), None)
        ctx = teacher_context(cfg.teacher_context, example.demonstration, correct_rollout, p, cfg.method)
        used_mode, reference = choose_reference(cfg.teacher_context, example.demonstration, correct_rollout)
        teacher = teacher_prompt(example.prompt, ctx, template)
        for r in rollouts:
            records.append({
                "prompt_id": prompt_id, "sample": r["sample"], "prompt": example.prompt, "answer": example.answer,
                "demonstration": example.demonstration, "meta": dict(example.meta), "p": p,
                "completion": r["completion"], "correct": r["correct"],
                "target_completion": student_target(r["completion"], p, cfg.method),
                "target_confidence": p if cfg.method == "caopd" else 1.0,
                "teacher_mode": used_mode, "reference": reference, "correct_rollout": correct_rollout,
                "teacher_prompt": teacher, "method": cfg.method,
            })
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / RECORDS, records)
    summary = {"stage": TARGET_REPLACEMENT.id, "config": cfg.model_dump(), "sources": found,
               "confidence_instruction": task.confidence_instruction_text, "template": template,
               "n_prompts": len(by_prompt), "n_records": len(records),
               "teacher_modes": {m: sum(r["teacher_mode"] == m for r in records) for m in ("demo", "correct_solution")},
               "mean_target_confidence": sum(r["target_confidence"] for r in records) / max(1, len(records)),
               "outputs": {RECORDS: file_digest(out / RECORDS)}}
    write_json(out / SUMMARY, summary)
    return summary
