from pathlib import Path

import pytest

from caopd.errors import CaopdInputError
from caopd.io import write_jsonl
from caopd.method.protocol import parse_confidence
from caopd.tasks import get_task, task_names
from caopd.tasks.datasets import load_examples

CHEMISTRY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sciknoweval_chemistry_eval"
# The first six rows of that dataset, verbatim, so the verifier is pinned on real rows in any checkout.
CHEMISTRY_ROWS = Path(__file__).with_name("fixtures") / "sciknoweval_chemistry_rows.jsonl"


def test_builtin_tasks_are_registered():
    assert {"arithmetic", "mcq", "tooluse"} <= set(task_names())


def test_unknown_task_is_an_input_error():
    with pytest.raises(CaopdInputError, match="unknown task 'nope'"):
        get_task("nope")


# ---------------------------------------------------------------- arithmetic


@pytest.fixture
def arith():
    task = get_task("arithmetic")
    return task, task.examples_from_rows([{"id": "q", "prompt": "12*34=", "answer": "408"}])[0]


@pytest.mark.parametrize("completion, correct", [
    ("408\nConfidence: 0.90", True),
    ("408", True),  # no confidence line: still judged on the answer
    ("  408  \nConfidence: 10%", True),
    ("407\nConfidence: 0.99", False),
    ("4080\nConfidence: 0.99", False),
    ("\nConfidence: 0.99", False),  # no answer
    ("", False),
])
def test_arithmetic_verifier(arith, completion, correct):
    task, example = arith
    assert task.verify(example, completion) is correct


def test_arithmetic_demonstration_verifies(arith):
    task, example = arith
    assert task.verify(example, example.demonstration)
    assert parse_confidence(example.demonstration) == 1.0


# ---------------------------------------------------------------- mcq (real rows)


@pytest.fixture(scope="module")
def chemistry():
    if not CHEMISTRY.is_dir():
        pytest.skip(f"shared dataset not available at {CHEMISTRY}")
    task = get_task("mcq")
    return task, load_examples(CHEMISTRY, task)


def test_mcq_loads_all_real_rows(chemistry):
    _, examples = chemistry
    assert len(examples) == 507
    first = examples[0]
    assert first.id == "0" and first.answer == "A"
    assert [m["role"] for m in first.prompt] == ["system", "user"]
    assert all(type(m) is dict and set(m) == {"role", "content"} for m in first.prompt)
    assert {e.answer for e in examples} == {"A", "B", "C", "D"}


def test_fixture_rows_are_the_datasets_first_rows(chemistry):
    _, examples = chemistry
    fixture = load_examples(CHEMISTRY_ROWS, get_task("mcq"))
    assert [(e.prompt, e.answer) for e in fixture] == [(e.prompt, e.answer) for e in examples[:len(fixture)]]


@pytest.mark.parametrize("index", range(6))
def test_mcq_verifier_on_real_rows(index):
    task = get_task("mcq")
    example = load_examples(CHEMISTRY_ROWS, task)[index]
    other = "B" if example.answer != "B" else "C"
    assert task.verify(example, example.demonstration)
    assert parse_confidence(example.demonstration) == 1.0
    assert not task.verify(example, f"<reasoning>...</reasoning>\n<answer>{other}</answer>\nConfidence: 0.9")
    assert task.verify(example, f"<answer>\n{example.answer.lower()}\n</answer>\nConfidence: 0.6")
    # the last tag wins, both ways
    assert task.verify(example, f"<answer>{other}</answer> on reflection <answer>{example.answer}</answer>")
    assert not task.verify(example, f"<answer>{example.answer}</answer> no: <answer>{other}</answer>")
    # a last tag that is not a single letter is no answer; an earlier tag does not stand in for it
    hedged = f"<answer>{example.answer}</answer> <answer>{example.answer} or {other}</answer>"
    assert not task.verify(example, hedged)
    assert not task.verify(example, f"The answer is {example.answer}.\nConfidence: 0.9")
    assert task.extract_answer("no tag at all") is None


@pytest.mark.parametrize("row, field", [
    ({"prompt": [], "answer": "A"}, "prompt"),
    ({"prompt": "What is 2+2?", "answer": "A"}, "prompt"),
    ({"prompt": [{"role": "system", "content": "be brief"}], "answer": "A"}, "prompt"),  # no user message
    ({"prompt": [{"role": "user", "content": 3}], "answer": "A"}, "prompt"),
    ({"prompt": [{"role": "user", "content": "q"}], "answer": "AB"}, "answer"),
    ({"prompt": [{"role": "user", "content": "q"}], "answer": "1"}, "answer"),
    ({"prompt": [{"role": "user", "content": "q"}], "answer": 1}, "answer"),
])
def test_mcq_validation(tmp_path, row, field):
    path = tmp_path / "mcq.jsonl"
    write_jsonl(path, [row])
    with pytest.raises(CaopdInputError) as info:
        load_examples(path, get_task("mcq"))
    assert str(info.value).startswith(f"{path}: row 0: field '{field}'")


# ---------------------------------------------------------------- tooluse (ToolAlpaca fixtures)

