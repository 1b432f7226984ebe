"""Plots are real PNG files written atomically; the comparison table shows every arm and metric."""

from __future__ import annotations

import math

import matplotlib.image
import pytest
from rich.console import Console

from caopd.evaluation.html import html_report
from caopd.evaluation.metrics import METRIC_KEYS, calibration_metrics
from caopd.evaluation.plots import plot_confidence_histogram, plot_reliability_diagram
from caopd.evaluation.tables import by_kind_table, comparison_table, print_comparison

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONF = [0.95, 0.9, 0.3, 0.6, 0.7, 1.0, 0.0, None, 0.45, None]
CORRECT = [True, True, False, True, False, True, False, True, False, False]


@pytest.mark.parametrize("plot", [plot_reliability_diagram, plot_confidence_histogram])
def test_plot_writes_png_atomically(tmp_path, plot):
    path = tmp_path / "nested" / "plot.png"  # the parent folder is created
    returned = plot(CONF, CORRECT, path, title="base · arithmetic")
    assert returned == path
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert [p.name for p in path.parent.iterdir()] == ["plot.png"]  # no temporary file left behind


@pytest.mark.parametrize("plot", [plot_reliability_diagram, plot_confidence_histogram])
def test_plot_overwrites_and_handles_degenerate_inputs(tmp_path, plot):
    path = tmp_path / "plot.png"
    path.write_bytes(b"stale")
    plot([1.0, 1.0, 1.0], [True, False, True], path, title="always confident")
    assert path.read_bytes()[:8] == PNG_MAGIC
    plot([None, None], [False, False], path, title="all missing")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_failed_plot_leaves_no_file(tmp_path):
    path = tmp_path / "plot.png"
    with pytest.raises(ValueError):
        plot_reliability_diagram([1.5], [True], path, title="bad")
    assert list(tmp_path.iterdir()) == []


ARMS = {
    "base": calibration_metrics(CONF, CORRECT),
    "opd": calibration_metrics([1.0] * 4, [True, True, True, True]),  # single class: auroc NaN
    "caopd": {"accuracy": 0.62, "ece": 0.2449, "brier": 0.2, "auroc": 0.76, "spr": 0.65,
              "mean_confidence": 0.5, "overconfidence_gap": -0.12, "missing_rate": 0.0},
}


def test_comparison_table_markdown():
    table = comparison_table(ARMS)
    lines = table.strip().splitlines()
    assert lines[0] == "| arm | " + " | ".join(METRIC_KEYS) + " |"
    assert lines[1].startswith("|---|")
    assert len(lines) == 2 + len(ARMS)
    for name, line in zip(ARMS, lines[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == name and len(cells) == 1 + len(METRIC_KEYS)
    caopd = lines[4]
    assert "| 0.620 |" in caopd and "| 0.245 |" in caopd and "| -0.120 |" in caopd
    opd_auroc = lines[3].strip("|").split("|")[1 + METRIC_KEYS.index("auroc")].strip()
    assert math.isnan(ARMS["opd"]["auroc"]) and opd_auroc == "n/a"


def test_comparison_table_absent_key_reads_na():
    line = comparison_table({"old-champion": {"ece": 0.3}}).splitlines()[2]
    assert line.count("n/a") == len(METRIC_KEYS) - 1 and "0.300" in line


def test_by_kind_table_per_arm_and_kind():
    arms = {"base": {"ece": 0.1, "by_kind": {"mul_2x2": {"accuracy": 0.08, "mean_confidence": 0.75, "n": 12},
                                             "add_2x2": {"accuracy": 0.79, "mean_confidence": 0.7, "n": 8}}},
            "caopd": {"ece": 0.2, "by_kind": {"add_2x2": {"accuracy": 0.8, "mean_confidence": 0.84, "n": 8}}}}
    lines = by_kind_table(arms).splitlines()
    assert lines[0] == "| arm | add_2x2 (n = 8) | mul_2x2 (n = 12) |"
    assert lines[2] == "| base | 0.790 / 0.700 | 0.080 / 0.750 |"
    assert lines[3] == "| caopd | 0.800 / 0.840 | n/a |"
    assert by_kind_table({"base": {"ece": 0.1}}) == "" and by_kind_table({"base": {"by_kind": {}}}) == ""
    page = html_report("Eval", arms={"base": {"accuracy": 0.5}}, other_sets={"ood": arms})
    assert "<th>mul_2x2 (n = 12)</th>" in page and "<td>0.790 / 0.700</td>" in page
    assert "by kind" not in html_report("Eval", arms={"base": {"accuracy": 0.5}})


def test_print_comparison_fits_80_columns():
    console = Console(record=True, width=80)
    print_comparison({**ARMS, "[red]x[/red]": ARMS["caopd"]}, console=console)
    text = console.export_text()
    for name in [*ARMS, "[red]x[/red]"]:
        assert name in text
    assert "n/a" in text and "0.620" in text and "-0.120" in text and "…" not in text


def test_html_report_is_self_contained_and_escaped(tmp_path):
    import base64

    png = plot_confidence_histogram([0.2, 0.9], [False, True], tmp_path / "hist.png", title="t")
    page = html_report("Eval <1>", [png, tmp_path / "absent.png"],
                       arms={"base": {"accuracy": 0.5, "auroc": float("nan")}, "<b>": {"accuracy": 1.0}},
                       values={"loss": 0.1234567, "step": 3})
    assert page.startswith("<!doctype html>") and "Eval &lt;1&gt;" in page
    assert "<th>&lt;b&gt;</th>" in page and "<td>0.500</td>" in page and "<td>n/a</td>" in page
    assert "<td>0.123</td>" in page and "<td>3</td>" in page
    assert base64.b64encode(png.read_bytes()).decode() in page
    assert page.count("<img") == 1  # a missing plot is left out, not a broken link
