"""GPU check: rollout estimation with vLLM, then CaOPD training in the modes that make real models fit, on a
~0.5B-parameter Qwen3-architecture model built from a config (no hub access needed):

* ``lora``: bf16 compute, activation checkpointing and LoRA adapters, one process, the vLLM engine colocated beside
  the trainer (sleeping through each backward, fed merged weights after every step);
* ``fsdp``: bf16 mixed precision (FSDP2's MixedPrecisionPolicy), activation checkpointing and full fine-tuning, under
  torchrun as one FSDP process (the sharded path: the per-layer gathers, the sharded checkpoint, the gathered save).

Each mode records trained tokens/s, the GPU's peak memory in use and its model FLOPs utilisation (MFU: each step's
FLOPs by the cost model, benchmarks/cost_model.py — sampling, both models' forwards, the student's backward, the LM
heads and the loss, each prompt once per group — over the time and the card's dense bf16 peak); the rollout
estimation its samples/s and each engine's sizing.

    python -m benchmarks.gpu_smoke                 # on a GPU machine; writes benchmarks/results/gpu_smoke.json
    python -m benchmarks.gpu_smoke --install-gpu-extra   # first installs the GPU image's lock (vLLM) if there is room

Without a GPU it says so and exits 0 without writing anything. ``--size tiny --allow-cpu`` runs the same path on a
small model on the CPU with transformers (the test suite does; with tests/fake_vllm.py it runs the vLLM path too),
so the script cannot rot where no GPU is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from benchmarks import cost_model
from benchmarks.cost_model import StepShape
from caopd.config.memory import PlanModel

RESULTS = Path(__file__).with_name("results")
# Qwen3-0.6B's shape with 28 layers (~0.44B parameters in the layers; the project's character vocabulary is small).
SIZES = {
    "0.5b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32),
}
GPU_EXTRA_DISK_GB = 12  # vLLM's wheel and its CUDA dependencies, with room to spare


def build_model(size: str, folder: Path) -> int:
    """A randomly initialised Qwen3 model of ``size`` with the project's tokenizer, saved as a checkpoint folder;
    returns its parameter count."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from caopd.models import tiny
    from caopd.models.loading import METADATA_FILE

    tokenizer = tiny.build_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, **SIZES[size])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / METADATA_FILE).write_text(json.dumps({"template": tiny.TEMPLATE}))
    return sum(p.numel() for p in model.parameters())


def install_gpu_extra() -> str:
    free_gb = shutil.disk_usage(Path.cwd()).free / 2**30
    if free_gb < GPU_EXTRA_DISK_GB:
        return f"skipped: {free_gb:.0f} GB free, the gpu extra needs about {GPU_EXTRA_DISK_GB} GB"
    # The GPU image's versions (its lock), then caopd on top without touching them: the smoke runs what the image runs.
    root = Path(__file__).resolve().parents[1]
    for args in (["-r", "images/gpu/requirements.txt"], ["--no-deps", "-e", "."]):
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *args], cwd=root,
                              capture_output=True, text=True)
        if done.returncode != 0:
            return f"failed: {done.stderr.strip().splitlines()[-1:]}"
    return "installed"


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


