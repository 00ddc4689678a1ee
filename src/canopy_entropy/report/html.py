"""HTML building blocks of the report: escaping, number formatting, sortable tables, notes.

Every string that comes from data (model names, prompts, config values) passes through
:func:`esc`; the page's CSS and script are package data files (``data/report/``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from canopy_entropy.labels import header, meaning

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)


def asset(name: str) -> str:
    """A file of ``canopy_entropy/data/report`` (the page's CSS and script)."""
    return resources.files("canopy_entropy").joinpath("data", "report", name).read_text("utf-8")


def esc(value: Any) -> str:
    """HTML-escape any value (quotes included, safe inside attributes)."""
    return html.escape(str(value), quote=True)


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def fmt(value: Any, digits: int = 4) -> str:
    """A compact, readable number (4 significant digits); '—' for missing values."""
    if is_missing(value):
        return "—"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        if float(v).is_integer() and abs(v) < 1e6:
            return f"{v:.1f}" if abs(v) < 10 else f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(value)


def percent(value: Any) -> Cell:
    """A share shown as a percentage, sorted by its value."""
    return Cell("—" if is_missing(value) else f"{100 * float(value):.1f}%", value)


def _sort_value(value: Any) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
        return repr(float(value))
    return str(value)


class Cell:
    """A table cell: shown text (escaped on output) and the value used for sorting."""

    def __init__(self, text: str, sort: Any = None):
        self.text, self.sort = text, sort


class Column:
    """A table column: its header, whether it holds text, and the tooltip saying what it is."""

    def __init__(self, title: str, text: bool = False, tip: str = ""):
        self.title, self.text, self.tip = title, text, tip

    @classmethod
    def of(cls, name: str, text: bool = False) -> Column:
        """A column for a quantity of the label table (label with unit, meaning as tooltip)."""
        return cls(header(name), text, meaning(name))


def html_table(
    columns: Sequence[Column], rows: Iterable[Sequence[Any]], sortable: bool = True
) -> str:
    """A table from columns and rows of values or Cells, all escaped, in a scroll container
    (a wide table scrolls inside it; the page never gets wider)."""
    head = "".join(
        f'<th class="{"t" if c.text else "n"}"'
        + (f' title="{esc(c.tip)}"' if c.tip else "")
        + f">{esc(c.title)}</th>"
        for c in columns
    )
    body = []
    for row in rows:
        cells = []
        for value, col in zip(row, columns, strict=True):
            if isinstance(value, Cell):
                text, sort = value.text, _sort_value(value.sort)
            else:
                text = str(value) if col.text and not is_missing(value) else fmt(value)
                sort = _sort_value(value)
            cls = "t" if col.text else "n"
            cells.append(f'<td class="{cls}" data-sort="{esc(sort)}">{esc(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = ' class="sortable"' if sortable else ""
    return (
        f'<div class="scroll"><table{cls}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def meanings(names: Iterable[str]) -> str:
    """A collapsed list saying what each named quantity means (from the label table)."""
    items = [(header(n), meaning(n)) for n in dict.fromkeys(names) if meaning(n)]
    if not items:
        return ""
    body = "".join(f"<dt>{esc(h)}</dt><dd>{esc(m)}</dd>" for h, m in items)
    return f'<details><summary>What the columns mean</summary><dl class="meanings">{body}</dl></details>'


def kv(items: Iterable[tuple[str, Any]]) -> str:
    """A definition list of (name, value) pairs, values formatted and escaped."""
    return (
        '<dl class="kv">'
        + "".join(
            f"<dt>{esc(k)}</dt><dd>{esc(v if isinstance(v, str) else fmt(v))}</dd>"
            for k, v in items
        )
        + "</dl>"
    )


def alert(kind: str, html_text: str) -> str:
    """A coloured box (kind: danger, warn, info); ``html_text`` is already escaped markup."""
    return f'<div class="alert {kind}">{html_text}</div>'


def note(text: str) -> str:
    """A muted note (escaped); inline code in backticks becomes <code>."""
    parts = esc(text).split("`")
    body = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    return f'<p class="note">{body}</p>'
