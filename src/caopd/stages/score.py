"""``caopd score``: the calibration evaluation of completions a model already wrote (a served model's logs, another
system's outputs), with no model loaded: the same predictions, metrics, plots and report as the evaluation stage.

The prompts go through the task as in every stage, so the gold answers and the verifier are the task's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caopd.config.scoring import ScoreConfig
from caopd.config.stages import SUMMARY
from caopd.errors import CaopdInputError
from caopd.io import file_digest, write_json
from caopd.stages.common import prediction_row
from caopd.stages.evaluate import evaluate_arm, write_report
from caopd.tasks import get_task
from caopd.tasks.base import Example, row_id
from caopd.tasks.datasets import load_examples, load_rows

SCORE_STAGE = "score"


def completions_by_prompt(path: str, examples: Sequence[Example], data: str) -> list[tuple[str, bool | None]]:
    """Each example's (completion, finished) from the completions file, in the examples' order.

    Every prompt needs exactly one completion: a row without an id or a text, an id that is no prompt's, an id
    given twice, or a prompt with no row is an error naming the file, the row and the field.
    """
    rows = load_rows(path)
    wanted = {example.id for example in examples}
    found: dict[str, tuple[int, str, bool | None]] = {}
    for index, row in enumerate(rows):
        if row.get("id") is None:
            raise CaopdInputError("every completion needs the id of the prompt it answers", file=path, row=index,
                                  field="id")
        prompt_id = row_id(row, index)  # str(), as for the prompts: an id 3 in one file matches "3" in the other
        if prompt_id not in wanted:
            raise CaopdInputError(f"id {prompt_id!r} is not the id of any prompt in {data}", file=path, row=index,
                                  field="id")
        if prompt_id in found:
            raise CaopdInputError(f"duplicate id {prompt_id!r} (first seen in row {found[prompt_id][0]}): one "
                                  "completion per prompt", file=path, row=index, field="id")
        text = row.get("completion")
        if not isinstance(text, str):
            raise CaopdInputError(f"expected the completion's text, a string, got {type(text).__name__}", file=path,
                                  row=index, field="completion")
        finished = row.get("finished")
        found[prompt_id] = (index, text, finished if isinstance(finished, bool) else None)
    missing = [(index, e.id) for index, e in enumerate(examples) if e.id not in found]
    if missing:
        index, prompt_id = missing[0]
        more = f" (nor do {len(missing) - 1} more prompts)" if len(missing) > 1 else ""
        raise CaopdInputError(f"prompt {prompt_id!r} has no completion in {path}{more}", file=data, row=index,
                              field="id")
    return [found[e.id][1:] for e in examples]


def run_scoring(cfg: ScoreConfig, out_dir: str | Path) -> dict[str, Any]:
    """Score ``cfg.completions`` against ``cfg.data``; writes summary.json, predictions_<arm>.jsonl, report.md and
    the reliability, confidence and risk–coverage plots, as the calibration evaluation does, into ``out_dir``."""
    task = get_task(cfg.task, **cfg.prompt.task_options())
    examples = load_examples(cfg.data, task)
    texts = completions_by_prompt(cfg.completions, examples, cfg.data)
    rows = [prediction_row(task, example, text, finished=finished)
            for example, (text, finished) in zip(examples, texts)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {**evaluate_arm(rows, examples, cfg.arm, out, cfg.bootstrap_resamples, cfg.seed),
              "completions": cfg.completions}
    write_report({None: {cfg.arm: result}}, out, f"Scored completions: {cfg.arm}", bool(cfg.bootstrap_resamples),
                 main_set=f"prompts: {Path(cfg.data).name}")
    summary = {"stage": SCORE_STAGE, "config": cfg.model_dump(), "data_digest": file_digest(cfg.data),
               "completions_digest": file_digest(cfg.completions),
               "confidence_instruction": task.confidence_instruction_text, "arms": {cfg.arm: result}, "sets": {}}
    write_json(out / SUMMARY, summary)
    return summary