class PeakMemory:
    """The GPU's peak memory in use (the whole card, as ``torch.cuda.mem_get_info`` sees it: vLLM's engine, which
    allocates outside torch's caching allocator, included), polled every ``interval`` seconds while the block runs;
    None without a GPU."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak = interval, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while True:
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak or 0, total - free)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def gib(self) -> float | None:
        return None if self.peak is None else round(self.peak / 2**30, 2)


# Dense bf16 peak of the cards MFU is reported for (FLOP/s, from the vendors' datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
MODES = {
    "lora": dict(precision="bf16", activation_checkpointing=True, finetune="lora"),
    "fsdp": dict(precision="bf16", activation_checkpointing=True, finetune="full"),
}


def peak_flops(device: str) -> float | None:
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device), None)


def step_flops(model: PlanModel, step: StepShape, finetune: str) -> float:
    """Model FLOPs of one step by the cost model (benchmarks/cost_model.py, the project's "prompt once" layout):
    sampling (prefill and decoding, attention included), the teacher's forward, the student's forward and backward
    (its weight gradients only without LoRA: the frozen base gets none, its activations still do), the LM heads and
    the loss over the vocabulary, AdamW. Activation checkpointing's recomputation is not counted (model FLOPs, as
    MFU defines them)."""
    return cost_model.total(cost_model.stage_costs(model, step, "prompt_once",
                                                   weight_gradients=finetune != "lora")).flops


def prompt_lengths(tokenizer: Any, rows: list[dict], template: str) -> tuple[float, float]:
    """The mean tokens of the training rows' student prompts and of their teachers' (the demonstration in context,
    CaOPD's Note): the cost model's prompt lengths."""
    from caopd.method.targets import teacher_context
    from caopd.method.templates import render_prompt, teacher_prompt
    from caopd.models.loading import encode_text
    from caopd.tasks import get_task

    task = get_task("arithmetic")
    examples = [task.example_from_row(row, i) for i, row in enumerate(rows)]
    student = [len(encode_text(tokenizer, render_prompt(tokenizer, e.prompt))) for e in examples]
    teacher = [len(encode_text(tokenizer, render_prompt(tokenizer, teacher_prompt(
        e.prompt, teacher_context("demo", e.demonstration, None, 0.5, "caopd"), template)))) for e in examples]
    return sum(student) / len(student), sum(teacher) / len(teacher)


def _mode_result(mode: str, folder: Path, seconds: float, model: PlanModel, shape: StepShape, peak: PeakMemory,
                 device: str, summary: dict) -> dict:
    """A mode's figures; ``shape``: its steps' shape but for the completions' length, which each step's log gives
    (its trained tokens over its completions)."""
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line]
    tokens = sum(r["trained_tokens"] for r in log)
    completions = shape.groups * shape.k
    flops = sum(step_flops(model, replace(shape, completion_tokens=r["trained_tokens"] / completions),
                           MODES[mode]["finetune"]) for r in log)
    card = peak_flops(device)
    return {"settings": MODES[mode], "steps": len(log), "seconds": round(seconds, 2),
            "trained_tokens_per_s": round(tokens / seconds, 1), "final_loss": log[-1]["loss"],
            "peak_memory_gib": peak.gib(), "model_tflops_per_s": float(f"{flops / seconds / 1e12:.4g}"),
            "mfu": None if card is None else round(flops / seconds / card, 4),
            "engine": "vllm (colocated)" if summary.get("vllm") else "transformers",
            "sharded": summary.get("sharded", False), "activation_checkpointing": summary["activation_checkpointing"]}


def smoke(size: str, n_prompts: int, k: int, steps: int, prompts_per_step: int, work: Path, device: str,
          modes: tuple[str, ...] = tuple(MODES)) -> dict:
    from caopd.config.sampling import SamplingConfig
    from caopd.config.training import LoRAConfig, TrainConfig
    from caopd.experiments.chain import run_chain
    from caopd.io import write_jsonl
    from caopd.tasks.arithmetic import generate_rows

    model_dir, data = work / "model", work / "train.jsonl"
    parameters = build_model(size, model_dir)
    rows = generate_rows(n_prompts, 0)
    write_jsonl(data, rows)
    # CaOPD; the rollout estimation samples as training does (K = k, 24 new tokens, seed 0)
    train = TrainConfig(steps=steps, prompts_per_step=prompts_per_step, k=k, warmup_steps=1, save_every=steps,
                        sampling=SamplingConfig(max_new_tokens=24), lora=LoRAConfig(r=16), **MODES["lora"])
    # auto: with vLLM installed and a GPU the estimation runs a standalone engine (shut down when it is done) and
    # the training rollouts come from a colocated engine, asleep through each backward, synced after every step
    with PeakMemory() as peak:
        done = run_chain(str(model_dir), str(data), train, work, rollout_engine="auto", train_engine="auto")
    rollout_s = done.seconds["rollouts"]
    # the cost model's step: the model's dimensions, the prompts as the trainer encodes them, bf16 compute
    model = cost_model.model_from_config(json.loads((model_dir / "config.json").read_text()), parameters)
    from caopd.models.tiny import TEMPLATE, build_tokenizer

    student, teacher = prompt_lengths(build_tokenizer(), rows, TEMPLATE)
    shape = StepShape(groups=prompts_per_step, k=k, prompt_tokens=student, teacher_prompt_tokens=teacher,
                      completion_tokens=0, micro_batch=train.micro_batch_size, dtype_bytes=2)
    results = {"lora": _mode_result("lora", work / "train", done.seconds["training"], model, shape, peak, device,
                                    done.training)}
    fsdp = train.model_copy(update={**MODES["fsdp"], "lora": LoRAConfig()})
    with PeakMemory() if "fsdp" in modes else contextlib.nullcontext() as peak:
        if "fsdp" in modes:
            start = time.perf_counter()
            summary = torchrun_training(str(model_dir), done.targets, fsdp, work / "fsdp")
            results["fsdp"] = _mode_result("fsdp", work / "fsdp", time.perf_counter() - start, model, shape, peak,
                                           device, summary)
    return {
        "size": size, "parameters": parameters,
        "rollout_engine": "vllm" if "vllm" in done.rollouts else "transformers",
        "rollout": {"prompts": n_prompts, "k": k, "seconds": round(rollout_s, 2),
                    "samples_per_s": round(n_prompts * k / rollout_s, 1)},
        "training": results,
        "vllm": {"rollout": done.rollouts.get("vllm"), "training": done.training.get("vllm")},
    }


def torchrun_training(model: str, records: str, train, out: Path) -> dict:
    """The training stage under torchrun as one FSDP process (engine auto: a colocated vLLM on a GPU)."""
    from caopd.config.stages import TrainStageConfig

    cfg = TrainStageConfig(model=model, records=records, train=train, engine="auto", sharding="fsdp")
    config = out.with_suffix(".json")
    config.write_text(cfg.model_dump_json())
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                          "caopd.cli", "train", "--config", str(config), "--quiet", "--out", str(out)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"torchrun training failed: {run.stderr.strip()[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--prompts", type=int, default=256, help="prompts of the rollout estimation")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=sorted(MODES),
                        help="training modes after the lora one (which the rollout chain trains): fsdp")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU too (for the tiny size)")
    parser.add_argument("--install-gpu-extra", action="store_true",
                        help="pip install the GPU image's lock (vLLM, torch 2.14) first")
    parser.add_argument("--installed-gpu-extra", default="not requested", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "gpu_smoke.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_smoke: no GPU here (torch.cuda.is_available() is False): skipped, nothing written")
        return 0
    if args.install_gpu_extra:
        installed = install_gpu_extra()
        if installed == "installed":  # this process imported the torch it replaced: start again on the new one
            rest = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--install-gpu-extra"]
            os.execv(sys.executable, [sys.executable, "-m", "benchmarks.gpu_smoke", *rest,
                                      "--installed-gpu-extra", installed])
    else:
        installed = args.installed_gpu_extra
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
    with tempfile.TemporaryDirectory() as work:
        result = smoke(args.size, args.prompts, args.k, args.steps, args.prompts_per_step, Path(work), device,
                       tuple(args.modes))
    result.update({"device": device, "gpu_extra": installed, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                   "versions": {name: _version(name) for name in ("torch", "transformers", "vllm", "caopd")}})
    from caopd.io import write_json

    write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
