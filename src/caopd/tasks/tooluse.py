"""``tooluse``: the paper's ToolAlpaca format — pick the right API call with the right arguments.

A completion is correct when its first ``Action:`` and the ``Action Input:`` JSON that follows it match
the first gold call. Inputs are compared as parsed JSON, so whitespace and key order do not matter.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from typing import Any

from caopd.method.protocol import format_confidence
from caopd.tasks.base import (
    Example,
    FieldError,
    Task,
    register_task,
    require_str,
    row_id,
)
from caopd.tasks.mcq import chat_messages

# "Action:" but not "Action Input:"; ToolAlpaca transcripts may prefix it ("ASSISTANT Action: ...").
_ACTION_RE = re.compile(r"\bAction:[ \t]*([^\n]*)")
_ACTION_INPUT_RE = re.compile(r"\bAction Input:\s*")


def canonical_call(action: str, arguments: Any) -> str:
    """One string per (action, parsed input): equal strings mean equal calls."""
    return f"{action} {json.dumps(arguments, sort_keys=True, ensure_ascii=False, separators=(',', ':'))}"


def parse_gold_calls(value: Any) -> list[tuple[str, Any]]:
    """``golden_answer`` as (action, parsed input) pairs.

    The column holds a Python-literal list of ``{'Action': ..., 'Action_Input': ...}``; ``Action_Input`` is
    usually a JSON string and sometimes already a dict.
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
        except json.JSONDecodeError as err:
            raise FieldError("golden_answer", f"call {i}: 'Action_Input' is not valid JSON ({err.msg})") from None
    return action.strip(), arguments


def prompt_value(value: Any) -> str | list[dict[str, str]]:
    """ToolAlpaca prompts come as one rendered string or as chat messages; both are accepted."""
    if isinstance(value, str):
        return require_str({"prompt": value}, "prompt")
    return chat_messages(value, "prompt")


@register_task
class ToolUseTask(Task):
    """Columns: ``prompt`` (string or chat messages), ``golden_answer``; optional ``id`` and ``name``.

    The other ToolAlpaca columns (``description``, ``nl_documentation``, ``instruction``) are already
    rendered into ``prompt``, so they are not required. ``name`` (the API) goes to ``meta["api"]`` for
    per-API breakdowns.
    """

    name = "tooluse"
    required_columns = ("prompt", "golden_answer")

    def example_from_row(self, row: Mapping[str, Any], index: int) -> Example:
        prompt = prompt_value(row["prompt"])
        action, arguments = parse_gold_calls(row["golden_answer"])[0]
        demonstration = (f"Action: {action}\nAction Input: {json.dumps(arguments, ensure_ascii=False)}\n"
                         f"{format_confidence(1.0)}")
        return Example(id=row_id(row, index), prompt=prompt, answer=canonical_call(action, arguments),
                       demonstration=demonstration, meta={"api": str(row.get("name") or "")})

    def extract_answer(self, completion: str) -> str | None:
        """The first call as a canonical string; None without an action or a parsable JSON input."""
        actions = list(_ACTION_RE.finditer(completion))
        if not actions or not actions[0].group(1).strip():
            return None
        end = actions[1].start() if len(actions) > 1 else len(completion)
        found = _ACTION_INPUT_RE.search(completion, actions[0].end(), end)
        if found is None:
            return None
        try:
            arguments, _ = json.JSONDecoder().raw_decode(completion[found.end():end])
        except json.JSONDecodeError:
            return None
        return canonical_call(actions[0].group(1).strip(), arguments)

    def is_correct(self, example: Example, answer: str | None) -> bool:
        return answer is not None and answer == example.answer
