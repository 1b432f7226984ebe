import random

import pytest

from caopd.method.protocol import (
    MCQ_CONFIDENCE_INSTRUCTION,
    TOOLUSE_CONFIDENCE_INSTRUCTION,
    asks_for_confidence,
    confidence_start,
    format_confidence,
    parse_confidence,
    remove_confidence_statements,
    replace_confidence,
    split_thinking,
    strip_confidence,
)


@pytest.mark.parametrize("text, expected", [
    ("408\nConfidence: 0.75", 0.75),
    ("Confidence: 0.2\nthinking...\nConfidence: 0.9", 0.9),  # the last match wins
    ("Confidence: 85%", 0.85),
    ("Confidence: 85 %", 0.85),
    ("Confidence: 1.7", 1.0),  # clipped
    ("Confidence: -0.3", 0.0),  # clipped
    ("Confidence:.5", 0.5),
    ("Confidence: 1", 1.0),
    ("Confidence: 0", 0.0),
    ("Confidence: 0.8\nConfidence: high", 0.8),  # a Confidence: without a number is no match
    ("no confidence here", None),
    ("Confidence: high", None),
    ("", None),
    # the key in any case
    ("confidence: 0.5", 0.5),
    ("CONFIDENCE:0.25", 0.25),
    # a sentence's full stop after the number (the official parser crashes here)
    ("Confidence: 0.9.", 0.9),
    ("I am sure. Confidence: 1.", 1.0),
    # tags, any case, spaces inside, percentages inside
    ("<confidence>0.6</confidence>", 0.6),
    ("<Confidence> 0.35 </CONFIDENCE>", 0.35),
    ("<confidence>70%</confidence>", 0.7),
    ("<confidence>high</confidence>", None),
    ("<confidence>0.6", None),  # an unclosed tag is no statement
    # the last statement in text order, whichever its form
    ("<confidence>0.6</confidence>\nConfidence: 0.2", 0.2),
    ("Confidence: 0.2\n<confidence>0.6</confidence>", 0.6),
    # non-finite: a number too long for a float
    ("Confidence: " + "9" * 400, None),
])
def test_parse_confidence(text, expected):
    assert parse_confidence(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("<think>Confidence: 0.9 would be too much</think>\n408\nConfidence: 0.4", 0.4),
    ("<think>Confidence: 0.9 would be too much</think>\n408", None),  # the thinking block's number is no statement
    ("<think>a</think>x</think>\nConfidence: 0.3", 0.3),  # the last </think> closes the block
    ("<think>Confidence: 0.9 and then the completion was cut", None),  # unclosed: no answer part at all
    ("Confidence: 0.5 <think> later", None),  # an opened block runs to the end: everything is thinking
])
def test_parse_confidence_reads_only_the_answer_part(text, expected):
    assert parse_confidence(text) == expected


@pytest.mark.parametrize("text, thinking", [
    ("plain answer", ""),
    ("<think>plan</think>\nanswer", "<think>plan</think>"),
    ("<think>a</think> b </think> c", "<think>a</think> b </think>"),
    ("plan</think>answer", "plan</think>"),  # the template opened the block in the prompt
    ("<think>cut while thinking", "<think>cut while thinking"),
    ("", ""),
])
def test_split_thinking(text, thinking):
    head, tail = split_thinking(text)
    assert head == thinking and head + tail == text


@pytest.mark.parametrize("text, expected", [
    ("408\nConfidence: 0.30", 4),
    ("408", None),
    ("408 confidence:", 4),  # a key without a number starts a statement too
    ("Answer <CONFIDENCE>0.5</confidence>", 7),
    ("a Confidence: 0.1 b Confidence: 0.9", 2),  # the first one
    ("<think>Confidence: 0.9</think>\n408\nConfidence: 0.4", 35),  # not in the thinking block
    ("<think>Confidence: 0.9</think>\n408", None),
    ("<think>Confidence: 0.9", None),
])
def test_confidence_start(text, expected):
    assert confidence_start(text) == expected


def test_format_confidence_two_decimals_and_clipping():
    assert format_confidence(0.375) == "Confidence: 0.38"
    assert format_confidence(1) == "Confidence: 1.00"
    assert format_confidence(1.2) == "Confidence: 1.00"
    with pytest.raises(ValueError):
        format_confidence(float("nan"))


def test_format_parse_round_trip():
    for p in [0.0, 0.12, 0.5, 0.99, 1.0]:
        assert parse_confidence(format_confidence(p)) == pytest.approx(round(p, 2))


