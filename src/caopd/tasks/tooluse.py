"""``tooluse``: the paper's ToolAlpaca format — pick the right API call with the right arguments.

A completion is correct when the first ``Action:`` of its answer part (after a thinking block) and the
``Action Input:`` that follows it match the first gold call, as the official calibration evaluation scores it.
Beside it, ``extra_checks`` reports ``all_calls``: every call of the answer part against all gold calls, as a
multiset (the official tool-use accuracy). Inputs are compared as parsed JSON, so whitespace, indentation and key
order do not matter; an input that is not valid JSON is compared as its stripped text, as the official scorer does
(four gold calls of the ToolAlpaca release are such, with a doubled key).
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from caopd.method.protocol import TOOLUSE_CONFIDENCE_INSTRUCTION, format_confidence, split_thinking
from caopd.tasks.base import (
    Example,
    FieldError,
    Task,
    append_to_last_user_message,
    demonstration_with_confidence,
    register_task,
    require_str,
    row_id,
)
from caopd.tasks.mcq import chat_messages

# "Action:" but not "Action Input:", any case; ToolAlpaca transcripts may prefix it ("ASSISTANT Action: ...").
_ACTION_RE = re.compile(r"\bAction:[ \t]*([^\n]*)", re.IGNORECASE)
# "Action Input:" (the official scorer also reads "Action_Input:"), any case.
_ACTION_INPUT_RE = re.compile(r"\bAction[ _]Input:\s*", re.IGNORECASE)

# The official code puts the confidence line before this anchor; the shorter form is its second choice.
BEGIN_ANCHORS = ("\n\nBegin!\n", "\n\nBegin!")


class UnparsedInput(str):
    """An action input that is not valid JSON, kept as its stripped text and compared as text."""


def canonical_call(action: str, arguments: Any) -> str:
    """One string per (action, input): equal strings mean equal calls.

    A parsed input is written as sorted, compact JSON; an :class:`UnparsedInput` as its text (which, not
    being valid JSON, never equals a parsed input's JSON).
    """
    if isinstance(arguments, UnparsedInput):
        return f"{action} {arguments}"
    return f"{action} {json.dumps(arguments, sort_keys=True, ensure_ascii=False, separators=(',', ':'))}"


def input_text(arguments: Any) -> str:
    """An input as a response writes it after ``Action Input:``."""
    return str(arguments) if isinstance(arguments, UnparsedInput) else json.dumps(arguments, ensure_ascii=False)


def call_lines(calls: Sequence[tuple[str, Any]]) -> list[str]:
    """``Action: X`` and ``Action Input: {json}`` for each call, in order."""
    lines = []
    for action, arguments in calls:
        lines += [f"Action: {action}", f"Action Input: {input_text(arguments)}"]
    return lines


def parse_gold_calls(value: Any) -> list[tuple[str, Any]]:
    """``golden_answer`` as (action, input) pairs.

    The column holds a Python-literal list of ``{'Action': ..., 'Action_Input': ...}`` (or the list itself);
    ``Action_Input`` is usually a JSON string, sometimes already a dict. A string that is not valid JSON becomes
    an :class:`UnparsedInput`.
    """
    try:
        calls = ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError) as err:
        raise FieldError("golden_answer", f"not a Python literal ({err.__class__.__name__}: {err})") from None
    if not isinstance(calls, list) or not calls:
        raise FieldError("golden_answer", "expected a non-empty list of {'Action', 'Action_Input'} calls")
    return [_gold_call(call, i) for i, call in enumerate(calls)]


def _gold_call(call: Any, i: int) -> tuple[str, Any]:
    if not isinstance(call, Mapping):
        raise FieldError("golden_answer", f"call {i}: expected a dict, got {type(call).__name__}")
    action = call.get("Action")
    if not isinstance(action, str) or not action.strip():
        raise FieldError("golden_answer", f"call {i}: missing 'Action'")
    if "Action_Input" not in call:
        raise FieldError("golden_answer", f"call {i}: missing 'Action_Input'")
    arguments = call["Action_Input"]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            if not arguments.strip():
                raise FieldError("golden_answer", f"call {i}: 'Action_Input' is empty") from None
            arguments = UnparsedInput(arguments.strip())
    return action.strip(), arguments


def _braced_span(text: str) -> str | None:
    """The ``{...}`` that ``text`` opens with, braces balanced outside JSON strings; None when it never closes."""
    depth, in_string, escaped = 0, False, False
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[:i + 1]
    return None


def _read_input(text: str) -> Any:
    """The input that ``text`` (what follows ``Action Input:``) opens with: parsed JSON; else, as an
    :class:`UnparsedInput`, the balanced ``{...}`` it opens with, or its first line when it opens no brace; None
    when there is nothing (an empty line, an unclosed brace)."""
    try:
        arguments, _ = json.JSONDecoder().raw_decode(text)
        return arguments
    except json.JSONDecodeError:
        raw = _braced_span(text) if text.startswith("{") else text.split("\n", 1)[0]
        return UnparsedInput(raw.strip()) if raw and raw.strip() else None


def completion_calls(completion: str) -> list[str | None]:
    """Every call in the answer part, in order, as canonical strings; None for an ``Action:`` with no name or
    no readable ``Action Input:`` before the next ``Action:``."""
    _, answer = split_thinking(completion)
    actions = list(_ACTION_RE.finditer(answer))
    calls: list[str | None] = []
    for i, action in enumerate(actions):
        end = actions[i + 1].start() if i + 1 < len(actions) else len(answer)
        name = action.group(1).strip()
        found = _ACTION_INPUT_RE.search(answer, action.end(), end)
        arguments = None if found is None or not name else _read_input(answer[found.end():end])
        calls.append(None if arguments is None else canonical_call(name, arguments))
    return calls


def insert_before_begin(content: str, line: str) -> str | None:
    """``content`` with ``line`` on its own line before the ``Begin!`` anchor (the official insertion), or
    None when it has no anchor."""
    for anchor in BEGIN_ANCHORS:
        if anchor in content:
            return content.replace(anchor, "\n" + line + anchor, 1)
    return None


def prompt_value(value: Any) -> str | list[dict[str, str]]:
    """ToolAlpaca prompts come as one rendered string or as chat messages; both are accepted."""
    if isinstance(value, str):
        return require_str({"prompt": value}, "prompt")
    return chat_messages(value, "prompt")


def demonstration_text(row: Mapping[str, Any], calls: Sequence[tuple[str, Any]]) -> str:
    """The gold response: ``golden_response`` (a list of lines joined by newlines, or a string), else
    ``demonstration``, else the gold calls written out; with ``Confidence: 1.00`` appended when it states none."""
    if row.get("golden_response") is not None:
        value = row["golden_response"]
        if isinstance(value, list) and all(isinstance(line, str) for line in value):
            text = "\n".join(value)
        elif isinstance(value, str):
            text = value
        else:
            raise FieldError("golden_response", "expected a list of lines (strings) or a string")
        if not text.strip():
            raise FieldError("golden_response", "is empty")
    elif row.get("demonstration") is not None:
        text = require_str(row, "demonstration")
    else:
        text = "\n".join(call_lines(calls)) + "\n" + format_confidence(1.0)
    return demonstration_with_confidence(text)


@register_task
class ToolUseTask(Task):
    """Columns: ``prompt`` (string or chat messages), ``golden_answer``; optional ``id``, ``name``,
    ``golden_response`` or ``demonstration``.

    The other ToolAlpaca columns (``description``, ``nl_documentation``, ``instruction``) are already
    rendered into ``prompt``, so they are not required. ``meta`` holds ``api`` (the ``name`` column, for
    per-API breakdowns) and ``gold_calls`` (every gold call as a canonical string, for ``all_calls``).
    """

    name = "tooluse"
    required_columns = ("prompt", "golden_answer")
    default_confidence_instruction = TOOLUSE_CONFIDENCE_INSTRUCTION

    def example_from_row(self, row: Mapping[str, Any], index: int) -> Example:
        prompt = prompt_value(row["prompt"])
        calls = parse_gold_calls(row["golden_answer"])
        return Example(id=row_id(row, index), prompt=self.prompt_asking_confidence(prompt),
                       answer=canonical_call(*calls[0]), demonstration=demonstration_text(row, calls),
                       meta={"api": str(row.get("name") or ""),
                             "gold_calls": [canonical_call(*call) for call in calls]})

    def insert_confidence_instruction(self, prompt: Any, line: str) -> Any:
        """Before the ``Begin!`` anchor, in whichever message holds it; without one, after the last user message
        (after a blank line)."""
        if isinstance(prompt, str):
            inserted = insert_before_begin(prompt, line)
            return append_to_last_user_message(prompt, line) if inserted is None else inserted
        messages = [dict(message) for message in prompt]
        for message in messages:
            inserted = insert_before_begin(message["content"], line)
            if inserted is not None:
                message["content"] = inserted
                return messages
        return append_to_last_user_message(messages, line)

    def extract_answer(self, completion: str) -> str | None:
        """The first call as a canonical string; None without an action or a readable input."""
        calls = completion_calls(completion)
        return calls[0] if calls else None

    def is_correct(self, example: Example, answer: str | None) -> bool:
        return answer is not None and answer == example.answer

    def extra_checks(self, example: Example, completion: str) -> dict[str, bool]:
        """``all_calls``: the answer part's calls equal the gold calls as a multiset (order free, count kept)."""
        calls = completion_calls(completion)
        gold = Counter(example.meta.get("gold_calls") or [example.answer])
        return {"all_calls": None not in calls and Counter(calls) == gold}
