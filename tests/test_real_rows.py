"""Every verdict rule pinned on REAL rows: the chemistry evaluation set (skipped when ../shared is absent) and the
vendored ToolAlpaca release, each with hand-written completions of the shapes models produce (thinking blocks,
lower-case, tagged and percentage confidences, reordered and indented JSON, several calls, malformed ones)."""

from pathlib import Path

import pytest

from caopd.method.protocol import (
    MCQ_CONFIDENCE_INSTRUCTION,
    TOOLUSE_CONFIDENCE_INSTRUCTION,
    parse_confidence,
    replace_confidence,
    split_thinking,
)
from caopd.tasks import get_task
from caopd.tasks.datasets import load_examples
from caopd.tasks.toolalpaca import convert_toolalpaca

ROOT = Path(__file__).resolve().parents[1]
CHEMISTRY = ROOT.parent / "shared" / "data" / "sciknoweval_chemistry_eval"
EVAL_REAL = ROOT / "data" / "toolalpaca" / "eval_real.json"


# ---------------------------------------------------------------- chemistry (mcq)


@pytest.fixture(scope="module")
def chemistry():
    if not CHEMISTRY.is_dir():
        pytest.skip(f"shared dataset not available at {CHEMISTRY}")
    task = get_task("mcq")
    return task, {e.id: e for e in load_examples(CHEMISTRY, task)}


def test_every_chemistry_prompt_asks_once_and_every_demonstration_verifies(chemistry):
    task, examples = chemistry
    assert len(examples) == 507
    for example in examples.values():
        system, user = example.prompt
        assert system["role"] == "system" and "<answer>" in system["content"]  # the system message is untouched
        assert user["content"].endswith("\n\n" + MCQ_CONFIDENCE_INSTRUCTION)
        assert user["content"].count("Confidence:") == 1
        assert task.verify(example, example.demonstration)
    # an instruction already in the prompt is not added again: building from the built prompt changes nothing
    first = examples["0"]
    assert task.examples_from_rows([{"prompt": first.prompt, "answer": "A"}])[0].prompt == first.prompt


REASONING = "<reasoning>\nThe ester hydrolyses to the acid in the product.\n</reasoning>\n"

# (completion for row 0, whose gold is A; correct; stated confidence)
CHEMISTRY_CASES = [
    ("the format asked for", REASONING + "<answer>\nA\n</answer>\nConfidence: 0.85", True, 0.85),
    ("a thinking block that names another option and a confidence",
     "<think>\nB has the wrong ring. Maybe C? My confidence: 0.2 for now.\n<answer>C</answer>\n</think>\n\n"
     + REASONING + "<answer>A</answer>\nConfidence: 0.9", True, 0.9),
    ("cut while thinking: no answer part", "<think>\nThe answer is A.\n<answer>A</answer>\nConfidence: 0.9", False,
     None),
    ("lower-case confidence in percent", REASONING + "<answer>A</answer>\nconfidence: 70%", True, 0.7),
    ("a tagged confidence", REASONING + "<answer>A</answer>\n<confidence> 0.6 </confidence>", True, 0.6),
    ("a sentence's full stop after the number", REASONING + "<answer>A</answer>\nConfidence: 0.9.", True, 0.9),
    ("the last of several statements", REASONING + "<answer>A</answer>\nConfidence: 0.3\nConfidence: 0.65", True,
     0.65),
    ("the last tag wins", REASONING + "<answer>B</answer>\nOn reflection:\n<answer>A</answer>\nConfidence: 0.5",
     True, 0.5),
    ("... both ways", REASONING + "<answer>A</answer>\nNo:\n<answer>D</answer>\nConfidence: 0.5", False, 0.5),
    ("tags in upper case", REASONING + "<ANSWER>a</ANSWER>\nCONFIDENCE: 1", True, 1.0),
    ("a hedged last tag is no answer", REASONING + "<answer>A or B</answer>\nConfidence: 0.5", False, 0.5),
    ("an unclosed tag", REASONING + "<answer>\nA\nConfidence: 0.4", True, 0.4),
    ("Answer: X", "The ester is the reactant.\nAnswer: A\nConfidence: 0.8", True, 0.8),
    ("a bare letter", "(A)\nConfidence: 75 %", True, 0.75),
    ("prose only", "The answer is A, since the ester hydrolyses.\nConfidence: 0.9", False, 0.9),
    ("a wrong letter", REASONING + "<answer>\nC\n</answer>\nConfidence: 0.99", False, 0.99),
    ("no confidence", REASONING + "<answer>A</answer>", True, None),
]


