"""Baseline: seconds per step of TRL's on-policy distillation trainer on the packaged tiny model (the ``training``
case) or on the shape model at the paper's lengths (``toolshape``, ``longshape``: ``cases.shape_trl_case``).

Measures ``trl.DistillationTrainer`` (TRL 1.16) set up like the project's own step (``caopd.training.trainer``):
the model as student, a frozen copy of it as teacher, ``n_prompts`` prompts per step (the arithmetic task's, or the
shape model's random words) with ``k`` student samples each (temperature 1.0, top-k/top-p off, at most
``max_new_tokens`` new tokens), forward KL (``beta=0``) over the full vocabulary, AdamW at lr 1.5e-4, clipping at 1.0,
fp32 on CPU (or ``bf16=True``: autocast, the teacher copy stored in bf16), torch's default threads, no vLLM,
transformers' default attention (SDPA) unless told otherwise.

How the setup maps onto TRL:

- K samples per prompt. DistillationTrainer samples one completion per dataset row (its sampler uses
  ``mini_repeat_count=1``; there is no ``num_generations``), so each prompt is written ``k`` times in a row into the
  dataset and the dataset is not shuffled: one generation batch = ``n_prompts`` distinct prompts x ``k`` copies.
  TRL generates for the ``n_prompts*k`` rows as one left-padded ``generate`` call, so every prompt is prefilled
  ``k`` times. The project's engine prefills once and repeats the KV cache, so it does less work here.
- Micro-batches. The project runs forward/backward in micro-batches of ``TrainConfig.micro_batch_size`` (64)
  sequences. Here that is TRL's ``per_device_train_batch_size`` with ``gradient_accumulation_steps`` chosen so that
  their product is ``n_prompts*k``. TRL generates once per optimizer step and splits the batch; one optimizer step =
  one project step.
- Prompts. ``generate_rows`` gives plain-text prompts (``"12*34="``) and ``render_prompt`` passes plain text through
  unchanged, so no chat template is needed. TRL tokenizes plain-text prompts with ``tokenizer(text=...)``, and
  the character-level tokenizer adds no special tokens; nor does the shape model's word-level one, whose prompts
  are random words, one token each (``benchmarks.shape_model``).
- Settings that differ from TRL's defaults: ``gradient_checkpointing`` (TRL turns it on by default), ``bf16``
  (on by default; the bf16 case keeps it), the lr schedule (constant here; the project warms up, which does not
  change the cost), ``shuffle_dataset``, ``use_cpu``.

The teacher sees the same prompt as the student (DistillationTrainer has no privileged teacher context), and a
frozen copy of the student matches it exactly, so the loss and the gradients are 0 here. The work per step (forward,
backward, optimizer update) is the same as with a different teacher; only the numbers trained on are zeros.

What is measured:

- ``step_seconds``: wall time from ``on_step_begin`` to ``on_step_end`` of each optimizer step after the first one
  (warm-up): generation, student and teacher forwards, loss, backward, clipping and the AdamW update. The mean
  and median are given too; ``config.load_avg_1min`` (before, after) shows whether other work shared the cores.
- ``trained_tokens``: TRL's own count of the tokens in the loss per step (``num_items_in_batch``, the sum of the
  completion mask: sampled tokens up to and including the first EOS), read from
  ``_generate_and_score_completions``. The project counts the same way (sampled ids + EOS when finished).
- ``peak_memory_bytes``: the highest resident set size (``/proc/self/statm``, the same sampler as the project's case)
  seen by a background thread sampling every 5 ms during the measured steps. This is process RSS, so it includes
  both models, the optimizer state, the Python heap and torch's CPU allocator caches. ``baseline_rss_bytes`` is the
  RSS just before the first measured step, so the growth during a step is ``peak - baseline``.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import DistillationConfig, DistillationTrainer

from benchmarks.memory import PeakRss, rss_bytes
from caopd.config.training import TrainConfig
from caopd.method.templates import render_prompt
from caopd.models.loading import load_model
from caopd.tasks.arithmetic import generate_rows

LEARNING_RATE = 1.5e-4
MAX_GRAD_NORM = 1.0


class StepTimer(TrainerCallback):
    """Per-optimizer-step wall times and token counts; RSS sampling starts once the warm-up step is done."""

    def __init__(self, sampler: PeakRss) -> None:
        self.sampler = sampler
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.baseline_rss = 0
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:  # first measured step: everything before it is warm-up
            self.baseline_rss = rss_bytes()
            self.sampler.start()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._t0)


class CountingDistillationTrainer(DistillationTrainer):
    """Records TRL's count of loss tokens for each generation batch (= one optimizer step here)."""

    token_counts: list[int]

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.token_counts.append(int(output["num_items_in_batch"]))
        return output


def micro_batch(total: int, limit: int) -> int:
    """Largest divisor of ``total`` not above ``limit``: TRL needs batch x accumulation = generation batch."""
    return max(d for d in range(1, min(total, limit) + 1) if total % d == 0)


