"""Baselines in one command: every method the paper compares, from the same base model, data and rollouts.

Arms: the base model; plain OPD with the demonstration teacher (SDFT-style) and with the verified-correct-solution
teacher (SDPO-style); CaOPD in both teacher modes; and RLCR, the RL route to calibration (reward = correctness −
Brier). Every step is a stage function; the rollouts of the base model are estimated once and shared, each arm's
targets and training are its own, and one evaluation scores all of them on the in-domain prompts and, when kinds
are held out, on the out-of-distribution ones — with bootstrap intervals — into the paper-style table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from caopd.config.experiments import ARMS, CompareConfig
from caopd.config.sampling import SamplingConfig
from caopd.config.stages import EVAL, MODEL_DIR, OOD, TRAIN, EvaluateConfig
from caopd.config.training import total_steps
from caopd.evaluation.metrics import METRIC_KEYS
from caopd.evaluation.plots import plot_compare
from caopd.evaluation.tables import by_kind_table, markdown_table
from caopd.experiments.chain import estimate_rollouts, replace_targets, train_on
from caopd.io import write_json, write_text
from caopd.stages.evaluate import run_evaluation
from caopd.stages.prepare import run_data_preparation
from caopd.training.objectives import objective_for

BASE_DESCRIPTION = "base model, untrained"
TABLE_KEYS = ("accuracy", "ece", "brier", "auroc", "spr", "overconfidence_gap")


def run_compare(cfg: CompareConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = out / "data"
    run_data_preparation(cfg.data_config(), data)
    train_data, rollouts = str(data / TRAIN), out / "rollouts"
    shared = cfg.train.model_copy(update={"k": cfg.k, "seed": cfg.seed})  # every arm's, but method and context
    estimate_rollouts(cfg.model, train_data, shared, rollouts, progress=progress)  # one estimation for every arm
    models, seconds, records_of = {"base": cfg.model}, {}, {}
    for arm in cfg.arms:
        method, context, _ = ARMS[arm]
        train = shared.model_copy(update={"method": method, "teacher_context": context})
        # One target replacement per (method of the records, context), made from this run's rollouts: the records an
        # arm's objective trains from (RLCR reads only their prompts and answers: plain OPD ones serve it).
        records_method = objective_for(train).targets_method
        key = (records_method, context)
        if key not in records_of:
            records_of[key] = replace_targets(cfg.model, train_data, rollouts, train,
                                              out / f"targets_{records_method}_{context}")
        summary = train_on(cfg.model, records_of[key], train, out / f"train_{arm}", progress=progress)
        models[arm], seconds[arm] = str(out / f"train_{arm}" / MODEL_DIR), summary["seconds"]
    ood = {"ood": str(data / OOD)} if cfg.ood_kinds else {}
    evaluation = run_evaluation(
        EvaluateConfig(models=models, data=str(data / EVAL), extra_data=ood,
                       sampling=SamplingConfig(n=1, max_new_tokens=cfg.train.sampling.max_new_tokens,
                                               seed=cfg.seed + 1),
                       bootstrap_resamples=cfg.bootstrap_resamples),
        out / "evaluation", progress=progress)
    sets = {"in_domain": evaluation["arms"], **{name: s["arms"] for name, s in evaluation["sets"].items()}}
    results = {set_name: {arm: {**{k: m[k] for k in (*METRIC_KEYS, "aurc")}, "intervals": m.get("intervals", {}),
                                "by_kind": m.get("by_kind", {})}
                          for arm, m in arms.items()} for set_name, arms in sets.items()}
    summary = {"config": cfg.model_dump(), "sets": results, "checks": acceptance_checks(results),
               "training_seconds": seconds, "seconds": round(time.perf_counter() - start, 1)}
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", compare_report(results, summary["checks"], cfg))
    plot_compare(results, out / "compare.png")
    return summary


def acceptance_checks(results: dict[str, dict[str, dict[str, Any]]], max_accuracy_drop: float = 0.03,
                      ) -> dict[str, dict[str, Any]]:
    """Per CaOPD arm: is its ECE below every OPD arm's on every set, and how far is its accuracy from the best OPD
    arm's in-domain (the paper's claims)? Empty when the run trained no CaOPD or no OPD arm."""
    in_domain = results["in_domain"]
    opd = [arm for arm in in_domain if arm in ARMS and ARMS[arm][0] == "opd"]
    caopd = [arm for arm in in_domain if arm in ARMS and ARMS[arm][0] == "caopd"]
    if not opd:
        return {}
    best_opd = max(in_domain[arm]["accuracy"] for arm in opd)
    checks = {}
    for arm in caopd:
        ece_below = {set_name: all(arms[arm]["ece"] < arms[o]["ece"] for o in opd)
                     for set_name, arms in results.items()}
        gap = in_domain[arm]["accuracy"] - best_opd
        checks[arm] = {"ece_below_every_opd_arm": ece_below, "accuracy_minus_best_opd": round(gap, 4),
                       "accuracy_within": gap >= -max_accuracy_drop}
    return checks


def _with_interval(metrics: dict[str, Any], key: str) -> str:
    value = metrics[key]
    if value is None or value != value:
        return "n/a"
    low_high = metrics.get("intervals", {}).get(key)
    return f"{value:.3f} ({low_high[0]:.3f}–{low_high[1]:.3f})" if low_high else f"{value:.3f}"


def paper_table(arms: dict[str, dict[str, Any]]) -> str:
    """One row per arm, the paper's metrics with their 95 % bootstrap interval in brackets."""
    rows = [[arm, ARMS[arm][2] if arm in ARMS else BASE_DESCRIPTION, *(_with_interval(metrics, k) for k in TABLE_KEYS)]
            for arm, metrics in arms.items()]
    return markdown_table(["arm", "method", *TABLE_KEYS], rows, align="ll" + "r" * len(TABLE_KEYS))


def compare_report(results: dict[str, dict[str, dict[str, Any]]], checks: dict[str, dict[str, Any]],
                   cfg: CompareConfig) -> str:
    text = ("# Baselines from one base model\n\n"
            f"Base `{cfg.model}`, {cfg.n_train} training prompts, K = {cfg.k}, "
            f"{total_steps(cfg.train, cfg.n_train)} steps of "
            f"{cfg.train.prompts_per_step} prompts, lr {cfg.train.lr:g}, seed {cfg.seed}; {cfg.n_eval} held-out "
            "prompts per set. Brackets: 95 % bootstrap intervals.\n\n")
    for set_name, arms in results.items():
        title = "In-domain" if set_name == "in_domain" else f"Out of distribution ({', '.join(cfg.ood_kinds)})"
        text += f"## {title}\n\n" + paper_table(arms) + "\n"
        if by_kind := by_kind_table(arms):
            text += "Accuracy / mean stated confidence by kind:\n\n" + by_kind + "\n"
    if checks:
        header = ["CaOPD arm", *(f"ECE below every OPD arm ({s})" for s in results), "accuracy − best OPD"]
        rows = [[arm, *("yes" if check["ece_below_every_opd_arm"][s] else "no" for s in results),
                 f"{check['accuracy_minus_best_opd']:+.3f}"] for arm, check in checks.items()]
        align = "l" * (len(results) + 1) + "r"
        text += "## The paper's claims, checked\n\n" + markdown_table(header, rows, align=align)
    return text
