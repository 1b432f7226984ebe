"""Teachers: the frozen base, the live student, an EMA of the student, a separate model, or a model behind a vLLM
server (on its own GPUs).

With full fine-tuning the frozen and EMA teachers are copies of the base student: the frozen one in the compute
dtype (bfloat16 under precision=bf16: it never trains), the EMA one in float32 (a 0.01 step is below bfloat16's
resolution for most weights, so a bfloat16 average would not move). With LoRA there is no copy: the frozen teacher is
the student's own modules with the adapters off, the EMA teacher the same modules with a second adapter that averages
the student's (``caopd.models.lora``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

from caopd.errors import CaopdInputError
from caopd.method.types import TeacherKind
from caopd.models import lora


class Teacher:
    """Scores completions under the privileged context; ``after_step`` keeps an EMA teacher in sync."""

    def __init__(self, kind: TeacherKind, student: torch.nn.Module, ema_rate: float = 0.01,
                 separate: torch.nn.Module | None = None, server: Any = None, *, adapters: Any = None,
                 frozen_dtype: torch.dtype | None = None) -> None:
        """``server``: a ``caopd.training.teacher_server.TeacherServer`` for kind "server" (no model here).
        ``adapters``: the student's ``PeftModel`` when it trains LoRA adapters (``student`` is its base model).
        ``frozen_dtype``: the dtype a frozen copy of the student is stored in (None: the student's)."""
        self.kind, self.ema_rate, self.server, self.adapters = kind, ema_rate, server, adapters
        self.model: torch.nn.Module | None
        if adapters is not None and kind in ("frozen", "ema", "student"):
            self.model = student  # the same modules, scored with the adapters off, averaged or live
            if kind == "ema":
                lora.add_ema_adapter(adapters)
            return
        if kind == "server":
            if server is None:
                raise ValueError("a server teacher needs its server")
            self.model = None
            return
        if kind == "student":
            self.model = student
        elif kind == "separate":
            if separate is None:
                raise ValueError("a separate teacher needs its model")
            self.model = separate
        else:  # frozen and ema start as a copy of the base student
            self.model = copy.deepcopy(student)
            if kind == "frozen" and frozen_dtype is not None:
                for param in self.model.parameters():  # not the buffers: rotary frequencies stay float32
                    param.data = param.data.to(frozen_dtype)
        if self.model is not student:
            self.model.eval().requires_grad_(False)

    @property
    def copies_student(self) -> bool:
        """Whether the teacher is a model of its own beside the student (a copy, or a separate model)."""
        return self.model is not None and self.adapters is None and self.kind != "student"

    @contextlib.contextmanager
    def scoring(self) -> Iterator[torch.nn.Module]:
        """The model that scores, for the block: the teacher's own, or the student's modules with the adapters off
        (frozen) or the EMA adapter on (ema). Nothing here may run a backward: the student's adapter is active again
        on leaving."""
        if self.adapters is not None and self.kind == "frozen":
            with lora.adapters_off(self.adapters):
                yield self.model
        elif self.adapters is not None and self.kind == "ema":
            with lora.ema_adapter_on(self.adapters):
                yield self.model
        else:
            yield self.model

    @torch.no_grad()
    def after_step(self, student: torch.nn.Module) -> None:
        """EMA update θ_teacher ← (1 − rate)·θ_teacher + rate·θ_student (the paper's rate: 0.01 per step); with LoRA,
        over the adapters."""
        if self.kind != "ema":
            return
        if self.adapters is not None:
            for s, t in lora.adapter_pairs(student):
                t.lerp_(s.detach(), self.ema_rate)
            return
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.lerp_(s.detach(), self.ema_rate)


def check_same_tokenizer(student_tokenizer: Any, teacher_tokenizer: Any, teacher_source: str) -> None:
    """Per-token divergences compare distributions over one vocabulary: a different tokenizer is refused."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise CaopdInputError("teacher tokenizer differs from the student's (the per-token loss needs one "
                              "vocabulary); pick a teacher from the same model family", file=teacher_source,
                              field="tokenizer")