@pytest.mark.parametrize("completion, correct, confidence", [c[1:] for c in CHEMISTRY_CASES],
                         ids=[c[0] for c in CHEMISTRY_CASES])
def test_chemistry_verdicts(chemistry, completion, correct, confidence):
    task, examples = chemistry
    example = examples["0"]
    assert example.answer == "A"
    assert task.verify(example, completion) is correct
    assert parse_confidence(completion) == confidence
    assert task.extra_checks(example, completion) == {}


def test_chemistry_other_gold_letters(chemistry):
    task, examples = chemistry
    for row, gold in (("1", "C"), ("3", "B"), ("4", "A")):
        example = examples[row]
        assert example.answer == gold
        assert task.verify(example, f"<think>\nLet me add the masses.\n</think>\n\n<answer>{gold}</answer>\n"
                                    "Confidence: 0.5")
        assert not task.verify(example, f"<answer>{'D' if gold != 'D' else 'A'}</answer>\nConfidence: 0.5")


def test_the_caopd_edit_on_a_real_chemistry_completion(chemistry):
    task, examples = chemistry
    completion = CHEMISTRY_CASES[1][1]
    edited = replace_confidence(completion, 0.375)
    assert split_thinking(edited)[0] == split_thinking(completion)[0]  # the thinking block, byte for byte
    assert edited == completion.removesuffix("Confidence: 0.9") + "Confidence: 0.38"
    assert parse_confidence(edited) == 0.38 and task.verify(examples["0"], edited)


# ---------------------------------------------------------------- ToolAlpaca (tooluse)


@pytest.fixture(scope="module")
def toolalpaca():
    task = get_task("tooluse")
    return task, {e.id: e for e in task.examples_from_rows(convert_toolalpaca(EVAL_REAL), source=str(EVAL_REAL))}


def test_every_toolalpaca_prompt_asks_once_before_begin(toolalpaca):
    _, examples = toolalpaca
    assert len(examples) == 114
    for example in examples.values():
        assert example.prompt.count(TOOLUSE_CONFIDENCE_INSTRUCTION) == 1
        assert ("from the user.\n" + TOOLUSE_CONFIDENCE_INSTRUCTION + "\n\nBegin!\nQuestion: ") in example.prompt


