"""HTML pieces of the evaluation reports: one self-contained page (inline CSS, no scripts, no
external references), escaping and tables."""
from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

REPORT_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
.warn{background:#fde8e8;border:1px solid #e0a0a0;padding:8px 12px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.note{background:#fff8e1;border:1px solid #f0d48a;padding:6px 10px;display:inline-block}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.meta td{text-align:left}code{font-size:12px}
"""


def escape_html(text: Any) -> str:
    """``text`` as HTML-safe text (quotes escaped too, for attribute values)."""
    return html.escape(str(text), quote=True)


def html_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """A table: one header row, then ``rows``; every cell is escaped text."""
    out = [f'<table class="{cls}">' if cls else "<table>", "<tr>"]
    out.extend(f"<th>{escape_html(h)}</th>" for h in header)
    out.append("</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{escape_html(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def html_page(title: str, body: Sequence[str]) -> str:
    """The whole document: ``title`` as its title and first heading, then the ``body`` pieces."""
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape_html(title)}</title><style>{REPORT_CSS}</style></head><body>"
            f"<h1>{escape_html(title)}</h1>" + "".join(body) + "</body></html>\n")
