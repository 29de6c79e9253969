"""One report, two renderings: Markdown (reports/report.md) and self-contained HTML (figures inlined)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from newllm.report.tables import Table

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
pre{background:#f7f7f7;padding:8px;white-space:pre-wrap}.note{color:#555}"""


@dataclass
class Document:
    title: str
    parts: list[tuple[str, object]] = field(default_factory=list)  # (kind, payload)

    def heading(self, text: str) -> None:
        self.parts.append(("h2", text))

    def text(self, text: str) -> None:
        self.parts.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        self.parts.append(("ul", items))

    def table(self, table: Table) -> None:
        self.parts.append(("table", table))

    def figure(self, path: Path, caption: str) -> None:
        self.parts.append(("figure", (path, caption)))

    def code(self, text: str) -> None:
        self.parts.append(("pre", text))

    def fill(self, template: str, values: dict[str, object], blocks: dict[str, tuple[str, object]]) -> None:
        """Add a Markdown template's parts: `## ` headings, `- ` bullets, `[[name]]` lines (blocks[name], a
        (kind, payload) part: a table or figure) and paragraphs (consecutive lines), every `{key}` filled
        from `values` (str.format). A bullet that is just `- {key}` with a list value becomes one bullet per
        item; a bullet or paragraph that fills to nothing is left out."""
        para: list[str] = []

        def end_paragraph() -> None:
            if para and (text := " ".join(para).format_map(values).strip()):
                self.text(text)
            para.clear()

        for line in template.splitlines():
            bare = line.strip()
            if not bare.startswith("- ") and bare and not bare.startswith(("## ", "[[")):
                para.append(bare)
                continue
            end_paragraph()
            if bare.startswith("## "):
                self.heading(bare[3:].format_map(values))
            elif bare.startswith("[["):
                self.parts.append(blocks[bare.strip("[]")])
            elif bare.startswith("- "):
                key = bare[2:].strip("{}")
                items = values[key] if bare[2:] == f"{{{key}}}" and isinstance(values.get(key), list) else \
                    [bare[2:].format_map(values)]
                items = [str(i).strip() for i in items if str(i).strip()]
                if self.parts and self.parts[-1][0] == "ul":  # consecutive bullets: one list
                    self.parts[-1][1].extend(items)
                elif items:
                    self.bullets(items)
        end_paragraph()

    def markdown(self, relative_to: Path) -> str:
        out = [f"# {self.title}", ""]
        for kind, payload in self.parts:
            if kind == "h2":
                out += [f"## {payload}", ""]
            elif kind == "p":
                out += [str(payload), ""]
            elif kind == "ul":
                out += [f"- {item}" for item in payload] + [""]
            elif kind == "table":
                out += [payload.markdown(), ""]
            elif kind == "figure":
                path, caption = payload
                out += [f"![{caption}]({path.relative_to(relative_to).as_posix()})", f"*{caption}*", ""]
            elif kind == "pre":
                out += ["```", str(payload), "```", ""]
        return "\n".join(out)

    def html(self) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
               f"<style>{CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"]
        for kind, payload in self.parts:
            if kind == "h2":
                out.append(f"<h2>{html.escape(payload)}</h2>")
            elif kind == "p":
                out.append(f"<p>{_inline(payload)}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in payload) + "</ul>")
            elif kind == "table":
                out.append(payload.html())
            elif kind == "figure":
                path, caption = payload
                data = base64.b64encode(path.read_bytes()).decode()
                out.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption class='note'>{html.escape(caption)}</figcaption></figure>")
            elif kind == "pre":
                out.append(f"<pre>{html.escape(str(payload))}</pre>")
        out.append("</body></html>")
        return "\n".join(out)


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` in HTML; everything else escaped."""
    import re

    t = html.escape(str(text))
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)
