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
CASES = ("rollout", "training", "metrics", "run")
QUICK = {"rollout": {"n_prompts": 4, "k": 2, "max_new_tokens": 8, "repeats": 2},
         "training": {"n_prompts": 2, "k": 2, "max_new_tokens": 8, "repeats": 2, "with_trl": False},
         "metrics": {"n": 10_000, "repeats": 2},
         "run": {"args": ["--n-train", "8", "--n-eval", "8", "--k", "2", "--train.steps", "1",
                          "--train.prompts-per-step", "2"]}}


def run_case(name: str, kwargs: dict) -> dict:
    """One case in a fresh interpreter, so its peak memory and warm-up are its own."""
    code = ("import json, sys; from benchmarks.cases import {0}_case as case; "
            "json.dump(case(**json.loads(sys.argv[1])), sys.stdout)").format(name)
    done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], check=True, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


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
                          "speedup_vs_generate_same_attention":
                              statistics.median(r["generate_same_attention_seconds"]) / ours,
                          "ours_seconds": spread(r["ours_seconds"]),
                          "generate_seconds": spread(r["generate_seconds"]), "setup": r["setup"]}
    if "training" in raw:
        t = raw["training"]
        step = statistics.median(t["ours_seconds"])
        tokens = statistics.median(t["ours_trained_tokens"])
        useful = t["flops_per_step"]["total"] / step / 1e9
        out["training"] = {"ours_trained_tokens_per_s": tokens / step, "ours_step_seconds": spread(t["ours_seconds"]),
                           "ours_peak_rss": t["ours_peak_rss"], "flops_per_step": t["flops_per_step"],
                           "useful_gflops": useful, "matmul_peak_gflops": t["matmul_peak_gflops"],
                           "cpu_peak_fraction": useful / t["matmul_peak_gflops"], "n_params": t["n_params"],
                           "setup": t["setup"]}
        if "trl" in t:
            rates = {gc: statistics.median(m["step_seconds"]) for gc, m in t["trl"].items()}
            best = min(rates, key=rates.get)  # the faster TRL configuration is the baseline
            trl = t["trl"][best]
            trl_rate = trl["trained_tokens_per_step"] / rates[best]
            out["training"].update({
                "trl_trained_tokens_per_s": trl_rate, "trl_step_seconds": spread(trl["step_seconds"]),
                "trl_gradient_checkpointing": best == "True", "trl_peak_rss": trl["peak_memory_bytes"],
                "speedup_vs_trl": (tokens / step) / trl_rate,
                "peak_memory_ratio_vs_trl": t["ours_peak_rss"] / trl["peak_memory_bytes"],
                "trl_all": {gc: {"step_seconds": spread(m["step_seconds"]), "peak_rss": m["peak_memory_bytes"]}
                            for gc, m in t["trl"].items()}})
        if "trl_same_attention" in t:
            same = t["trl_same_attention"]
            same_rate = same["trained_tokens_per_step"] / statistics.median(same["step_seconds"])
            out["training"]["speedup_vs_trl_same_attention"] = (tokens / step) / same_rate
    if "metrics" in raw:
        m = raw["metrics"]
        out["metrics"] = {"seconds_1m": statistics.median(m["seconds"]) * 1_000_000 / m["n"],
                          "seconds": spread(m["seconds"]), "n": m["n"]}
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
    rows = ["| case | ours | baseline | ratio |", "|---|---:|---:|---:|"]
    if "rollout" in result:
        r = result["rollout"]
        rows.append(f"| rollouts (completions/s) | {r['ours_completions_per_s']:.0f} | "
                    f"{r['generate_completions_per_s']:.0f} (`model.generate`) | {r['speedup_vs_generate']:.2f}× |")
        rows.append(f"| … against `generate` on the project's CPU attention | | | "
                    f"{r['speedup_vs_generate_same_attention']:.2f}× |")
    if "training" in result:
        t = result["training"]
        if "speedup_vs_trl" in t:
            rows.append(f"| training step (trained tokens/s) | {t['ours_trained_tokens_per_s']:.0f} | "
                        f"{t['trl_trained_tokens_per_s']:.0f} (TRL DistillationTrainer) | "
                        f"{t['speedup_vs_trl']:.2f}× |")
            if "speedup_vs_trl_same_attention" in t:
                rows.append(f"| … against TRL on the project's CPU attention | | | "
                            f"{t['speedup_vs_trl_same_attention']:.2f}× |")
            rows.append(f"| training peak memory (MiB) | {t['ours_peak_rss'] / 2**20:.0f} | "
                        f"{t['trl_peak_rss'] / 2**20:.0f} | {t['peak_memory_ratio_vs_trl']:.2f}× |")
        rows.append(f"| training useful GFLOP/s | {t['useful_gflops']:.1f} | {t['matmul_peak_gflops']:.1f} (fp32 "
                    f"matmul peak) | {t['cpu_peak_fraction']:.0%} |")
    if "metrics" in result:
        rows.append(f"| metrics over 1 M predictions (s) | {result['metrics']['seconds_1m']:.3f} | | |")
    if "run" in result:
        rows.append(f"| `caopd run` (s) | {result['run']['seconds']:.0f} | | |")
    return "\n".join(rows) + "\n"


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
        raw[name] = run_case(name, QUICK[name] if args.quick else {})
    result = {**summarize(raw), "machine": machine(), "quick": args.quick,
              "seconds_total": time.perf_counter() - started, "raw": raw}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from caopd.data import write_json, write_text

    write_json(out / "latest.json", result)
    write_text(out / "latest.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
