import pytest

from caopd.method.protocol import (
    format_confidence,
    parse_confidence,
    replace_confidence,
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
    ("confidence: 0.5", None),  # the key is case-sensitive, as the protocol writes it
    ("", None),
])
def test_parse_confidence(text, expected):
    assert parse_confidence(text) == expected


def test_format_confidence_two_decimals_and_clipping():
    assert format_confidence(0.375) == "Confidence: 0.38"
    assert format_confidence(1) == "Confidence: 1.00"
    assert format_confidence(1.2) == "Confidence: 1.00"
    with pytest.raises(ValueError):
        format_confidence(float("nan"))


def test_format_parse_round_trip():
    for p in [0.0, 0.12, 0.5, 0.99, 1.0]:
        assert parse_confidence(format_confidence(p)) == pytest.approx(round(p, 2))


def test_strip_and_replace_cut_from_the_last_confidence():
    text = "Step: Confidence: 0.1 is low\n408\nConfidence: 0.9 (sure)"
    assert strip_confidence(text) == "Step: Confidence: 0.1 is low\n408\n"
    assert replace_confidence(text, 0.25) == "Step: Confidence: 0.1 is low\n408\nConfidence: 0.25"
    # no Confidence line: one is appended on its own line
    assert replace_confidence("408", 0.5) == "408\nConfidence: 0.50"
    assert replace_confidence("", 0.5) == "Confidence: 0.50"
    # a dangling key without a number is cut too
    assert replace_confidence("408\nConfidence:", 1.0) == "408\nConfidence: 1.00"
