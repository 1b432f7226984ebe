"""Prompt rendering and the teacher's privileged context.

Two template families render the same privileged information (the question, a reference response in
the response protocol, and optionally the empirical-confidence Note):

- ``paper``: the paper's English instructions, for instruction-tuned models (chat messages or text).
- ``compact``: a few marker characters, for the character-level tiny model, whose context is short:
  ``[REFERENCE|P]QUESTION`` (demo) and ``{REFERENCE|P}QUESTION`` (correct solution); ``|P`` only with a Note.

Target replacement decides *what* goes in (which reference, which confidence, whether there is a Note);
a template only decides how it is written.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from caopd.method.types import TeacherMode, Thinking

DEMO_INTRO = "This is an example for a response to the question:"
DEMO_CLOSING = "Now answer with a response of your own, including the thinking process."
SOLUTION_INTRO = "Correct solution:"
SOLUTION_CLOSING = "Correctly solve the original question."


def confidence_note(p: float) -> str:
    return (f"Note: The empirical confidence for this question is {p:.2f}. "
            "Output this exact value in the 'Confidence:' field.")


@dataclass(frozen=True)
class PrivilegedContext:
    """What the teacher sees beyond the question."""

    mode: TeacherMode
    reference: str  # the demonstration or the verified correct rollout, ending with its Confidence line
    note_confidence: float | None = None  # CaOPD's empirical confidence P; None for plain OPD


def _paper_privileged_text(question: str, ctx: PrivilegedContext) -> str:
    intro, closing = (DEMO_INTRO, DEMO_CLOSING) if ctx.mode == "demo" else (SOLUTION_INTRO, SOLUTION_CLOSING)
    parts = [question, "", intro, ctx.reference, ""]
    if ctx.note_confidence is not None:
        parts += [confidence_note(ctx.note_confidence), ""]
    parts.append(closing)
    return "\n".join(parts)


def _compact_privileged_text(question: str, ctx: PrivilegedContext) -> str:
    open_, close = ("[", "]") if ctx.mode == "demo" else ("{", "}")
    note = "" if ctx.note_confidence is None else f"|{ctx.note_confidence:.2f}"
    return f"{open_}{ctx.reference}{note}{close}{question}"


TEMPLATES = {"paper": _paper_privileged_text, "compact": _compact_privileged_text}


def teacher_prompt(prompt: Any, ctx: PrivilegedContext, template: str = "paper") -> Any:
    """The teacher's prompt: the student's prompt with the privileged context added to its question.

    For chat prompts the last user message carries the privileged context; the system prompt is kept.
    """
    render = TEMPLATES[template]
    if isinstance(prompt, str):
        return render(prompt, ctx)
    messages = copy.deepcopy(list(prompt))
    for message in reversed(messages):
        if message.get("role") == "user":
            message["content"] = render(message["content"], ctx)
            return messages
    raise ValueError("a chat prompt needs a user message to carry the teacher's context")


def chat_template_kwargs(thinking: Thinking) -> dict[str, Any]:
    """The chat template's keyword for the thinking switch (Qwen3's convention; other templates ignore it)."""
    return {} if thinking == "template" else {"enable_thinking": thinking == "on"}


def render_prompt(tokenizer: Any, prompt: Any, thinking: Thinking = "template") -> str:
    """Prompt text for the model, through its chat template when it has one.

    A plain-string prompt is one user message for a model with a chat template (an instruct model must see its
    own framing); a model without one (the tiny default) takes strings as raw text and chat messages joined.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        if not has_template:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    if has_template:
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True,
                                             **chat_template_kwargs(thinking))
    return "\n\n".join(m["content"] for m in prompt) + "\n\n"
