"""Deterministic pre-training of the tiny default model (``caopd pretrain-tiny``).

The mix teaches three things: answer arithmetic in the student format with a stated confidence that
carries no information (so the base is miscalibrated, like an LLM that always sounds sure-ish); copy
the answer from a privileged reference; and state the empirical confidence P that a Note gives.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Qwen3ForCausalLM

from caopd.config.pretrain import PretrainConfig
from caopd.method.protocol import format_confidence
from caopd.method.templates import PrivilegedContext, teacher_prompt
from caopd.models import tiny
from caopd.models.batching import right_padded
from caopd.tasks.arithmetic import KINDS, make_problem


def _uninformative_confidence(rng: random.Random) -> float:
    return rng.randint(10, 20) / 20  # 0.50 .. 1.00, independent of correctness


def _note_confidence(rng: random.Random) -> float:
    return rng.randint(0, 8) / 8 if rng.random() < 0.5 else rng.randint(0, 100) / 100


def sample_pair(rng: random.Random, cfg: PretrainConfig) -> tuple[str, str]:
    """One (context, target) pair of the pre-training mix."""
    kinds, weights = zip(*cfg.kind_weights.items())
    question, answer = make_problem(rng, rng.choices(kinds, weights=weights)[0])
    draw = rng.random()
    if draw < cfg.student_share:
        return question, f"{answer}\n{format_confidence(_uninformative_confidence(rng))}"
    mode = rng.choice(["demo", "correct_solution"])
    if draw < cfg.student_share + cfg.note_share:
        p = _note_confidence(rng)
        ctx = PrivilegedContext(mode, f"{answer}\n{format_confidence(p)}", note_confidence=p)
    else:
        p = 1.0 if rng.random() < 0.7 else _uninformative_confidence(rng)
        ctx = PrivilegedContext(mode, f"{answer}\n{format_confidence(p)}")
    return teacher_prompt(question, ctx, tiny.TEMPLATE), f"{answer}\n{format_confidence(p)}"


def make_batch(pairs: list[tuple[str, str]], tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels on the target (and EOS) only."""
    vocab = tokenizer.get_vocab()
    rows = []
    for context, target in pairs:
        ctx_ids = [vocab[c] for c in context]
        tgt_ids = [vocab[c] for c in target] + [tokenizer.eos_token_id]
        rows.append((ctx_ids + tgt_ids, [-100] * len(ctx_ids) + tgt_ids))
    return right_padded(rows, tokenizer.pad_token_id)


@torch.no_grad()
def greedy_accuracy_by_kind(model, tokenizer, n_per_kind: int = 200, seed: int = 12345) -> dict[str, float]:
    """Greedy exact-match accuracy per kind in the student format (a quick health check)."""
    from caopd.config.sampling import SamplingConfig
    from caopd.rollout.transformers_engine import TransformersEngine
    from caopd.tasks.arithmetic import ArithmeticTask

    rng = random.Random(seed)
    engine = TransformersEngine(model, tokenizer)
    task = ArithmeticTask()
    result = {}
    for kind in KINDS:
        problems = [make_problem(rng, kind) for _ in range(n_per_kind)]
        outs = engine.generate([q for q, _ in problems], SamplingConfig(n=1, temperature=0.0, max_new_tokens=24))
        hits = [task.extract_answer(o[0].text) == a for o, (_, a) in zip(outs, problems)]
        result[kind] = sum(hits) / len(hits)
    return result


def pretrain_tiny(out_dir: str | Path, cfg: PretrainConfig | None = None, progress: bool = True,
                  eval_per_kind: int = 200) -> dict:
    """Train the tiny model from scratch and write a loadable checkpoint folder to ``out_dir``."""
    cfg = cfg or PretrainConfig()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = tiny.build_tokenizer()
    model = Qwen3ForCausalLM(tiny.build_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    start, tokens, losses = time.perf_counter(), 0, []
    bar = tqdm(range(cfg.steps), desc="pretrain-tiny", disable=not progress, unit="step")
    for step in bar:
        batch = make_batch([sample_pair(rng, cfg) for _ in range(cfg.batch_size)], tokenizer)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens += int(batch["attention_mask"].sum())
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    model.eval()
    accuracy = greedy_accuracy_by_kind(model, tokenizer, eval_per_kind)
    record = {"template": tiny.TEMPLATE, "pretrain": cfg.model_dump(), "final_loss": sum(losses[-20:]) / 20,
              "greedy_accuracy_by_kind": accuracy, "seconds": round(time.perf_counter() - start, 1)}
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "caopd.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return record