# (example id, completion, first call correct, all calls correct, stated confidence)
TOOL_CASES = [
    ("the format asked for", "nager-date-0",
     'Thought: I should check today.\nAction: PublicHolidayIsTodayPublicHoliday\nAction Input: {"countryCode": "CN"}'
     "\nConfidence: 0.9", True, True, 0.9),
    ("a thinking block with a different call and a confidence", "nager-date-0",
     '<think>\nMaybe Action: CountryCountryInfo\nAction Input: {"countryCode": "CN"}\nConfidence: 0.2\n</think>\n\n'
     'Action: PublicHolidayIsTodayPublicHoliday\nAction Input: {"countryCode": "CN"}\nconfidence: 0.75',
     True, True, 0.75),
    ("cut while thinking", "nager-date-0",
     '<think>\nAction: PublicHolidayIsTodayPublicHoliday\nAction Input: {"countryCode": "CN"}', False, False, None),
    ("a wrong value", "nager-date-0",
     'Action: PublicHolidayIsTodayPublicHoliday\nAction Input: {"countryCode": "cn"}\nConfidence: 80%',
     False, False, 0.8),
    ("an extra argument", "nager-date-0",
     'Action: PublicHolidayIsTodayPublicHoliday\nAction Input: {"countryCode": "CN", "offset": 8}', False, False,
     None),
    ("malformed JSON", "nager-date-0",
     "Action: PublicHolidayIsTodayPublicHoliday\nAction Input: {countryCode: CN}\nConfidence: 0.5", False, False,
     0.5),
    ("an empty input, indented", "nager-date-2",
     "Action: CountryAvailableCountries\nAction Input: {\n}\n<confidence>0.95</confidence>", True, True, 0.95),
    ("keys in lower case and a transcript prefix", "nager-date-2",
     "ASSISTANT action: CountryAvailableCountries\nASSISTANT action input: {}\nASSISTANT Observation: [...]",
     True, True, None),
    ("reordered and indented JSON", "nager-date-15",
     'Action: PublicHolidayPublicHolidaysV3\nAction Input: {\n  "countryCode": "CA",\n  "year": 2023\n}\n'
     'Observation: ...\nAction: PublicHolidayPublicHolidaysV3\nAction Input: {"countryCode": "MX", "year": 2023}\n'
     "Confidence: 0.6", True, True, 0.6),
    ("a year as a string is another value", "nager-date-15",
     'Action: PublicHolidayPublicHolidaysV3\nAction Input: {"year": "2023", "countryCode": "CA"}\n'
     'Action: PublicHolidayPublicHolidaysV3\nAction Input: {"year": "2023", "countryCode": "MX"}', False, False,
     None),
    ("both calls in the other order", "nager-date-15",
     'Action: PublicHolidayPublicHolidaysV3\nAction Input: {"year": 2023, "countryCode": "MX"}\n'
     'Action: PublicHolidayPublicHolidaysV3\nAction Input: {"year": 2023, "countryCode": "CA"}', False, True, None),
    ("one call of two", "nager-date-15",
     'Action: PublicHolidayPublicHolidaysV3\nAction Input: {"year": 2023, "countryCode": "CA"}\nConfidence: 0.5',
     True, False, 0.5),
    ("three calls of three", "chucknorris-io-5",
     "Action: jokes_random_get\nAction Input: {}\nAction: jokes_random_get\nAction Input: {}\n"
     "Action: jokes_random_get\nAction Input: {}\nConfidence: 0.7", True, True, 0.7),
    ("two calls of three (a multiset counts)", "chucknorris-io-5",
     "Action: jokes_random_get\nAction Input: {}\nAction: jokes_random_get\nAction Input: {}", True, False, None),
    ("a malformed second call", "fruityvice-9",
     'Action: getFruitByName\nAction Input: {"name": "apple"}\nAction: getFruitByName\nAction Input: {"name": '
     '"banana"\nConfidence: 0.4', True, False, 0.4),
    ("the release's broken gold input, matched as text", "currencybeacon-9",
     'Action: latest_get\nAction Input: {"api_key": "8BbG6gN9g3Y29h5EMMSEw6avX0c1LYkw", "base": "USD", "symbols": '
     '"symbols": "JPY"}\nConfidence: 0.3', True, False, 0.3),
    ("... and a repaired one does not match it", "currencybeacon-9",
     'Action: latest_get\nAction Input: {"api_key": "8BbG6gN9g3Y29h5EMMSEw6avX0c1LYkw", "base": "USD", '
     '"symbols": "JPY"}', False, False, None),
]


@pytest.mark.parametrize("example_id, completion, first, all_calls, confidence", [c[1:] for c in TOOL_CASES],
                         ids=[c[0] for c in TOOL_CASES])
def test_toolalpaca_verdicts(toolalpaca, example_id, completion, first, all_calls, confidence):
    task, examples = toolalpaca
    example = examples[example_id]
    assert task.verify(example, completion) is first
    assert task.extra_checks(example, completion) == {"all_calls": all_calls}
    assert parse_confidence(completion) == confidence


def test_the_caopd_edit_on_a_real_tool_use_completion(toolalpaca):
    task, examples = toolalpaca
    completion = TOOL_CASES[1][2]
    edited = replace_confidence(completion, 0.125)
    assert edited == completion.removesuffix("confidence: 0.75") + "Confidence: 0.12"
    assert split_thinking(edited)[0] == split_thinking(completion)[0]
    assert task.verify(examples["nager-date-0"], edited)
