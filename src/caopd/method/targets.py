"""Target replacement — CaOPD's three edits, as pure functions.

For a prompt with empirical confidence P (share of its K rollouts that verify correct):
1. the student's completion: cut its answer part from the first confidence statement on and append
   ``Confidence: {P:.2f}`` (``protocol.replace_confidence``; a thinking block is kept as it is);
2. the teacher's reference (demonstration or verified correct rollout) states P as its confidence — a reference
   with no confidence line (a written science answer ending in ``<answer>X</answer>``) gets one appended;
3. the teacher's context carries the Note with P before its closing instruction.
Plain OPD (the baseline) keeps the student's completion and a reference that says ``Confidence: 1.00``.
Every stage that builds training targets (the offline stage and the online training loop) calls these.
"""

from __future__ import annotations

from collections.abc import Sequence

from caopd.method.protocol import replace_confidence
from caopd.method.templates import PrivilegedContext
from caopd.method.types import Method, TeacherMode


def empirical_confidence(correct: Sequence[bool]) -> float:
    """P = correct / K."""
    if not correct:
        raise ValueError("empirical confidence needs at least one rollout")
    return sum(bool(c) for c in correct) / len(correct)


def student_target(completion: str, p: float, method: Method) -> str:
    """Edit 1: the completion the student is trained on."""
    return replace_confidence(completion, p) if method == "caopd" else completion


def choose_reference(mode: TeacherMode, demonstration: str, correct_rollout: str | None) -> tuple[TeacherMode, str]:
    """The teacher's reference: a verified correct rollout in ``correct_solution`` mode, else the demo.

    With no correct rollout to show, ``correct_solution`` falls back to the demonstration (docs/method.md).
    """
    if mode == "correct_solution" and correct_rollout is not None:
        return "correct_solution", correct_rollout
    return "demo", demonstration


def teacher_context(mode: TeacherMode, demonstration: str, correct_rollout: str | None, p: float,
                    method: Method) -> PrivilegedContext:
    """Edits 2 and 3: the privileged context the teacher sees."""
    used_mode, reference = choose_reference(mode, demonstration, correct_rollout)
    if method == "caopd":
        return PrivilegedContext(used_mode, replace_confidence(reference, p), note_confidence=p)
    return PrivilegedContext(used_mode, replace_confidence(reference, 1.0), note_confidence=None)
