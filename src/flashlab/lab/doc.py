"""A tiny document model rendered to Markdown and to self-contained HTML (images inlined).

Text may use ``**bold**`` and ``code`` spans; nothing else is interpreted.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    align_right_from: int = 1  # columns from this index on are numeric


@dataclass
class Image:
    path: str  # relative to the report's folder
    alt: str


@dataclass
class Doc:
    title: str
    blocks: list[object] = field(default_factory=list)

    def add(self, *blocks: object) -> None:
        self.blocks.extend(blocks)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Doc) -> str:
    out = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if isinstance(b, Heading):
            out += ["#" * (b.level + 1) + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            if b.caption:
                out += [f"*{b.caption}*", ""]
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            seps = ("---:" if i >= b.align_right_from else "---" for i in range(len(b.headers)))
            out.append("|" + "|".join(seps) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Image):
            out += [f"![{b.alt}]({b.path})", ""]
    return "\n".join(out).rstrip() + "\n"


def _inline(text: str) -> str:
    s = html.escape(str(text))
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}caption{text-align:left;font-style:italic}"""


def render_html(doc: Doc, base_dir: Path) -> str:
    """Self-contained HTML: images are embedded as base64 data URIs."""
    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{html.escape(doc.title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{_inline(doc.title)}</h1>"]
    for b in doc.blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level + 1}>{_inline(b.text)}</h{b.level + 1}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            cap = f"<caption>{_inline(b.caption)}</caption>" if b.caption else ""
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.headers)
            body = "".join(
                "<tr>" + "".join(f"<td class='{'n' if i >= b.align_right_from else ''}'>{_inline(c)}</td>"
                                 for i, c in enumerate(row)) + "</tr>" for row in b.rows)
            out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            p = base_dir / b.path
            if p.exists():
                data = base64.b64encode(p.read_bytes()).decode()
                out.append(f"<p><img alt='{html.escape(b.alt)}' src='data:image/png;base64,{data}'></p>")
            else:
                out.append(f"<p>[missing figure {html.escape(b.path)}]</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
