from pathlib import Path

import pytest

from caopd.errors import CaopdInputError
from caopd.io import write_jsonl
from caopd.method.protocol import (
    MCQ_CONFIDENCE_INSTRUCTION,
    TOOLUSE_CONFIDENCE_INSTRUCTION,
    parse_confidence,
)
from caopd.tasks import get_task, task_names
from caopd.tasks.datasets import load_examples

CHEMISTRY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sciknoweval_chemistry_eval"
# The first six rows of that dataset, verbatim, so the verifier is pinned on real rows in any checkout.
CHEMISTRY_ROWS = Path(__file__).with_name("fixtures") / "sciknoweval_chemistry_rows.jsonl"
# Three science questions the project wrote itself, in the official TRAINING format (messages + output_text).
SCIENCE_TRAIN_ROWS = Path(__file__).with_name("fixtures") / "tasks" / "science_train_rows.jsonl"


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


Q = [{"role": "user", "content": "q"}]


@pytest.mark.parametrize("row, field", [
    ({"prompt": [], "answer": "A"}, "prompt"),
    ({"prompt": "   ", "answer": "A"}, "prompt"),
    ({"prompt": [{"role": "system", "content": "be brief"}], "answer": "A"}, "prompt"),  # no user message
    ({"prompt": [{"role": "user", "content": 3}], "answer": "A"}, "prompt"),
    ({"prompt": Q, "answer": "AB"}, "answer"),
    ({"prompt": Q, "answer": "1"}, "answer"),
    ({"prompt": Q, "answer": 1}, "answer"),
    ({"answer": "A"}, "prompt"),  # neither prompt nor messages: the error names prompt
    ({"prompt": None, "messages": None, "answer": "A"}, "prompt"),
    ({"prompt": Q}, "answer"),  # neither answer nor output_text
    ({"messages": "q", "output_text": "<answer>A</answer>"}, "messages"),  # messages must be chat messages
    ({"messages": Q, "output_text": "The answer is A."}, "output_text"),  # no <answer> tag
    ({"messages": Q, "output_text": "<answer>A or B</answer>"}, "output_text"),
    ({"messages": Q, "output_text": 7}, "output_text"),
    ({"prompt": Q, "answer": "A", "output_text": "<answer>B</answer>"}, "output_text"),  # disagrees with answer
])
def test_mcq_validation(tmp_path, row, field):
    path = tmp_path / "mcq.jsonl"
    write_jsonl(path, [row])
    with pytest.raises(CaopdInputError) as info:
        load_examples(path, get_task("mcq"))
    assert str(info.value).startswith(f"{path}: row 0: field '{field}'")


def test_mcq_missing_columns_are_named_like_required_columns(tmp_path):
    path = tmp_path / "mcq.jsonl"
    write_jsonl(path, [{"question": "q", "answer": "A"}])
    with pytest.raises(CaopdInputError) as info:
        load_examples(path, get_task("mcq"))
    assert str(info.value) == (f"{path}: row 0: field 'prompt': missing required column for task 'mcq' "
                               "(needs prompt or messages)")


def test_mcq_string_prompt_gets_the_instruction_after_a_blank_line():
    [example] = get_task("mcq").examples_from_rows([{"prompt": "Which is a noble gas?\nA: Ne\nB: Na", "answer": "a"}])
    assert example.prompt == "Which is a noble gas?\nA: Ne\nB: Na\n\n" + MCQ_CONFIDENCE_INSTRUCTION
    assert example.answer == "A"


