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
CASES = ("rollout", "training", "scoring", "metrics", "run", "memory")
QUICK = {"rollout": {"n_prompts": 4, "k": 2, "max_new_tokens": 8, "repeats": 2},
         "training": {"n_prompts": 2, "k": 2, "max_new_tokens": 8, "repeats": 2},
         "scoring": {"shapes": [[3, 6, 2, 2], [3, 6, 4, 1]], "groups": 2, "repeats": 1},
         "metrics": {"n": 10_000, "repeats": 2},
         "run": {"args": ["--n-train", "8", "--n-eval", "8", "--k", "2", "--train.steps", "1",
                          "--train.prompts-per-step", "2"]},
         "memory": {"prompts_per_step": 2, "k": 4, "max_new_tokens": 8, "steps": 1,
                    "shapes": [{"model": "tiny", "micro_batch_size": 4}, {"model": "tiny", "micro_batch_size": 2}]}}


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
    """The project's step and TRL's (gradient checkpointing off, the faster) in turn, ``rounds`` times, each in a
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


def pooled(runs: list[dict], key: str) -> list[float]:
    return [value for run in runs for value in run[key]]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(raw: dict) -> dict:
    out: dict = {}
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

        def rate(runs: list[dict]) -> float:  # trained tokens/s: TRL counts its loss tokens per step itself
            return statistics.fmean(pooled(runs, "trained_tokens")) / statistics.median(pooled(runs, "step_seconds"))

        measured = {gc: runs for gc, runs in t["trl"].items() if runs}
        if measured:
            best = max(measured, key=lambda gc: rate(measured[gc]))  # the faster TRL configuration is the baseline
            trl_rss = max(run["peak_memory_bytes"] for run in measured[best])
            trl_step = statistics.median(pooled(measured[best], "step_seconds"))
            trl_useful = flops["per_sequence"]["total"] / trl_step / 1e9
            out["training"].update({
                "trl_trained_tokens_per_s": rate(measured[best]),
                "trl_step_seconds": spread(pooled(measured[best], "step_seconds")),
                "trl_gradient_checkpointing": best == "True", "trl_peak_rss": trl_rss,
                "speedup_vs_trl": (tokens / step) / rate(measured[best]),
                # the step's per-sequence FLOPs in TRL's step time (its prompts, K and lengths are the same)
                "trl_useful_gflops": trl_useful, "trl_cpu_peak_fraction": trl_useful / peak_gflops,
                "peak_memory_ratio_vs_trl": ours_rss / trl_rss,
                "trl_all": {gc: {"trained_tokens_per_s": rate(runs),
                                 "step_seconds": spread(pooled(runs, "step_seconds")),
                                 "peak_rss": max(run["peak_memory_bytes"] for run in runs)}
                            for gc, runs in measured.items()}})
        if t["trl_same_attention"]:
            out["training"]["speedup_vs_trl_same_attention"] = (tokens / step) / rate(t["trl_same_attention"])
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the code runs, measures nothing")
    parser.add_argument("--out", default=str(RESULTS), help="folder for latest.json and latest.md")
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
