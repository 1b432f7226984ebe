"""``python -m benchmarks``: every case in a process of its own, then benchmarks/results/latest.json and .md.

Figures are medians over the repeats (after a warm-up) with min and max; speed-ups are ratios of medians
measured in the same run, since absolute times on shared machines drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).with_name("results")
CASES = ("rollout", "training", "scoring", "metrics", "run", "memory", "toolshape", "toolshape_bf16", "longshape",
         "loss_memory")
# The paper-shape cases: our step and TRL's on the shape model (benchmarks/shape_model.py), each side in turn
# One measured step after the warm-up per round and side (three rounds: three steps each), so that the whole
# benchmark stays within ~25 minutes on 2 cores (a long-shape step is ~50 s a side).
SHAPE_CASES = {"toolshape": {"shape": "toolshape", "precision": "fp32", "repeats": 1},
               "toolshape_bf16": {"shape": "toolshape", "precision": "bf16", "repeats": 1},
               "longshape": {"shape": "longshape", "precision": "fp32", "repeats": 1}}
# TRL's default (activation checkpointing on) is run once beside checkpointing off, where time allows; the faster of
# the two is the baseline
TRL_DEFAULT_TOO = ("toolshape",)
# The cost model's account of each side (benchmarks/cost_model.py): ours each prompt once, TRL's a row per completion.
OURS_STRATEGY, TRL_STRATEGY = "prompt_once", "row_per_completion"
QUICK_SHAPE = {"size": "quick", "n_prompts": 1, "k": 2, "max_new_tokens": 8, "prompt_tokens": 16, "repeats": 1}
QUICK = {"rollout": {"n_prompts": 4, "k": 2, "max_new_tokens": 8, "repeats": 2},
         "training": {"n_prompts": 2, "k": 2, "max_new_tokens": 8, "repeats": 2},
         "scoring": {"shapes": [[3, 6, 2, 2], [3, 6, 4, 1]], "groups": 2, "repeats": 1},
         "metrics": {"n": 10_000, "repeats": 2},
         "run": {"args": ["--n-train", "8", "--n-eval", "8", "--k", "2", "--train.steps", "1",
                          "--train.prompts-per-step", "2"]},
         "memory": {"prompts_per_step": 2, "k": 4, "max_new_tokens": 8, "steps": 1,
                    "shapes": [{"model": "tiny", "micro_batch_size": 4}, {"model": "tiny", "micro_batch_size": 2}]},
         **{name: QUICK_SHAPE for name in SHAPE_CASES},
         "loss_memory": {"size": "quick", "prompt_tokens": 16, "k": 2, "completion_tokens": 8, "chunks": [4, 16]}}


def run_case(name: str, kwargs: dict, env: dict[str, str] | None = None) -> dict:
    """One case (``cases.NAME_case``, or ``cases.NAME``) in a fresh interpreter, so its peak memory and warm-up are
    its own; ``env``: variables to set for it."""
    code = ("import json, sys; from benchmarks import cases; "
            f"case = getattr(cases, {name + '_case'!r}, None) or getattr(cases, {name!r}); "
            "json.dump(case(**json.loads(sys.argv[1])), sys.stdout)")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], check=True, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_training(kwargs: dict, rounds: int) -> dict:
    """The project's step and TRL's (gradient checkpointing off) in turn, ``rounds`` times, each in a
    process of its own, so drift on a shared machine hits both sides; then TRL's default (checkpointing on) and
    TRL on the project's attention once each (quick: one round, no extras)."""
    raw: dict = {"ours": [], "trl": {"False": [], "True": []}, "trl_same_attention": []}
    for _ in range(rounds):
        raw["ours"].append(run_case("training", kwargs))
        raw["trl"]["False"].append(run_case("trl", kwargs))
    if rounds > 1:
        raw["trl"]["True"].append(run_case("trl", {**kwargs, "gradient_checkpointing": True}))
        attention = raw["ours"][0]["setup"]["attention"]
        raw["trl_same_attention"].append(run_case("trl", {**kwargs, "attention": attention}))
    return raw