def measure_trl_steps(n_prompts: int = 32, k: int = 8, max_new_tokens: int = 24, steps: int = 6,
                      gradient_checkpointing: bool = False, seed: int = 0, attention: str = "sdpa",
                      model: str = "tiny", prompts: list[str] | None = None, precision: str = "fp32") -> dict:
    """Run ``steps`` DistillationTrainer steps and time all but the first; see the module docstring.

    ``attention``: the models' attention implementation; transformers' default ("sdpa") is what a TRL user gets.
    ``model``: a packaged model's name or a checkpoint folder (the shape model's); ``prompts``: plain-text prompts,
    ``n_prompts`` per step in order (default: the arithmetic task's, rendered for ``model``). ``precision``: "bf16"
    runs TRL's ``bf16=True`` (autocast over float32 weights, as on a GPU; its default) with the frozen teacher stored
    in bfloat16, as the project's bf16 teacher is.
    """
    if steps < 2:
        raise ValueError("steps must be at least 2: the first step is warm-up and is not measured")
    # torch's default threads, as the project's side runs: a run-time torch.set_num_threads, even to the default,
    # makes torch's CPU attention kernel 1.3-4.4x slower for the rest of the process (benchmarks/README.md).
    load_before = os.getloadavg()[0]  # other work on the 2 cores inflates and scatters step times
    loaded = load_model(model)
    loaded.model.set_attn_implementation(attention)  # load_model picks the project's CPU attention
    tokenizer = loaded.tokenizer
    teacher = copy.deepcopy(loaded.model).eval().requires_grad_(False)
    if precision == "bf16":  # stored in bf16 as the project's frozen teacher is (the rotary buffers stay float32)
        for param in teacher.parameters():
            param.data = param.data.to(torch.bfloat16)

    if prompts is None:
        prompts = [render_prompt(tokenizer, row["prompt"]) for row in generate_rows(n_prompts * steps, seed=seed)]
    if len(prompts) < n_prompts * steps:
        raise ValueError(f"{len(prompts)} prompts for {steps} steps of {n_prompts}")
    # k consecutive copies of each prompt; with shuffling off, step s sees prompts s*n_prompts .. (s+1)*n_prompts-1.
    dataset = Dataset.from_dict({"prompt": [p for p in prompts[: n_prompts * steps] for _ in range(k)]})

    group = n_prompts * k
    per_device = micro_batch(group, TrainConfig.model_fields["micro_batch_size"].default)
    with tempfile.TemporaryDirectory() as out_dir:
        args = DistillationConfig(
            output_dir=out_dir, max_steps=steps, per_device_train_batch_size=per_device,
            gradient_accumulation_steps=group // per_device, learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch",
            beta=0.0, temperature=1.0, top_k=0, top_p=1.0, max_completion_length=max_new_tokens,
            use_vllm=False, gradient_checkpointing=gradient_checkpointing, bf16=precision == "bf16", fp16=False,
            use_cpu=True, shuffle_dataset=False, seed=seed, data_seed=seed, dataloader_num_workers=0,
            save_strategy="no", report_to="none", logging_strategy="no", disable_tqdm=True,
        )
        sampler = PeakRss()
        timer = StepTimer(sampler)
        trainer = CountingDistillationTrainer(model=loaded.model, teacher_model=teacher, args=args,
                                              train_dataset=dataset, processing_class=tokenizer,
                                              callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # keeps stdout clean for the JSON result
        trainer.token_counts = []
        try:
            trainer.train()
        finally:
            if timer.baseline_rss:  # sampling started with the first measured step
                sampler.stop()

    measured_tokens = trainer.token_counts[1:]
    return {
        "step_seconds": timer.seconds[1:],
        "mean_step_seconds": statistics.fmean(timer.seconds[1:]),
        "median_step_seconds": statistics.median(timer.seconds[1:]),
        "warmup_step_seconds": timer.seconds[0],
        "trained_tokens": measured_tokens,
        "trained_tokens_per_step": round(sum(measured_tokens) / len(measured_tokens)),
        "peak_memory_bytes": sampler.peak,
        "baseline_rss_bytes": timer.baseline_rss,
        "memory_method": "process RSS (/proc/self/statm) sampled every 5 ms during the measured steps",
        "config": {
            "trainer": "trl.DistillationTrainer", "n_prompts": n_prompts, "k": k, "max_new_tokens": max_new_tokens,
            "steps": steps, "measured_steps": steps - 1, "gradient_checkpointing": gradient_checkpointing,
            "seed": seed, "attention": attention, "beta": 0.0, "temperature": 1.0, "lr": LEARNING_RATE,
            "per_device_train_batch_size": per_device, "gradient_accumulation_steps": group // per_device,
            "threads": torch.get_num_threads(), "dtype": "float32", "precision": precision, "model": model,
            "device": "cpu", "use_vllm": False, "load_avg_1min": [load_before, os.getloadavg()[0]],
        },
    }


if __name__ == "__main__":
    print(json.dumps(measure_trl_steps(), indent=2))