TOOL_PROMPT = (
    "Your task is to answer the user's question using available tools.\n"
    "You have access to the following tools:\n"
    "getWeatherForecast: Get the weather forecast for a city.\n"
    "Parameters: {\"city\": \"Required. string.\", \"days\": \"Optional. integer.\", \"units\": \"Optional.\"}\n"
    "Use the following format:\nThought: ...\nAction: ...\nAction Input: ...\n\n"
    "Question: What will the weather be in Paris over the next 3 days, in Celsius?"
)

TOOL_ROW = {
    "id": "weather-0",
    "prompt": TOOL_PROMPT,
    "name": "Open-Meteo",
    "description": "Free weather forecast API.",
    "nl_documentation": "getWeatherForecast: Get the weather forecast for a city. Parameters: city, days, units.",
    "instruction": "What will the weather be in Paris over the next 3 days, in Celsius?",
    "golden_answer": ("[{'Action': 'getWeatherForecast', "
                      "'Action_Input': '{\"city\": \"Paris\", \"days\": 3, \"units\": \"metric\"}'}, "
                      "{'Action': 'getCurrentWeather', 'Action_Input': '{\"city\": \"Paris\"}'}]"),
}


@pytest.fixture
def tool():
    task = get_task("tooluse")
    return task, task.examples_from_rows([TOOL_ROW])[0]


@pytest.mark.parametrize("completion, correct", [
    # key order and whitespace do not matter
    ('Thought: I need the forecast.\nAction: getWeatherForecast\n'
     'Action Input: {"units": "metric", "city": "Paris", "days": 3}\nConfidence: 0.8', True),
    ('ASSISTANT Thought: ok\nASSISTANT Action: getWeatherForecast\nASSISTANT Action Input: {\n  "city":"Paris",\n'
     '  "days": 3, "units": "metric"\n}\nASSISTANT Observation: ...', True),
    # wrong action
    ('Action: getCurrentWeather\nAction Input: {"city": "Paris", "days": 3, "units": "metric"}', False),
    # wrong input: a value, a missing key, a type
    ('Action: getWeatherForecast\nAction Input: {"city": "Lyon", "days": 3, "units": "metric"}', False),
    ('Action: getWeatherForecast\nAction Input: {"city": "Paris", "days": 3}', False),
    ('Action: getWeatherForecast\nAction Input: {"city": "Paris", "days": "3", "units": "metric"}', False),
    # only the first call counts
    ('Action: getCurrentWeather\nAction Input: {"city": "Paris"}\nObservation: sunny\n'
     'Action: getWeatherForecast\nAction Input: {"city": "Paris", "days": 3, "units": "metric"}', False),
    # the first action's input must follow it, not a later action's
    ('Action: getWeatherForecast\nThought: hmm\nAction: other\n'
     'Action Input: {"city": "Paris", "days": 3, "units": "metric"}', False),
    # unparsable input, no action
    ("Action: getWeatherForecast\nAction Input: {city: Paris}", False),
    ('Action Input: {"city": "Paris", "days": 3, "units": "metric"}', False),
    ("I don't know.\nConfidence: 0.1", False),
])
def test_tooluse_verifier(tool, completion, correct):
    task, example = tool
    assert task.verify(example, completion) is correct


def test_tooluse_demonstration_and_canonical_answer(tool):
    task, example = tool
    assert example.answer == 'getWeatherForecast {"city":"Paris","days":3,"units":"metric"}'
    assert example.demonstration.startswith("Action: getWeatherForecast\nAction Input: {")
    assert task.verify(example, example.demonstration)
    assert parse_confidence(example.demonstration) == 1.0
    assert example.meta == {"api": "Open-Meteo"}


def test_tooluse_empty_input_and_dict_input_and_chat_prompt():
    task = get_task("tooluse")
    row = {**TOOL_ROW, "prompt": [{"role": "system", "content": "tools..."}, {"role": "user", "content": "hi"}],
           "golden_answer": "[{'Action': 'listCities', 'Action_Input': '{}'}]"}
    dict_row = {**TOOL_ROW, "id": "d", "golden_answer": "[{'Action': 'listCities', 'Action_Input': {}}]"}
    examples = task.examples_from_rows([row, dict_row])
    for example in examples:
        assert task.verify(example, "Action: listCities\nAction Input: {}\nConfidence: 0.5")
        assert not task.verify(example, "Action: listCities\nAction Input: []")
    assert examples[0].prompt[1] == {"role": "user", "content": "hi"}


@pytest.mark.parametrize("golden_answer, detail", [
    ("[{'Action': 'getWeatherForecast', 'Action_Input': '{}'", "not a Python literal"),
    ("[]", "non-empty list"),
    ("{'Action': 'getWeatherForecast', 'Action_Input': '{}'}", "non-empty list"),
    ("[{'Action_Input': '{}'}]", "call 0: missing 'Action'"),
    ("[{'Action': 'getWeatherForecast'}]", "call 0: missing 'Action_Input'"),
    ("[{'Action': 'getWeatherForecast', 'Action_Input': '{city: Paris}'}]", "not valid JSON"),
])
def test_tooluse_malformed_golden_answer(tmp_path, golden_answer, detail):
    path = tmp_path / "tools.jsonl"
    write_jsonl(path, [TOOL_ROW, {**TOOL_ROW, "id": "bad", "golden_answer": golden_answer}])
    with pytest.raises(CaopdInputError) as info:
        load_examples(path, get_task("tooluse"))
    message = str(info.value)
    assert message.startswith(f"{path}: row 1: field 'golden_answer':") and detail in message
