"""The report page: one HTML file with its CSS inline, no script and nothing fetched from the network.

Images are referenced by their file names, next to the page, so the report folder can be copied or
served as it is. Every string from the run (tile names, reasons, paths) is escaped.
"""

from __future__ import annotations

from html import escape

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.problem { background: #fde2e2; } .note { color: #a33; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; max-width: 60em; }
img { max-width: 100%; } .gallery { display: flex; flex-wrap: wrap; gap: 6px; }
.gallery figure { margin: 0; width: 290px; } .gallery figcaption { font-size: 0.75em; }
"""


def _cell(value) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def table(header: list, rows: list, problem=None) -> str:
    """An HTML table; rows for which ``problem(row)`` is true are highlighted."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cls = ' class="problem"' if problem and problem(row) else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>")
    return f"<table><tr>{head}</tr>\n" + "\n".join(body) + "</table>"


def figure(fig) -> str:
    return (f'<figure><img src="{escape(fig.name)}" alt="{escape(fig.title)}">'
            f"<figcaption><b>{escape(fig.title)}.</b> {escape(fig.caption)}</figcaption></figure>")


def gallery(items: list) -> str:
    cells = [f'<figure><img src="{escape(i.png)}" alt="{escape(i.tile)} {i.number}">'
             f"<figcaption>{escape(i.kind)}: tile {escape(i.tile)}, NUMBER {i.number}, "
             f"chi2/dof {i.chi2_dof:.3g}, flags {i.flags}</figcaption></figure>" for i in items]
    return '<div class="gallery">' + "\n".join(cells) + "</div>"


def notes(lines: list) -> str:
    return "".join(f'<p class="note">{escape(line)}</p>' for line in lines)


def page(title: str, sections: list) -> str:
    """The whole page from ``[(heading, html), ...]``."""
    body = "\n".join(f"<h2>{escape(h)}</h2>\n{content}" for h, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body><h1>{escape(title)}</h1>\n{body}\n</body></html>\n")
