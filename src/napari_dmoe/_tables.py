"""Small HTML tables for the widget's results area (a read-only ``QTextBrowser``).

Plain string building, no Qt: each function takes numbers already computed by ``_tasks``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

_STYLE = ("<style>table{border-collapse:collapse;margin:2px 0 8px 0}"
          "th,td{padding:1px 6px;text-align:right;white-space:nowrap}th{font-weight:600}"
          "td.l,th.l{text-align:left}h4{margin:6px 0 2px 0}</style>")


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
           note: str = "") -> str:
    head = "".join(f"<th nowrap class='{'l' if i == 0 else ''}'>"
                   f"{escape(h).replace(chr(10), '<br>')}</th>"
                   for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td nowrap class='{'l' if i == 0 else ''}'>{cell}</td>"
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows)
    small = f"<div style='color:gray'>{escape(note)}</div>" if note else ""
    return f"<h4>{escape(title)}</h4><table>{'<tr>' + head + '</tr>'}{body}</table>{small}"


def page(*sections: str) -> str:
    """Join sections into one HTML document."""
    return _STYLE + "".join(s for s in sections if s)


def scores_table(class_names: Sequence[str], scores: Mapping[str, Sequence[float]],
                 truth_name: str) -> str:
    """Dice and IoU per foreground class against a ground-truth layer."""
    rows = [[escape(name), f"{scores['dice'][i]:.3f}", f"{scores['iou'][i]:.3f}"]
            for i, name in enumerate(class_names[1:])]
    if len(rows) > 1:
        rows.append(["<i>mean</i>", f"{sum(scores['dice']) / len(rows):.3f}",
                     f"{sum(scores['iou']) / len(rows):.3f}"])
    return _table("Against ground truth", ["class", "Dice", "IoU"], rows,
                  f"ground truth: {truth_name}")


def usage_table(layer_name: str, class_names: Sequence[str],
                usage: Sequence[Sequence[float]]) -> str:
    """Share of each predicted class's grid cells routed (top-1) to each expert.

    Experts are rows (only those used, numbered from 1: E1 is label 1 in the expert
    map), classes columns: narrow enough for a dock widget.
    """
    present = [k for k, row in enumerate(usage) if any(row)]
    n = len(usage[0]) if usage else 0
    rows = []
    for e in range(n):
        if not any(usage[k][e] for k in present):
            continue
        cells = []
        for k in present:
            v = usage[k][e]
            best = v > 0 and v == max(usage[k])
            cells.append(f"<b>{v:.0%}</b>" if best else (f"{v:.0%}" if v else "·"))
        rows.append([f"E{e + 1}", *cells])
    note = f"unused experts: {n - len(rows)} of {n}" if len(rows) < n else ""
    return _table(f"Expert usage · {layer_name}",
                  ["expert", *[class_names[k] for k in present]], rows, note)


def measure_table(title: str, class_names: Sequence[str],
                  rows: Mapping[str, Sequence[float]], unit: str,
                  extra: Mapping[str, Mapping[str, float]] | None = None,
                  highlight: str | None = None, first: str = "value") -> str:
    """Area/volume per class (columns) for each attribute value (rows).

    ``extra`` adds columns: ``{column title: {value: number}}`` (shown with 3 decimals;
    a newline in a title breaks the header line there).
    """
    extra = extra or {}
    header = [first, *[f"{c}\n({unit})" for c in class_names[1:]], *extra]
    body = []
    for value, areas in rows.items():
        label = escape(value) + (" ★" if value == highlight else "")
        cells = [_number(a) for a in areas]
        cells += [f"{column[value]:.3f}" if value in column else "–"
                  for column in extra.values()]
        body.append([label, *cells])
    note = "★ = the patient's attribute value" if highlight in rows else ""
    return _table(title, header, body, note)


def _number(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def message(text: str, colour: str = "gray") -> str:
    """A one-line coloured paragraph."""
    return f"<p style='color:{colour}'>{escape(text)}</p>"


def swatches(items: Sequence[tuple[str, str]], title: str = "", per_row: int = 4) -> str:
    """A legend: coloured squares (``#rrggbb``) with their names, ``per_row`` per row."""
    cells = [f"<td class='l'><span style='color:{colour}'>&#9632;</span> {escape(name)}</td>"
             for name, colour in items]
    rows = "".join("<tr>" + "".join(cells[i:i + per_row]) + "</tr>"
                   for i in range(0, len(cells), per_row))
    head = f"<h4>{escape(title)}</h4>" if title else ""
    return f"{head}<table>{rows}</table>"


def switch_table(patient: str, others: Sequence[str],
                 rows: Mapping[str, Sequence[float]]) -> str:
    """Share of routing cells whose top-1 expert changes when the patient's value is
    swapped for another value (rows: dMoE layers, columns: values)."""
    body = [[escape(layer), *[f"{v:.0%}" for v in values]] for layer, values in rows.items()]
    return _table(f"Experts switched vs '{patient}'", ["dMoE layer", *others], body,
                  "switch maps: number of values that change the top-1 expert (magma); "
                  "0% everywhere means the attribute does not change the routing")