def test_mcq_instruction_goes_to_the_last_user_message_only():
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
              {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2\n"}]
    [example] = get_task("mcq").examples_from_rows([{"prompt": prompt, "answer": "B"}])
    assert example.prompt[:3] == prompt[:3]
    assert example.prompt[3] == {"role": "user", "content": "q2\n\n" + MCQ_CONFIDENCE_INSTRUCTION}
    assert prompt[3]["content"] == "q2\n"  # the row is not modified


@pytest.mark.parametrize("options, expected_tail", [
    ({}, "\n\n" + MCQ_CONFIDENCE_INSTRUCTION),
    ({"ask_confidence": False}, ""),
    ({"confidence_instruction": "End with Confidence: X."}, "\n\nEnd with Confidence: X."),
    ({"confidence_instruction": None}, "\n\n" + MCQ_CONFIDENCE_INSTRUCTION),
    ({"confidence_instruction": ""}, "\n\n" + MCQ_CONFIDENCE_INSTRUCTION),  # empty = the task's own
    ({"ask_confidence": False, "confidence_instruction": "End with Confidence: X."}, ""),
])
def test_task_confidence_options(options, expected_tail):
    [example] = get_task("mcq", **options).examples_from_rows([{"prompt": Q, "answer": "A"}])
    assert example.prompt[-1]["content"] == "q" + expected_tail


def test_a_prompt_that_already_asks_is_left_alone():
    asking = [{"role": "system", "content": "End your answer with a line CONFIDENCE: <number>."},
              {"role": "user", "content": "q"}]
    [example] = get_task("mcq").examples_from_rows([{"prompt": asking, "answer": "A"}])
    assert example.prompt == asking


def test_options_reach_every_task_and_a_bad_instruction_is_refused():
    for name in ("arithmetic", "mcq", "tooluse"):
        task = get_task(name, ask_confidence=False, confidence_instruction="x")
        assert task.ask_confidence is False and task.confidence_instruction == "x"
    with pytest.raises(CaopdInputError, match="field 'confidence_instruction'"):
        get_task("mcq", confidence_instruction=3)


def test_arithmetic_prompts_never_change():
    for options in ({}, {"confidence_instruction": "Confidence: X please"}):
        [example] = get_task("arithmetic", **options).examples_from_rows([{"prompt": "12*34=", "answer": "408"}])
        assert example.prompt == "12*34="
        assert example.demonstration == "408\nConfidence: 1.00"


# ---------------------------------------------------------------- mcq: the extraction rules, one by one


@pytest.mark.parametrize("completion, letter", [
    # 1. closed tags, any case: the last one decides
    ("<answer>B</answer>", "B"),
    ("<ANSWER> c </Answer>", "C"),
    ("<answer>\n(D).\n</answer>", "D"),
    ("<answer>A</answer> on reflection <answer>B</answer>", "B"),
    ("<answer>A</answer> <answer>A or B</answer>", None),  # a last tag that is not one letter: no answer
    ("<answer>A or B</answer>\nAnswer: A", None),  # ... and no fallback stands in for it
    # 2. an unclosed tag: the letter right after the last open tag
    ("<reasoning>...</reasoning>\n<answer>\nC", "C"),
    ("<answer>B: the ester", "B"),
    ("<answer>The ester", None),  # not a letter standing alone
    # 3. "Answer: X", any case, the letter ending its line, the last such line
    ("Answer: B\nConfidence: 0.4", "B"),
    ("answer: (c).", "C"),
    ("Answer: A\nHmm, no.\nFinal answer: D", "D"),
    ("Answer: A compound with two rings", None),
    ("The answer is B.", None),
    # 4. a bare letter once confidence statements are removed
    ("B", "B"),
    ("  (c)\n", "C"),
    ("D.\nConfidence: 80%", "D"),
    ("<confidence>0.3</confidence>\nA", "A"),
    ("B because", None),
    ("", None),
    # the answer part only: a thinking block's tags never count
    ("<think>Maybe <answer>A</answer>.</think>\n<answer>B</answer>\nConfidence: 0.7", "B"),
    ("<think>Maybe <answer>A</answer>.</think>\nI am not sure.", None),
    ("<think>It must be <answer>A</answer>", None),  # cut while thinking: no answer part
])
def test_mcq_extraction_rules(completion, letter):
    assert get_task("mcq").extract_answer(completion) == letter


def test_mcq_training_format_rows():
    task = get_task("mcq")
    examples = load_examples(SCIENCE_TRAIN_ROWS, task)
    assert [e.answer for e in examples] == ["B", "C", "A"]  # the last <answer> of output_text
    for example in examples:
        assert example.demonstration.endswith("</answer>\nConfidence: 1.00")
        assert task.verify(example, example.demonstration)
        assert example.prompt[0]["role"] == "system"
        assert example.prompt[1]["content"].endswith("\n\n" + MCQ_CONFIDENCE_INSTRUCTION)
    # the third one names B in its reasoning first; the last tag is the gold
    assert "<answer>B</answer> looked tempting" in examples[2].demonstration


def test_mcq_output_text_is_the_demonstration_in_the_eval_format_too():
    row = {"prompt": Q, "answer": "c", "output_text": "Because.\n<answer>C</answer>\nconfidence: 0.9"}
    [example] = get_task("mcq").examples_from_rows([row])
    assert example.demonstration == "Because.\n<answer>C</answer>\nconfidence: 0.9"  # it states one: kept
    assert example.answer == "C"


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
    # synthesised from every gold call, in order
    assert example.demonstration == ('Action: getWeatherForecast\nAction Input: {"city": "Paris", "days": 3, '
                                     '"units": "metric"}\nAction: getCurrentWeather\nAction Input: {"city": "Paris"}'
                                     "\nConfidence: 1.00")
    assert task.verify(example, example.demonstration)
    assert task.extra_checks(example, example.demonstration) == {"all_calls": True}
    assert parse_confidence(example.demonstration) == 1.0
    assert example.meta == {"api": "Open-Meteo", "gold_calls": [
        'getWeatherForecast {"city":"Paris","days":3,"units":"metric"}', 'getCurrentWeather {"city":"Paris"}']}
    # no Begin! anchor in this prompt: the instruction follows the question after a blank line
    assert example.prompt == TOOL_PROMPT + "\n\n" + TOOLUSE_CONFIDENCE_INSTRUCTION


@pytest.mark.parametrize("completion, first, all_calls", [
    # both calls, either order; reordered and indented JSON
    ('Action: getWeatherForecast\nAction Input: {"units": "metric", "city": "Paris", "days": 3}\n'
     'Action: getCurrentWeather\nAction Input: {\n  "city": "Paris"\n}\nConfidence: 0.8', True, True),
    ('Action: getCurrentWeather\nAction Input: {"city": "Paris"}\n'
     'Action: getWeatherForecast\nAction Input: {"city": "Paris", "days": 3, "units": "metric"}', False, True),
    # one call only, a call too many, a call twice
    ('Action: getWeatherForecast\nAction Input: {"city": "Paris", "days": 3, "units": "metric"}', True, False),
    ('Action: getWeatherForecast\nAction Input: {"city": "Paris", "days": 3, "units": "metric"}\n'
     'Action: getCurrentWeather\nAction Input: {"city": "Paris"}\nAction: getCurrentWeather\n'
     'Action Input: {"city": "Paris"}', True, False),
    # a malformed second call spoils all_calls, not the first call
    ('Action: getWeatherForecast\nAction Input: {"city": "Paris", "days": 3, "units": "metric"}\n'
     'Action: getCurrentWeather\nAction Input: {"city": "Paris"', True, False),
    ('Action: getWeatherForecast\nAction Input: {"city": "Paris", "days": 3, "units": "metric"}\n'
     'Action: getCurrentWeather\nThought: forgot the input', True, False),
    # the keys in any case; "Action_Input:" as the official scorer reads it
    ('ACTION: getWeatherForecast\naction input: {"city": "Paris", "days": 3, "units": "metric"}\n'
     'action: getCurrentWeather\nAction_Input: {"city": "Paris"}', True, True),
    # calls in the thinking block do not count
    ('<think>Action: getCurrentWeather\nAction Input: {"city": "Paris"}</think>\n'
     'Action: getWeatherForecast\nAction Input: {"city": "Paris", "days": 3, "units": "metric"}', True, False),
    ('<think>Action: getWeatherForecast\nAction Input: {"city": "Paris", "days": 3, "units": "metric"}', False,
     False),
    ("", False, False),
])
def test_tooluse_first_call_and_all_calls(tool, completion, first, all_calls):
    task, example = tool
    assert task.verify(example, completion) is first
    assert task.extra_checks(example, completion) == {"all_calls": all_calls}


def test_tooluse_instruction_goes_before_the_begin_anchor():
    task = get_task("tooluse")
    prompt = "Tools: f.\nUse the following format:\nAction: ...\n\nBegin!\nQuestion: q"
    [example] = task.examples_from_rows([{**TOOL_ROW, "prompt": prompt}])
    assert example.prompt == ("Tools: f.\nUse the following format:\nAction: ...\n"
                              + TOOLUSE_CONFIDENCE_INSTRUCTION + "\n\nBegin!\nQuestion: q")
    # in a chat prompt, in whichever message holds the anchor (here the system message)
    chat = [{"role": "system", "content": "Tools: f.\n\nBegin!\n"}, {"role": "user", "content": "Question: q"}]
    [example] = task.examples_from_rows([{**TOOL_ROW, "prompt": chat}])
    assert example.prompt == [{"role": "system", "content": "Tools: f.\n" + TOOLUSE_CONFIDENCE_INSTRUCTION
                               + "\n\nBegin!\n"}, {"role": "user", "content": "Question: q"}]
    # a prompt that already asks keeps its own line; ask_confidence=False adds nothing
    asking = prompt.replace("Begin!", "confidence: a number\n\nBegin!")
    assert task.examples_from_rows([{**TOOL_ROW, "prompt": asking}])[0].prompt == asking
    assert get_task("tooluse", ask_confidence=False).examples_from_rows([{**TOOL_ROW, "prompt": prompt}])[0].prompt \
        == prompt


@pytest.mark.parametrize("extra, demonstration", [
    ({"golden_response": ["Thought: I need the forecast.", "Action: getWeatherForecast",
                          'Action Input: {"city": "Paris", "days": 3, "units": "metric"}']},
     'Thought: I need the forecast.\nAction: getWeatherForecast\n'
     'Action Input: {"city": "Paris", "days": 3, "units": "metric"}\nConfidence: 1.00'),
    ({"golden_response": 'Action: getWeatherForecast\nAction Input: {"city": "Paris", "days": 3, "units": "metric"}'
                         "\nConfidence: 0.9"},
     'Action: getWeatherForecast\nAction Input: {"city": "Paris", "days": 3, "units": "metric"}\nConfidence: 0.9'),
    ({"demonstration": 'Action: getWeatherForecast\nAction Input: {"days": 3, "city": "Paris", "units": "metric"}'},
     'Action: getWeatherForecast\nAction Input: {"days": 3, "city": "Paris", "units": "metric"}\nConfidence: 1.00'),
])
def test_tooluse_demonstration_columns(extra, demonstration):
    task = get_task("tooluse")
    [example] = task.examples_from_rows([{**TOOL_ROW, **extra}])
    assert example.demonstration == demonstration
    assert task.verify(example, example.demonstration)


@pytest.mark.parametrize("extra, field", [
    ({"golden_response": [1, 2]}, "golden_response"),
    ({"golden_response": []}, "golden_response"),
    ({"demonstration": 3}, "demonstration"),
])
def test_tooluse_bad_demonstration_columns(tmp_path, extra, field):
    path = tmp_path / "tools.jsonl"
    write_jsonl(path, [{**TOOL_ROW, **extra}])
    with pytest.raises(CaopdInputError) as info:
        load_examples(path, get_task("tooluse"))
    assert str(info.value).startswith(f"{path}: row 0: field '{field}'")


def test_tooluse_gold_input_that_is_not_json_is_compared_as_text():
    task = get_task("tooluse")
    broken = '{"base": "USD", "symbols": "symbols": "EUR"}'  # as four gold calls of the ToolAlpaca release
    [example] = task.examples_from_rows([{**TOOL_ROW, "golden_answer": repr([{"Action": "latest",
                                                                              "Action_Input": broken}])}])
    assert example.answer == "latest " + broken
    assert task.verify(example, f"Action: latest\nAction Input: {broken}\nConfidence: 0.3")
    assert task.verify(example, example.demonstration)
    assert not task.verify(example, 'Action: latest\nAction Input: {"base": "USD", "symbols": "EUR"}')


def test_tooluse_empty_input_and_dict_input_and_chat_prompt():
    task = get_task("tooluse")
    row = {**TOOL_ROW, "prompt": [{"role": "system", "content": "tools..."}, {"role": "user", "content": "hi"}],
           "golden_answer": "[{'Action': 'listCities', 'Action_Input': '{}'}]"}
    dict_row = {**TOOL_ROW, "id": "d", "golden_answer": "[{'Action': 'listCities', 'Action_Input': {}}]"}
    examples = task.examples_from_rows([row, dict_row])
    for example in examples:
        assert task.verify(example, "Action: listCities\nAction Input: {}\nConfidence: 0.5")
        assert not task.verify(example, "Action: listCities\nAction Input: []")
    assert examples[0].prompt[1] == {"role": "user", "content": "hi\n\n" + TOOLUSE_CONFIDENCE_INSTRUCTION}


@pytest.mark.parametrize("golden_answer, detail", [
    ("[{'Action': 'getWeatherForecast', 'Action_Input': '{}'", "not a Python literal"),
    ("[]", "non-empty list"),
    ("{'Action': 'getWeatherForecast', 'Action_Input': '{}'}", "non-empty list"),
    ("[{'Action_Input': '{}'}]", "call 0: missing 'Action'"),
    ("[{'Action': 'getWeatherForecast'}]", "call 0: missing 'Action_Input'"),
    ("[{'Action': 'getWeatherForecast', 'Action_Input': '  '}]", "call 0: 'Action_Input' is empty"),
    ("[{'Action': 'getWeatherForecast', 'Action_Input': f'{1}'}]", "not a Python literal"),
])
def test_tooluse_malformed_golden_answer(tmp_path, golden_answer, detail):
    path = tmp_path / "tools.jsonl"
    write_jsonl(path, [TOOL_ROW, {**TOOL_ROW, "id": "bad", "golden_answer": golden_answer}])
    with pytest.raises(CaopdInputError) as info:
        load_examples(path, get_task("tooluse"))
    message = str(info.value)
    assert message.startswith(f"{path}: row 1: field 'golden_answer':") and detail in message
