"""The three target-replacement edits of CaOPD (docs/method.md), and the plain-OPD baseline."""

from caopd.method.targets import empirical_confidence, student_target, teacher_context
from caopd.method.templates import (
    DEMO_CLOSING,
    DEMO_INTRO,
    SOLUTION_CLOSING,
    SOLUTION_INTRO,
    PrivilegedContext,
    confidence_note,
    teacher_prompt,
)

DEMO = "<answer>B</answer>\nConfidence: 1.00"
ROLLOUT = "I think it is C.\n<answer>C</answer>\nConfidence: 0.95"


def test_empirical_confidence():
    assert empirical_confidence([True, False, True, True, False, False, False, False]) == 3 / 8


def test_edit_1_student_completion():
    assert student_target(ROLLOUT, 0.375, "caopd") == "I think it is C.\n<answer>C</answer>\nConfidence: 0.38"
    assert student_target(ROLLOUT, 0.375, "opd") == ROLLOUT  # the baseline keeps the student's text


def test_edits_2_and_3_demo_mode_paper_template():
    ctx = teacher_context("demo", DEMO, None, 0.25, "caopd")
    assert ctx == PrivilegedContext("demo", "<answer>B</answer>\nConfidence: 0.25", 0.25)
    text = teacher_prompt("What is X?", ctx, "paper")
    assert text == ("What is X?\n\n" + DEMO_INTRO + "\n<answer>B</answer>\nConfidence: 0.25\n\n"
                    "Note: The empirical confidence for this question is 0.25. Output this exact value in the "
                    "'Confidence:' field.\n\n" + DEMO_CLOSING)
    # the Note stands right before the closing instruction
    assert text.index(confidence_note(0.25)) < text.index(DEMO_CLOSING)


def test_correct_solution_mode_and_fallback():
    ctx = teacher_context("correct_solution", DEMO, "<answer>B</answer>\nConfidence: 0.6", 0.5, "caopd")
    assert ctx.mode == "correct_solution" and ctx.reference.endswith("Confidence: 0.50")
    text = teacher_prompt("Q?", ctx, "paper")
    assert SOLUTION_INTRO in text and text.endswith(SOLUTION_CLOSING) and confidence_note(0.5) in text
    # no correct rollout to show: the demonstration stands in
    assert teacher_context("correct_solution", DEMO, None, 0.0, "caopd").mode == "demo"


def test_plain_opd_teacher_says_full_confidence_and_has_no_note():
    ctx = teacher_context("demo", "<answer>B</answer>\nConfidence: 0.7", None, 0.25, "opd")
    assert ctx.reference.endswith("Confidence: 1.00") and ctx.note_confidence is None
    assert "Note:" not in teacher_prompt("Q?", ctx, "paper")


def test_chat_prompt_keeps_system_and_extends_last_user_message():
    prompt = [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "Q?"}]
    out = teacher_prompt(prompt, teacher_context("demo", DEMO, None, 0.5, "caopd"), "paper")
    assert out[0] == prompt[0] and out[1]["content"].startswith("Q?\n\n" + DEMO_INTRO)
    assert prompt[1]["content"] == "Q?"  # the student's prompt is not modified


def test_compact_template_for_the_tiny_model():
    ctx = teacher_context("demo", "408\nConfidence: 1.00", None, 0.5, "caopd")
    assert teacher_prompt("12*34=", ctx, "compact") == "[408\nConfidence: 0.50|0.50]12*34="
    opd = teacher_context("correct_solution", "408\nConfidence: 1.00", "408\nConfidence: 0.8", 0.5, "opd")
    assert teacher_prompt("12*34=", opd, "compact") == "{408\nConfidence: 1.00}12*34="


# A science demonstration as the official training rows have it: a full written answer, no confidence line.
WRITTEN_DEMO = "<reasoning>\nThe ester is the only reactant with the right skeleton.\n</reasoning>\n<answer>A</answer>"


def test_a_written_demonstration_without_confidence_gets_one():
    caopd = teacher_context("demo", WRITTEN_DEMO, None, 0.375, "caopd")
    assert caopd.reference == WRITTEN_DEMO + "\nConfidence: 0.38"
    opd = teacher_context("demo", WRITTEN_DEMO, None, 0.375, "opd")
    assert opd.reference == WRITTEN_DEMO + "\nConfidence: 1.00" and opd.note_confidence is None
    text = teacher_prompt("Q?", caopd, "paper")
    assert text == ("Q?\n\n" + DEMO_INTRO + "\n" + WRITTEN_DEMO + "\nConfidence: 0.38\n\n"
                    + confidence_note(0.375) + "\n\n" + DEMO_CLOSING)


def test_a_demonstration_with_a_lower_case_or_tagged_confidence_states_p_once():
    for demo in (WRITTEN_DEMO + "\nconfidence: 95%", WRITTEN_DEMO + "\n<confidence>0.9</confidence>"):
        assert teacher_context("demo", demo, None, 0.5, "caopd").reference == WRITTEN_DEMO + "\nConfidence: 0.50"


def test_edit_1_keeps_the_thinking_block_and_closes_a_cut_one():
    rollout = "<think>\nMy confidence: 0.9 is too high.\n</think>\n\n<answer>C</answer>\nConfidence: 0.95"
    assert student_target(rollout, 0.25, "caopd") == (
        "<think>\nMy confidence: 0.9 is too high.\n</think>\n\n<answer>C</answer>\nConfidence: 0.25")
    cut = "<think>\nStill thinking, confidence: 0.9"
    assert student_target(cut, 0.25, "caopd") == cut + "\n</think>\n\nConfidence: 0.25"
    assert student_target(cut, 0.25, "opd") == cut


def test_a_correct_rollout_with_thinking_keeps_it_in_the_teachers_context():
    rollout = "<think>Confidence: 0.9?</think>\n<answer>B</answer>\nconfidence: 0.8"
    ctx = teacher_context("correct_solution", DEMO, rollout, 0.5, "caopd")
    assert ctx.reference == "<think>Confidence: 0.9?</think>\n<answer>B</answer>\nConfidence: 0.50"
