"""The ToolAlpaca converter: the release format (one record per API) -> CaOPD tool-use rows (one per instruction)."""

import ast
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from caopd.errors import CaopdInputError
from caopd.io import write_jsonl
from caopd.method.protocol import TOOLUSE_CONFIDENCE_INSTRUCTION, parse_confidence
from caopd.tasks import get_task
from caopd.tasks.datasets import load_examples
from caopd.tasks.toolalpaca import convert_toolalpaca, toolalpaca_rows
from caopd.tasks.tooluse import parse_gold_calls

ROOT = Path(__file__).resolve().parents[1]
# The release's real-API evaluation file, vendored (Apache-2.0): 11 APIs, 114 instructions.
EVAL_REAL = ROOT / "data" / "toolalpaca" / "eval_real.json"
# A two-API release the project wrote itself; the first record writes its lists as Python-literal strings.
SMALL_RELEASE = Path(__file__).with_name("fixtures") / "tasks" / "toolalpaca_release.json"

# The official template filled by hand for the fixture's first instruction (docs/paper-setup.md): the space before
# the first newline, the documentation without its trailing newline, then a blank line.
OPEN_METEO_PROMPT = (
    "Your task is to answer the user's question using available tools. \n"
    "You have access to the following tools:\n"
    "Name: Open Meteo\n"
    "Description: Free weather forecasts.\n"
    "Documentation:\n"
    "getForecast: Get the forecast for a city\n"
    'Parameters: {"city": "Required. string.", "days": "integer."}\n'
    "Output: Success.\n"
    "\n"
    "Use the following format:\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of the tool names.\n"
    "Action Input: the input to the action, must be in JSON format. All of the action input must be realistic and "
    "from the user.\n"
    "\n"
    "Begin!\n"
    "Question: Will it rain in Paris tomorrow?"
)


@pytest.fixture(scope="module")
def real_rows():
    return convert_toolalpaca(EVAL_REAL)


def test_the_small_release_row_by_row():
    rows = convert_toolalpaca(SMALL_RELEASE)
    assert [r["id"] for r in rows] == ["open-meteo-0", "open-meteo-1", "cat-facts-0"]
    first = rows[0]
    assert first["prompt"] == OPEN_METEO_PROMPT
    assert first["golden_answer"] == "[{'Action': 'getForecast', 'Action_Input': '{\"city\": \"Paris\", \"days\": 1}'}]"
    assert first["golden_response"] == ["Action: getForecast", 'Action Input: {"city": "Paris", "days": 1}']
    assert (first["name"], first["description"], first["instruction"]) == (
        "Open Meteo", "Free weather forecasts.", "Will it rain in Paris tomorrow?")
    assert first["nl_documentation"].endswith("Output: Success.\n")  # the column keeps the release's text
    assert rows[1]["golden_response"] == ["Action: getForecast", 'Action Input: {"city": "Oslo", "days": 3}',
                                          "Action: getForecast", 'Action Input: {"city": "Rome", "days": 3}']
    # the second record writes its lists as lists: the same rows come out
    assert rows[2]["golden_answer"] == "[{'Action': 'getFact', 'Action_Input': '{}'}]"
    assert rows[2]["golden_response"] == ["Action: getFact", "Action Input: {}"]


def test_the_real_release_gives_114_rows(real_rows):
    assert len(real_rows) == 114
    assert len({r["id"] for r in real_rows}) == 114
    release = json.loads(EVAL_REAL.read_text(encoding="utf-8"))
    assert Counter(r["name"] for r in real_rows) == {rec["Name"]: len(rec["Instructions"]) for rec in release}
    assert real_rows[0]["id"] == "nager-date-0" and real_rows[-1]["id"] == "currencybeacon-10"
    for row in real_rows:
        assert set(row) == {"id", "prompt", "golden_answer", "name", "description", "nl_documentation",
                            "instruction", "golden_response"}
        assert row["prompt"].endswith("\n\nBegin!\nQuestion: " + row["instruction"])
        assert "Documentation:\n" + row["nl_documentation"].removesuffix("\n") + "\n\nUse the" in row["prompt"]
        assert "confidence" not in row["prompt"].lower()  # the task adds the instruction, not the converter
        # golden_answer is a Python-literal string that reads back as the release's calls
        assert isinstance(row["golden_answer"], str) and isinstance(ast.literal_eval(row["golden_answer"]), list)
    by_api = {rec["Name"]: rec for rec in release}
    for row in real_rows:
        index = int(row["id"].rsplit("-", 1)[1])
        assert ast.literal_eval(row["golden_answer"]) == by_api[row["name"]]["Golden_Answers"][index]