def run_shape(name: str, kwargs: dict, rounds: int) -> dict:
    """A paper-shape case: the project's step and TRL's (checkpointing off) in turn, ``rounds`` times,
    each in a process of its own; then TRL's default (checkpointing on) once for ``TRL_DEFAULT_TOO``."""
    kwargs = {**SHAPE_CASES[name], **kwargs}
    raw: dict = {"ours": [], "trl": {"False": [], "True": []}}
    for _ in range(rounds):
        raw["ours"].append(run_case("shape_training", kwargs))
        raw["trl"]["False"].append(run_case("shape_trl", kwargs))
    if rounds > 1 and name in TRL_DEFAULT_TOO:
        raw["trl"]["True"].append(run_case("shape_trl", {**kwargs, "gradient_checkpointing": True}))
    return raw


def pooled(runs: list[dict], key: str) -> list[float]:
    return [value for run in runs for value in run[key]]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def trl_rate(runs: list[dict]) -> float:
    """TRL's trained tokens/s: its own count of loss tokens per step over the median step time."""
    return statistics.fmean(pooled(runs, "trained_tokens")) / statistics.median(pooled(runs, "step_seconds"))


def summarize_shape(raw: dict) -> dict:
    """A paper-shape case: trained tokens/s and peak RSS of each side and their ratios, and the cost model's account
    of each side's step (FLOPs executed against the nominal per-sequence work, the time predicted at the measured
    matmul peak, the speed-up it predicts)."""
    from benchmarks import cost_model

    ours = raw["ours"]
    setup = ours[0]["setup"]
    step = statistics.median(pooled(ours, "ours_seconds"))
    tokens = statistics.median(pooled(ours, "ours_trained_tokens"))
    out = {"ours_trained_tokens_per_s": tokens / step, "ours_step_seconds": spread(pooled(ours, "ours_seconds")),
           "ours_peak_rss": max(run["ours_peak_rss"] for run in ours), "rounds": len(ours), "setup": setup,
           "n_params": ours[0]["n_params"], "decoder_parameters": ours[0]["decoder_parameters"],
           "head_parameters": ours[0]["head_parameters"]}
    bf16 = setup["precision"] == "bf16"
    peak_key = "matmul_peak_gflops_bf16" if bf16 else "matmul_peak_gflops"
    peak = statistics.median(run[peak_key] for run in ours)
    bandwidth = statistics.median(run["copy_gb_per_s"] for run in ours)
    model = cost_model.model_from_config(ours[0]["model_config"], ours[0]["n_params"])
    lengths = [length for run in ours for length in run["lengths"]]  # the measured steps' own
    mean = {key: statistics.fmean(length[key] for length in lengths) for key in lengths[0]}
    ours_shape = cost_model.StepShape(groups=round(mean["groups"]), k=round(mean["k"]),
                                      prompt_tokens=mean["prompt_tokens"],
                                      teacher_prompt_tokens=mean["teacher_prompt_tokens"],
                                      completion_tokens=mean["completion_tokens"],
                                      micro_batch=setup["micro_batch_size"], dtype_bytes=2 if bf16 else 4)
    ours_cost = cost_model.summary(model, ours_shape, OURS_STRATEGY, peak * 1e9, bandwidth * 1e9,
                                   recompute_layers=setup["activation_checkpointing"])
    out.update({"matmul_peak_gflops": peak, "matmul_peak_dtype": "bf16" if bf16 else "fp32",  # the case's dtype's
                "matmul_peak_gflops_fp32": statistics.median(run["matmul_peak_gflops"] for run in ours),
                **({"matmul_peak_gflops_bf16": peak} if bf16 else {}),
                "copy_gb_per_s": bandwidth, "ours_cost": ours_cost,
                "ours_executed_fraction": ours_cost["executed_fraction"],
                "ours_peak_fraction": ours_cost["seconds_at_peak"] / step})
    measured = {gc: runs for gc, runs in raw["trl"].items() if runs}
    if not measured:
        return out
    best = max(measured, key=lambda gc: trl_rate(measured[gc]))  # the faster TRL configuration is the baseline
    runs = measured[best]
    trl_step = statistics.median(pooled(runs, "step_seconds"))
    trl_tokens = statistics.fmean(pooled(runs, "trained_tokens"))
    config = runs[0]["config"]
    # TRL's teacher sees the student's prompt; its completions are its own samples (their mean length)
    trl_shape = cost_model.StepShape(groups=ours_shape.groups, k=ours_shape.k, prompt_tokens=mean["prompt_tokens"],
                                     teacher_prompt_tokens=mean["prompt_tokens"],
                                     completion_tokens=trl_tokens / (ours_shape.groups * ours_shape.k),
                                     micro_batch=config["per_device_train_batch_size"],
                                     dtype_bytes=ours_shape.dtype_bytes)
    trl_cost = cost_model.summary(model, trl_shape, TRL_STRATEGY, peak * 1e9, bandwidth * 1e9,
                                  recompute_layers=best == "True")
    trl_rss = max(run["peak_memory_bytes"] for run in runs)
    out.update({
        "trl_trained_tokens_per_s": trl_rate(runs), "trl_step_seconds": spread(pooled(runs, "step_seconds")),
        "trl_gradient_checkpointing": best == "True", "trl_peak_rss": trl_rss,
        "speedup_vs_trl": (tokens / step) / trl_rate(runs), "peak_memory_ratio_vs_trl": out["ours_peak_rss"] / trl_rss,
        "trl_cost": trl_cost, "trl_executed_fraction": trl_cost["executed_fraction"],
        "trl_peak_fraction": trl_cost["seconds_at_peak"] / trl_step,
        # tokens/s at the matmul peak, TRL's against ours: what the FLOPs alone would make of the comparison
        "predicted_speedup_vs_trl": (trl_cost["seconds_at_peak"] / trl_tokens)
        / (ours_cost["seconds_at_peak"] / tokens),
        "trl_all": {gc: {"trained_tokens_per_s": trl_rate(r), "step_seconds": spread(pooled(r, "step_seconds")),
                         "peak_rss": max(run["peak_memory_bytes"] for run in r)} for gc, r in measured.items()}})
    return out


