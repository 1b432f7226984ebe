"""Literal types shared across layers: the one place each set of choices is spelled."""

from __future__ import annotations

from typing import Literal

# Per-token divergences (GKD conventions): forward_kl = KL(teacher ‖ student), reverse_kl = KL(student ‖ teacher).
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]

TeacherKind = Literal["frozen", "student", "ema", "separate", "server"]

# How targets are built: plain OPD (the baseline) or CaOPD.
Method = Literal["opd", "caopd"]

# The privileged context: the gold demonstration, or a verified correct rollout.
TeacherMode = Literal["demo", "correct_solution"]

EngineName = Literal["auto", "transformers", "vllm"]

TrainMethod = Literal["opd", "caopd", "rlcr"]
# The training methods whose objective learns without a teacher (caopd.training.objectives: needs_teacher is False),
# for the torch-free layers: teacher and divergence settings mean nothing to them.
TEACHERLESS_METHODS: frozenset[str] = frozenset({"rlcr"})
Variant = Literal["faithful", "decoupled"]
Sharding = Literal["replicate", "fsdp"]
# How the student trains: every weight, or low-rank adapters on a frozen base (PEFT LoRA).
Finetune = Literal["full", "lora"]
# The student's compute precision: float32 throughout, or bfloat16 compute over float32 master weights.
Precision = Literal["fp32", "bf16"]

# The chat template's thinking switch (Qwen3's ``enable_thinking``): the template's default, on or off.
Thinking = Literal["template", "on", "off"]