@pytest.mark.parametrize("text, expected", [
    # the tiny default model's completions (no thinking, one Confidence line): byte-identical to before
    ("42\nConfidence: 0.30", "42\nConfidence: 0.70"),
    ("42", "42\nConfidence: 0.70"),
    ("", "Confidence: 0.70"),
    ("42 Confidence:", "42 \nConfidence: 0.70"),
    ("42\nConfidence:", "42\nConfidence: 0.70"),
    ("42\n", "42\nConfidence: 0.70"),
    # the cut is at the FIRST statement of the answer part, as the official edit cuts
    # from the first statement of the answer part on, each line loses its statement and the rest of that line;
    # a line that says something else stays (the official edit cuts everything from the first statement on)
    ("Step: Confidence: 0.1 is low\n408\nConfidence: 0.9 (sure)", "Step: \n408\nConfidence: 0.70"),
    ("<reasoning>r</reasoning>\nConfidence: 0.8\n<answer>B</answer>",
     "<reasoning>r</reasoning>\n<answer>B</answer>\nConfidence: 0.70"),
    ("Action: X\nAction Input: {}\nconfidence: 0.6\nObservation: none\n<confidence>0.9</confidence>",
     "Action: X\nAction Input: {}\nObservation: none\nConfidence: 0.70"),
    # a "confidence:" in prose is no statement: nothing is cut, the line is added
    ("Thought: my confidence: low\nAction: X", "Thought: my confidence: low\nAction: X\nConfidence: 0.70"),
    ("408\nconfidence: 90%\nCONFIDENCE: 0.2", "408\nConfidence: 0.70"),
    ("408 <confidence>0.9</confidence>", "408 \nConfidence: 0.70"),
    # the thinking block is kept byte for byte, even when it mentions confidence
    ("<think>\nMy confidence: 0.9?\n</think>\n\n408\nConfidence: 0.95",
     "<think>\nMy confidence: 0.9?\n</think>\n\n408\nConfidence: 0.70"),
    ("<think>plan</think>", "<think>plan</think>\nConfidence: 0.70"),
    # a completion cut while thinking gets its block closed first
    ("<think>Confidence: 0.9 so far", "<think>Confidence: 0.9 so far\n</think>\n\nConfidence: 0.70"),
])
def test_replace_confidence(text, expected):
    assert replace_confidence(text, 0.7) == expected
    assert parse_confidence(expected) == 0.7


def test_strip_confidence_uses_the_same_cut():
    assert strip_confidence("408\nConfidence: 0.9") == "408\n"
    assert strip_confidence("Step: Confidence: 0.1 is low\n408\nConfidence: 0.9") == "Step: \n408"
    assert strip_confidence("<think>Confidence: 0.9</think>408 confidence: 1") == "<think>Confidence: 0.9</think>408 "
    assert strip_confidence("408") == "408"


def test_remove_confidence_statements_deletes_each_in_place():
    assert remove_confidence_statements("B\nConfidence: 0.8") == "B\n"
    assert remove_confidence_statements("confidence: 80% B <confidence>0.3</confidence>") == " B "
    assert remove_confidence_statements("Confidence: high") == "Confidence: high"  # not a statement


# Pieces of completions: thinking blocks (with and without confidence mentions, one left open), answers, and
# confidence statements in every form the parser reads, plus keys without a number.
THINKING = ["", "", "<think>plan</think>", "<think>\nMy confidence: 0.9, maybe CONFIDENCE:80%\n</think>\n\n",
            "<think><confidence>0.1</confidence></think>", "<think>cut while thinking, Confidence: 0.4 "]
ANSWERS = ["42", "The answer is B.", "<answer>C</answer>", 'Action: f\nAction Input: {"a": 1}', "",
           "overconfidence", "Confidence", "<confidence", "</think>"]
STATEMENTS = ["Confidence: 0.3", "confidence:0.8", "CONFIDENCE: 75%", "<confidence>0.6</confidence>",
              "<Confidence> 45 % </confidence>", "Confidence: 0.9.", "Confidence:", "Confidence: high",
              "confidence:-2", "Confidence: 1.5"]
SEPARATORS = ["\n", " ", "", "\n\n"]


def random_completion(rng: random.Random) -> str:
    parts = [rng.choice(ANSWERS + STATEMENTS) for _ in range(rng.randint(0, 5))]
    answer = "".join(part + rng.choice(SEPARATORS) for part in parts)
    return rng.choice(THINKING) + answer


def test_replace_confidence_property_on_generated_completions():
    rng = random.Random(20240601)
    for _ in range(3000):
        text = random_completion(rng)
        p = rng.choice([0.0, 1.0, 0.005, 0.125, 0.995, rng.random()])
        edited = replace_confidence(text, p)
        assert parse_confidence(edited) == round(p, 2), (text, edited)
        thinking, answer = split_thinking(text)
        new_thinking, new_answer = split_thinking(edited)
        if "</think>" in text or "<think>" not in text:
            assert new_thinking == thinking  # the thinking block, byte for byte
        else:
            assert new_thinking == text + "\n</think>"  # cut while thinking: closed, nothing else changed
        # exactly one statement in the answer part: the appended line, on a line of its own
        line = format_confidence(p)
        assert new_answer.endswith(line)
        body = new_answer[:-len(line)]
        assert confidence_start(body) is None and parse_confidence(body) is None
        before = edited[:-len(line)]
        assert before == "" or before.endswith("\n")
        # the edit is idempotent: editing again changes nothing
        assert replace_confidence(edited, p) == edited


def test_confidence_instructions():
    assert TOOLUSE_CONFIDENCE_INSTRUCTION == (
        "Confidence: your confidence level (0.0-1.0) regarding the success of this action, must be in numerical "
        "format, no other words or explanation.")
    assert '"Confidence: X"' in MCQ_CONFIDENCE_INSTRUCTION and "(0.0-1.0)" in MCQ_CONFIDENCE_INSTRUCTION
    assert "\n" not in MCQ_CONFIDENCE_INSTRUCTION  # one line
    # both ask, so a prompt that holds one is not asked twice
    assert asks_for_confidence(TOOLUSE_CONFIDENCE_INSTRUCTION) and asks_for_confidence(MCQ_CONFIDENCE_INSTRUCTION)
    assert asks_for_confidence("End with a line CONFIDENCE: x")
    assert not asks_for_confidence("How confident are you? State your confidence.")