def test_every_real_row_loads_and_its_demonstration_verifies(real_rows, tmp_path):
    task = get_task("tooluse")
    path = tmp_path / "toolalpaca.jsonl"
    write_jsonl(path, real_rows)  # the rows survive a JSONL file, as `caopd convert` writes them
    examples = load_examples(path, task)
    assert len(examples) == 114
    for example, row in zip(examples, real_rows):
        calls = parse_gold_calls(row["golden_answer"])
        assert len(example.meta["gold_calls"]) == len(calls) and example.meta["api"] == row["name"]
        assert example.demonstration == "\n".join(row["golden_response"]) + "\nConfidence: 1.00"
        assert parse_confidence(example.demonstration) == 1.0
        assert task.verify(example, example.demonstration), example.id
        assert task.extra_checks(example, example.demonstration) == {"all_calls": True}, example.id
        assert example.prompt == row["prompt"].replace(
            "\n\nBegin!\n", "\n" + TOOLUSE_CONFIDENCE_INSTRUCTION + "\n\nBegin!\n", 1)
    assert sum(len(e.meta["gold_calls"]) > 1 for e in examples) == 20  # multi-call instructions


def _release_file(tmp_path, records) -> Path:
    path = tmp_path / "release.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


GOOD = {"Name": "Cat Facts", "Description": "Cats.", "NLDocumentation": "getFact: a fact\n",
        "Instructions": "['Tell me a cat fact.']", "Golden_Answers": "[[{'Action': 'getFact', 'Action_Input': '{}'}]]"}


@pytest.mark.parametrize("record, field, detail", [
    ({k: v for k, v in GOOD.items() if k != "Name"}, "Name", "missing"),
    ({**GOOD, "Name": "  "}, "Name", "is empty"),
    ({**GOOD, "Description": 3}, "Description", "expected a string"),
    ({**GOOD, "NLDocumentation": None}, "NLDocumentation", "missing"),
    ({**GOOD, "Instructions": "['Tell me a cat fact.'"}, "Instructions", "not a Python literal"),
    ({**GOOD, "Instructions": "'Tell me a cat fact.'"}, "Instructions", "expected a list, got str"),
    ({**GOOD, "Instructions": "[3]"}, "Instructions", "instruction 0: expected a non-empty string"),
    ({**GOOD, "Instructions": "['a', 'b']"}, "Golden_Answers", "has 1 entries for 2 Instructions"),
    ({**GOOD, "Golden_Answers": "[[{'Action_Input': '{}'}]]"}, "Golden_Answers", "answer 0: call 0: missing 'Action'"),
    ({**GOOD, "Golden_Answers": "[[]]"}, "Golden_Answers", "answer 0: expected a non-empty list"),
    ("not a record", "Name", "expected an API record"),
])
def test_bad_records_name_file_row_and_field(tmp_path, record, field, detail):
    path = _release_file(tmp_path, [GOOD, record])
    with pytest.raises(CaopdInputError) as info:
        convert_toolalpaca(path)
    message = str(info.value)
    assert message.startswith(f"{path}: row 1: field '{field}': ") and detail in message


def test_bad_files(tmp_path):
    with pytest.raises(CaopdInputError, match="expected a JSON list of API records"):
        convert_toolalpaca(_release_file(tmp_path, {"Name": "x"}))
    with pytest.raises(CaopdInputError, match="holds no API records"):
        convert_toolalpaca(_release_file(tmp_path, []))
    with pytest.raises(CaopdInputError, match=r"row 1: field 'Name': .*same row ids as record 0"):
        convert_toolalpaca(_release_file(tmp_path, [GOOD, {**GOOD, "Name": "cat facts!"}]))
    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(CaopdInputError, match="invalid JSON"):
        convert_toolalpaca(broken)
    with pytest.raises(CaopdInputError, match="cannot read"):
        convert_toolalpaca(tmp_path / "missing.json")
    assert toolalpaca_rows([GOOD], "<records>")[0]["id"] == "cat-facts-0"


def test_the_converter_is_torch_free():
    code = "import sys, caopd.tasks.toolalpaca; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
