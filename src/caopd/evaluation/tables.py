"""Tables of metrics: Markdown for reports, rich for the terminal. ``markdown_table`` is the one writer of a
Markdown table; every report in the project builds its tables with it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from caopd.evaluation.metrics import METRIC_KEYS


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A Markdown table, one line per row, ending in a newline. ``align`` has one letter per column, ``l`` or
    ``r``; by default the first column is left-aligned (names) and the rest right-aligned (numbers). A ``|`` in
    a cell is escaped so that it cannot split the row."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError(f"a table of {len(header)} columns needs {len(header)} cells in every row and alignment")

    def line(cells: Sequence[object]) -> str:
        texts = (str(cell).replace("|", "\\|") for cell in cells)
        return "|" + "|".join(f" {text} " if text else " " for text in texts) + "|"

    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return "\n".join([line(header), rule, *map(line, rows)]) + "\n"


def intervals_table(arms: Mapping[str, Mapping[str, object]]) -> str:
    """Markdown table of each arm's bootstrap intervals (``arms[name]["intervals"][metric] = (low, high)``)."""
    keys = [*METRIC_KEYS, "aurc"]
    rows = []
    for name, metrics in arms.items():
        intervals = metrics.get("intervals") or {}
        rows.append([name, *(f"{_format_metric(intervals[k][0])}–{_format_metric(intervals[k][1])}"
                             if k in intervals else "n/a" for k in keys)])
    return markdown_table(["arm", *keys], rows)


def by_kind_rows(arms: Mapping[str, Mapping[str, object]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-kind table: each arm's accuracy / mean stated confidence per kind
    (``arms[name]["by_kind"][kind]`` holds that kind's metrics); no rows when no arm has kinds."""
    kinds = sorted({kind for metrics in arms.values() for kind in (metrics.get("by_kind") or {})})
    if not kinds:
        return [], []
    of_arm = {name: metrics.get("by_kind") or {} for name, metrics in arms.items()}
    sizes = {kind: max(int(by_kind.get(kind, {}).get("n", 0)) for by_kind in of_arm.values()) for kind in kinds}
    header = ["arm", *(f"{kind} (n = {sizes[kind]})" for kind in kinds)]
    rows = [[name, *(f"{_format_metric(by_kind[k]['accuracy'])} / {_format_metric(by_kind[k]['mean_confidence'])}"
                     if k in by_kind else "n/a" for k in kinds)] for name, by_kind in of_arm.items()]
    return header, rows


def by_kind_table(arms: Mapping[str, Mapping[str, object]]) -> str:
    """``by_kind_rows`` as Markdown; empty when no arm has kinds. A pooled ECE can hide a model that is calibrated on
    average and wrong on every kind."""
    header, rows = by_kind_rows(arms)
    if not rows:
        return ""
    return markdown_table(header, rows)


# Column headers for the terminal; the Markdown table uses the metric keys themselves.
_TERMINAL_HEADERS = {
    "accuracy": "accuracy", "ece": "ECE", "brier": "Brier", "auroc": "AUROC", "spr": "SPR",
    "mean_confidence": "mean\nconf", "overconfidence_gap": "overconf\ngap", "missing_rate": "missing\nrate",
}


def _format_metric(value: float | int | None) -> str:
    """3 decimals; NaN, None or an absent key (e.g. an older champion's metrics) read "n/a"."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.3f}"


def _comparison_rows(arms: Mapping[str, Mapping[str, float]]) -> list[list[str]]:
    return [[name, *(_format_metric(metrics.get(key)) for key in METRIC_KEYS)] for name, metrics in arms.items()]


def comparison_table(arms: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table: one row per arm (base, opd, caopd, ...), one column per metric in ``METRIC_KEYS``."""
    return markdown_table(["arm", *METRIC_KEYS], _comparison_rows(arms))


def print_comparison(arms: Mapping[str, Mapping[str, float]], console: Console | None = None) -> None:
    """Print the comparison table to the terminal with rich."""
    # A borderless layout with two-line headers keeps every number whole on an 80-column terminal.
    table = Table(title="Calibration metrics", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("arm", style="bold")
    for key in METRIC_KEYS:
        table.add_column(_TERMINAL_HEADERS[key], justify="right")
    for name, *values in _comparison_rows(arms):
        table.add_row(escape(name), *values)  # an arm name like "[x]" is text, not rich markup
    (console or Console()).print(table)

