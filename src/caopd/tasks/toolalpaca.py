"""The ToolAlpaca release as CaOPD tool-use rows (torch-free).

The release (tangqiaoyu/ToolAlpaca, e.g. ``data/eval_real.json``) holds one record per API: ``Name``,
``Description``, ``NLDocumentation``, ``Instructions`` and ``Golden_Answers`` (lists, or Python-literal strings of
lists; ``Golden_Answers[i]`` is the list of ``{'Action', 'Action_Input'}`` calls for ``Instructions[i]``). The
CaOPD tool-use rows are one per instruction, with the official prompt template filled (docs/paper-setup.md). The
confidence instruction is not in the rows: the ``tooluse`` task adds it, as the official training code does.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from typing import Any

from caopd.errors import CaopdInputError
from caopd.io import PathLike, read_json
from caopd.tasks.base import FieldError
from caopd.tasks.tooluse import call_lines, parse_gold_calls

# The official template, verbatim: note the space before the first newline.
PROMPT_TEMPLATE = (
    "Your task is to answer the user's question using available tools. \n"
    "You have access to the following tools:\n"
    "Name: {name}\n"
    "Description: {description}\n"
    "Documentation:\n"
    "{nl_documentation}\n\n"
    "Use the following format:\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of the tool names.\n"
    "Action Input: the input to the action, must be in JSON format. All of the action input must be realistic "
    "and from the user.\n\n"
    "Begin!\n"
    "Question: {instruction}"
)


def toolalpaca_prompt(name: str, description: str, nl_documentation: str, instruction: str) -> str:
    """The official tool-use prompt for one instruction (``NLDocumentation`` loses its trailing newline)."""
    return PROMPT_TEMPLATE.format(name=name, description=description,
                                  nl_documentation=nl_documentation.removesuffix("\n"), instruction=instruction)


def slug(name: str) -> str:
    """``"Random Useless Facts"`` -> ``"random-useless-facts"``: lower case, runs of other characters as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "api"


def _text_field(record: Mapping[str, Any], field: str, *, allow_empty: bool = False) -> str:
    value = record.get(field)
    if value is None:
        raise FieldError(field, "missing")
    if not isinstance(value, str):
        raise FieldError(field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise FieldError(field, "is empty")
    return value


def _literal_list(record: Mapping[str, Any], field: str) -> list[Any]:
    """A list field, given as a list or as a Python-literal string of one (as the release writes them)."""
    value = record.get(field)
    if value is None:
        raise FieldError(field, "missing")
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as err:
            raise FieldError(field, f"not a Python literal ({err.__class__.__name__}: {err})") from None
    if not isinstance(value, list):
        raise FieldError(field, f"expected a list, got {type(value).__name__}")
    return value


def _record_rows(record: Any) -> list[dict[str, Any]]:
    """The rows of one API record; FieldError names the bad field."""
    if not isinstance(record, Mapping):
        raise FieldError("Name", f"expected an API record (a JSON object), got {type(record).__name__}")
    name = _text_field(record, "Name").strip()
    description = _text_field(record, "Description", allow_empty=True)
    nl_documentation = _text_field(record, "NLDocumentation")
    instructions = _literal_list(record, "Instructions")
    golden_answers = _literal_list(record, "Golden_Answers")
    if len(instructions) != len(golden_answers):
        raise FieldError("Golden_Answers", f"has {len(golden_answers)} entries for {len(instructions)} "
                                           "Instructions (Golden_Answers[i] belongs to Instructions[i])")
    rows = []
    for i, (instruction, calls) in enumerate(zip(instructions, golden_answers)):
        if not isinstance(instruction, str) or not instruction.strip():
            raise FieldError("Instructions", f"instruction {i}: expected a non-empty string")
        try:
            parsed = parse_gold_calls(calls)
        except FieldError as err:
            raise FieldError("Golden_Answers", f"answer {i}: {err.message}") from None
        rows.append({
            "id": f"{slug(name)}-{i}",
            "prompt": toolalpaca_prompt(name, description, nl_documentation, instruction),
            "golden_answer": calls if isinstance(calls, str) else repr(calls),
            "name": name,
            "description": description,
            "nl_documentation": nl_documentation,
            "instruction": instruction,
            # The release has no written thoughts, so the demonstration is the gold calls alone.
            "golden_response": call_lines(parsed),
        })
    return rows


def toolalpaca_rows(records: Sequence[Any], source: str) -> list[dict[str, Any]]:
    """One tool-use row per instruction of every API record.

    Each row: ``id`` (``{api-slug}-{i}``), ``prompt`` (the official template filled, without the confidence
    instruction), ``golden_answer`` (a Python-literal list of ``{'Action', 'Action_Input'}`` calls, as the released
    tool-use rows have it), ``name``, ``description``, ``nl_documentation``, ``instruction`` and ``golden_response``
    (the demonstration as a list of lines, ``Action: X`` and ``Action Input: {json}`` per gold call: the release
    has no written thoughts, so the demonstration is the calls alone). Bad input raises CaopdInputError naming
    ``source``, the record's index (row) and the field.
    """
    if not isinstance(records, list):
        raise CaopdInputError(f"expected a JSON list of API records, got {type(records).__name__}", file=source)
    if not records:
        raise CaopdInputError("holds no API records", file=source)
    rows: list[dict[str, Any]] = []
    first_record_of: dict[str, int] = {}
    for index, record in enumerate(records):
        try:
            record_rows = _record_rows(record)
        except FieldError as err:
            raise CaopdInputError(err.message, file=source, row=index, field=err.field) from None
        api = slug(str(record["Name"]))
        if api in first_record_of:
            raise CaopdInputError(f"API {record['Name']!r} gives the same row ids as record "
                                  f"{first_record_of[api]}", file=source, row=index, field="Name")
        first_record_of[api] = index
        rows += record_rows
    return rows


def convert_toolalpaca(path: PathLike) -> list[dict[str, Any]]:
    """The tool-use rows of a ToolAlpaca release file (a JSON list of API records); see :func:`toolalpaca_rows`."""
    return toolalpaca_rows(read_json(path), source=str(path))
