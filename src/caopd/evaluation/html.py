"""The HTML report of a stage: metric tables and the plots embedded, one self-contained page (the KFP UI renders
HTML artifacts)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from caopd.evaluation.metrics import METRIC_KEYS
from caopd.evaluation.tables import _comparison_rows, _format_metric, by_kind_rows


def html_report(title: str, images: Sequence[str | Path] = (), arms: Mapping[str, Mapping[str, float]] | None = None,
                values: Mapping[str, object] | None = None,
                other_sets: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None) -> str:
    """A self-contained HTML page (the KFP UI renders HTML artifacts): a metric table per arm (and one per other
    prompt set, such as OOD), or a key/value table, then the plots embedded as base64 PNGs so the page needs no
    other file."""
    import base64
    import html

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}</style></head><body>",
             f"<h2>{html.escape(title)}</h2>"]
    tables = ({"in-domain" if other_sets else "": arms} if arms else {}) | dict(other_sets or {})
    for heading, table_arms in tables.items():
        if heading:
            parts.append(f"<h3>{html.escape(heading)}</h3>")
        parts.append("<table><tr><th>arm</th>" + "".join(f"<th>{k}</th>" for k in METRIC_KEYS) + "</tr>")
        for name, *cells in _comparison_rows(table_arms):
            parts.append(f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
        header, rows = by_kind_rows(table_arms)
        if rows:
            parts.append("<p>Accuracy / mean stated confidence by kind:</p><table><tr>"
                         + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr><th>" + html.escape(row[0]) + "</th>" + "".join(f"<td>{c}</td>" for c in row[1:]) + "</tr>"
                      for row in rows]
            parts.append("</table>")
    if values:
        parts.append("<table>" + "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_format_value(v))}</td></tr>"
            for k, v in values.items()) + "</table>")
    for image in map(Path, images):
        if image.is_file():
            encoded = base64.b64encode(image.read_bytes()).decode("ascii")
            parts.append(f"<p><img alt='{html.escape(image.name)}' src='data:image/png;base64,{encoded}'></p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return _format_metric(value)
    return str(value)

