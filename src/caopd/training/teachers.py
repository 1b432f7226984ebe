"""Teachers: the frozen base, the live student, an EMA of the student, a separate model, or a model behind a vLLM
server (on its own GPUs)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from caopd.errors import CaopdInputError
from caopd.method.types import TeacherKind


class Teacher:
    """Scores completions under the privileged context; ``after_step`` keeps an EMA teacher in sync."""

    def __init__(self, kind: TeacherKind, student: torch.nn.Module, ema_rate: float = 0.01,
                 separate: torch.nn.Module | None = None, server: Any = None) -> None:
        """``server``: a ``caopd.training.teacher_server.TeacherServer`` for kind "server" (no model here)."""
        self.kind, self.ema_rate, self.server = kind, ema_rate, server
        self.model: torch.nn.Module | None
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
        if self.model is not student:
            self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def after_step(self, student: torch.nn.Module) -> None:
        """EMA update θ_teacher ← (1 − rate)·θ_teacher + rate·θ_student (the paper's rate: 0.01 per step)."""
        if self.kind != "ema":
            return
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.lerp_(s.detach(), self.ema_rate)


def check_same_tokenizer(student_tokenizer: Any, teacher_tokenizer: Any, teacher_source: str) -> None:
    """Per-token divergences compare distributions over one vocabulary: a different tokenizer is refused."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise CaopdInputError("teacher tokenizer differs from the student's (the per-token loss needs one "
                              "vocabulary); pick a teacher from the same model family", file=teacher_source,
                              field="tokenizer")
