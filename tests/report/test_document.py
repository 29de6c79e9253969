"""Document.fill: a Markdown template's headings, bullets, blocks and paragraphs, placeholders filled."""

from newllm.report.document import Document
from newllm.report.tables import Table

TEMPLATE = """{answer}

## Heading {n}

- first {n}
- {empty}
- {many}

[[table]]

A paragraph on
two lines: {n:,}.
"""


def test_fill_builds_the_parts_in_order_and_drops_what_fills_to_nothing():
    doc = Document("t")
    table = Table(["a"], [[1]])
    doc.fill(TEMPLATE, {"answer": "The {braces} of a value stay.", "n": 1234, "empty": "", "many": ["x", "y"]},
             {"table": ("table", table)})
    assert doc.parts == [("p", "The {braces} of a value stay."), ("h2", "Heading 1234"),
                         ("ul", ["first 1234", "x", "y"]), ("table", table), ("p", "A paragraph on two lines: 1,234.")]


def test_the_report_template_names_only_blocks_build_makes():
    """Every [[block]] of the shipped template is one build.py makes (a typo fails here, not in a run; a
    missing value fails the pipeline test's report stage)."""
    import re

    from newllm.report import build

    text = build.TEMPLATE.read_text(encoding="utf-8")
    source = (build.TEMPLATE.parents[1] / "build.py").read_text(encoding="utf-8")
    for block in re.findall(r"^\[\[(\w+)\]\]$", text, flags=re.M):
        assert f'"{block}":' in source, block