def summarize(raw: dict) -> dict:
    out: dict = {}
    for name in SHAPE_CASES:
        if name in raw:
            out[name] = summarize_shape(raw[name])
    if "loss_memory" in raw:
        chunks = raw["loss_memory"]["chunks"]
        out["loss_memory"] = [{key: chunk[key] for key in ("loss_chunk_tokens", "completion_tokens", "vocab_size",
                                                            "measured_bytes", "logits_estimate_bytes",
                                                            "whole_logits_bytes")}
                              | {"growth_bytes": chunk["measured_bytes"] - chunks[0]["measured_bytes"],
                                 "estimated_growth_bytes": chunk["logits_estimate_bytes"]
                                 - chunks[0]["logits_estimate_bytes"]} for chunk in chunks]
    if "rollout" in raw:
        r = raw["rollout"]
        ours, base = statistics.median(r["ours_seconds"]), statistics.median(r["generate_seconds"])
        out["rollout"] = {"ours_completions_per_s": r["completions"] / ours,
                          "generate_completions_per_s": r["completions"] / base,
                          "ours_new_tokens_per_s": r["ours_new_tokens"] / ours,
                          "generate_new_tokens_per_s": r["generate_new_tokens"] / base,
                          "speedup_vs_generate": base / ours,
                          "distinct_prefix_fraction": r["ours_distinct_prefixes"] / r["ours_new_tokens"],
                          "speedup_vs_generate_same_attention":
                              statistics.median(r["generate_same_attention_seconds"]) / ours,
                          "ours_seconds": spread(r["ours_seconds"]),
                          "generate_seconds": spread(r["generate_seconds"]), "setup": r["setup"]}
    if "training" in raw:
        t, ours = raw["training"], raw["training"]["ours"]
        step = statistics.median(pooled(ours, "ours_seconds"))
        tokens = statistics.median(pooled(ours, "ours_trained_tokens"))
        flops = ours[0]["flops_per_step"]  # every round trains the same seeded steps
        peak_gflops = statistics.median(run["matmul_peak_gflops"] for run in ours)
        useful = flops["per_sequence"]["total"] / step / 1e9
        distinct = flops["distinct"]["total"] / step / 1e9
        ours_rss = max(run["ours_peak_rss"] for run in ours)
        out["training"] = {"ours_trained_tokens_per_s": tokens / step, "ours_step_seconds":
                           spread(pooled(ours, "ours_seconds")), "ours_peak_rss": ours_rss, "flops_per_step": flops,
                           "useful_gflops": useful, "distinct_gflops": distinct, "matmul_peak_gflops": peak_gflops,
                           "cpu_peak_fraction": useful / peak_gflops,
                           "cpu_peak_fraction_distinct": distinct / peak_gflops,
                           "distinct_prefix_fraction": flops["distinct_prefix_tokens"] / flops["completion_tokens"],
                           "n_params": ours[0]["n_params"],
                           "rounds": len(ours), "setup": ours[0]["setup"]}

        measured = {gc: runs for gc, runs in t["trl"].items() if runs}
        if measured:
            best = max(measured, key=lambda gc: trl_rate(measured[gc]))  # the faster TRL configuration is the baseline
            trl_rss = max(run["peak_memory_bytes"] for run in measured[best])
            trl_step = statistics.median(pooled(measured[best], "step_seconds"))
            trl_useful = flops["per_sequence"]["total"] / trl_step / 1e9
            out["training"].update({
                "trl_trained_tokens_per_s": trl_rate(measured[best]),
                "trl_step_seconds": spread(pooled(measured[best], "step_seconds")),
                "trl_gradient_checkpointing": best == "True", "trl_peak_rss": trl_rss,
                "speedup_vs_trl": (tokens / step) / trl_rate(measured[best]),
                # the step's per-sequence FLOPs in TRL's step time (its prompts, K and lengths are the same)
                "trl_useful_gflops": trl_useful, "trl_cpu_peak_fraction": trl_useful / peak_gflops,
                "peak_memory_ratio_vs_trl": ours_rss / trl_rss,
                "trl_all": {gc: {"trained_tokens_per_s": trl_rate(runs),
                                 "step_seconds": spread(pooled(runs, "step_seconds")),
                                 "peak_rss": max(run["peak_memory_bytes"] for run in runs)}
                            for gc, runs in measured.items()}})
        if t["trl_same_attention"]:
            out["training"]["speedup_vs_trl_same_attention"] = (tokens / step) / trl_rate(t["trl_same_attention"])
    if "scoring" in raw:
        out["scoring"] = [{**{key: shape[key] for key in ("prompt", "completion", "k", "answers", "tree_chosen",
                                                          "distinct_prefix_fraction")},
                           "tree_vs_rows": statistics.median(shape["tree_seconds"]) / statistics.median(
                               shape["rows_seconds"]),
                           "auto_vs_rows": statistics.median(shape["auto_seconds"]) / statistics.median(
                               shape["rows_seconds"])} for shape in raw["scoring"]["shapes"]]
    if "metrics" in raw:
        m = raw["metrics"]
        out["metrics"] = {"seconds_1m": statistics.median(m["seconds"]) * 1_000_000 / m["n"],
                          "seconds": spread(m["seconds"]), "n": m["n"]}
    if "memory" in raw:
        out["memory"] = [{key: shape[key] for key in ("model", "micro_batch_size", "k", "measured_bytes",
                                                      "estimated_bytes")}
                         | {"estimate_vs_measured": shape["estimated_bytes"] / shape["measured_bytes"]}
                         for shape in raw["memory"]["shapes"]]
    if "run" in raw:
        out["run"] = {"seconds": statistics.median(raw["run"]["seconds"]),
                      "peak_rss_largest_task": raw["run"]["peak_rss_largest_task"], "args": raw["run"]["args"]}
    return out


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    return {"cores": os.cpu_count(), "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "versions": {p: version(p) for p in ("torch", "transformers", "trl", "caopd")}}


def markdown(result: dict) -> str:
    from caopd.evaluation.tables import markdown_table

    rows = []
    if "rollout" in result:
        r = result["rollout"]
        rows += [["rollouts (completions/s)", f"{r['ours_completions_per_s']:.0f}",
                  f"{r['generate_completions_per_s']:.0f} (`model.generate`)", f"{r['speedup_vs_generate']:.2f}×"],
                 ["… against `generate` on the project's CPU attention", "", "",
                  f"{r['speedup_vs_generate_same_attention']:.2f}×"],
                 ["… distinct prefixes per new token (computed once each)", f"{r['distinct_prefix_fraction']:.0%}",
                  "100%", ""]]
    if "training" in result:
        t = result["training"]
        trl = "speedup_vs_trl" in t
        if trl:
            rows.append(["training step (trained tokens/s)", f"{t['ours_trained_tokens_per_s']:.0f}",
                         f"{t['trl_trained_tokens_per_s']:.0f} (TRL DistillationTrainer)",
                         f"{t['speedup_vs_trl']:.2f}×"])
            if "speedup_vs_trl_same_attention" in t:
                rows.append(["… against TRL on the project's CPU attention", "", "",
                             f"{t['speedup_vs_trl_same_attention']:.2f}×"])
            rows.append(["training peak memory (MiB)", f"{t['ours_peak_rss'] / 2**20:.0f}",
                         f"{t['trl_peak_rss'] / 2**20:.0f}", f"{t['peak_memory_ratio_vs_trl']:.2f}×"])
        rows.append(["training useful GFLOP/s (every sequence's prompt + completion)", f"{t['useful_gflops']:.1f}",
                     f"{t['trl_useful_gflops']:.1f} (TRL)" if trl else "",
                     f"{t['useful_gflops'] / t['trl_useful_gflops']:.2f}×" if trl else ""])
        rows.append([f"… fraction of the fp32 matmul peak ({t['matmul_peak_gflops']:.1f} GFLOP/s)",
                     f"{t['cpu_peak_fraction']:.0%}", f"{t['trl_cpu_peak_fraction']:.0%}" if trl else "", ""])
        rows.append(["… counting each prompt and distinct prefix once (the work left to run)",
                     f"{t['cpu_peak_fraction_distinct']:.0%}", "", ""])
    for name in SHAPE_CASES:
        if name in result:
            rows += shape_rows(name, result[name])
    for chunk in result.get("loss_memory", []):
        rows.append([f"loss peak memory (MiB), chunks of {chunk['loss_chunk_tokens']} of "
                     f"{chunk['completion_tokens']} completion tokens × vocabulary {chunk['vocab_size']}",
                     f"{chunk['measured_bytes'] / 2**20:.0f} ({chunk['growth_bytes'] / 2**20:+.0f})",
                     f"+{chunk['estimated_growth_bytes'] / 2**20:.0f} (the chunk's logits, `caopd plan`)",
                     f"{chunk['growth_bytes'] / chunk['estimated_growth_bytes']:.2f}×"
                     if chunk["estimated_growth_bytes"] else ""])
    if "scoring" in result:
        worst = max(shape["auto_vs_rows"] for shape in result["scoring"])
        best = min(shape["auto_vs_rows"] for shape in result["scoring"])
        rows.append([f"scoring time against a row per completion, {len(result['scoring'])} sharing levels "
                     "(`scoring`)", f"{best:.2f}–{worst:.2f}×", "1×", ""])
    if "metrics" in result:
        rows.append(["metrics over 1 M predictions (s)", f"{result['metrics']['seconds_1m']:.3f}", "", ""])
    for shape in result.get("memory", []):
        rows.append([f"training step peak memory (MiB), {shape['model']}, K = {shape['k']}, micro-batch "
                     f"{shape['micro_batch_size']}", f"{shape['measured_bytes'] / 2**20:.0f}",
                     f"{shape['estimated_bytes'] / 2**20:.0f} (`caopd plan`'s estimate)",
                     f"{shape['estimate_vs_measured']:.2f}×"])
    if "run" in result:
        rows.append(["`caopd run` (s)", f"{result['run']['seconds']:.0f}", "", ""])
    return markdown_table(["case", "ours", "baseline", "ratio"], rows)


def shape_rows(name: str, t: dict) -> list[list[str]]:
    """A paper-shape case's rows: trained tokens/s and peak memory against TRL, the work each side executes and its
    time against the cost model's at the matmul peak."""
    s = t["setup"]
    label = f"{name} ({s['precision']}; {s['n_prompts']} × K = {s['k']}, prompt {s['prompt_tokens']}, " \
            f"≤ {s['max_new_tokens']} new)"
    trl = "speedup_vs_trl" in t
    rows = [[f"{label}: training step (trained tokens/s)", f"{t['ours_trained_tokens_per_s']:.0f}",
             f"{t['trl_trained_tokens_per_s']:.0f} (TRL DistillationTrainer)" if trl else "",
             f"{t['speedup_vs_trl']:.2f}×" if trl else ""],
            ["… peak memory (MiB)", f"{t['ours_peak_rss'] / 2**20:.0f}",
             f"{t['trl_peak_rss'] / 2**20:.0f}" if trl else "",
             f"{t['peak_memory_ratio_vs_trl']:.2f}×" if trl else ""],
            ["… FLOPs executed, of the nominal per-sequence work (cost model)", f"{t['ours_executed_fraction']:.0%}",
             f"{t['trl_executed_fraction']:.0%}" if trl else "", ""],
            [f"… step time at the {t['matmul_peak_dtype']} matmul peak ({t['matmul_peak_gflops']:.0f} GFLOP/s) "
             "against measured", f"{t['ours_cost']['seconds_at_peak']:.1f} / {t['ours_step_seconds']['median']:.1f} s",
             f"{t['trl_cost']['seconds_at_peak']:.1f} / {t['trl_step_seconds']['median']:.1f} s" if trl else "",
             f"{t['predicted_speedup_vs_trl']:.2f}× predicted" if trl else ""]]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the code runs, measures nothing")
    parser.add_argument("--out", default=str(RESULTS), help="folder for latest.json and latest.md")
    parser.add_argument("--shape-rounds", type=int, default=3,
                        help="rounds of the paper-shape cases (each side's warm-up + 1 measured step in a process of "
                        "its own per round): on 2 cores they take ~8 min with 1 round, ~22 with 3")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    started = time.perf_counter()
    raw = {}
    for name in cases:
        print(f"benchmark {name} ...", file=sys.stderr, flush=True)
        kwargs = QUICK[name] if args.quick else {}
        if name == "training":
            raw[name] = run_training(kwargs, rounds=1 if args.quick else 3)
        elif name in SHAPE_CASES:
            raw[name] = run_shape(name, kwargs, rounds=1 if args.quick else args.shape_rounds)
        else:
            raw[name] = run_case(name, kwargs)
    result = {**summarize(raw), "machine": machine(), "quick": args.quick,
              "seconds_total": time.perf_counter() - started, "raw": raw}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from caopd.io import write_json, write_text

    write_json(out / "latest.json", result)
    write_text(out / "latest.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
