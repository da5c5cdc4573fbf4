"""An evaluation run's report.md (modeling.evaluate.report_markdown) as blocks a template renders:
headings, paragraphs (with `code` spans), tables and images. Only this small subset of Markdown is read,
and every piece of text stays text (the template escapes it), so a report can never inject markup."""

import re
from dataclasses import dataclass

IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)$")
HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<text>.+)$")
SEPARATOR_CELL = re.compile(r"^:?-{3,}:?$")


@dataclass(frozen=True)
class Block:
    """kind: heading | paragraph | table | image. `parts` are (text, is_code) runs of a heading or a
    paragraph; a table has a `header` and `rows` of (text, alignment) cells, alignment "left" or "right"
    as its separator row says (numbers are right-aligned in the reports)."""

    kind: str
    parts: tuple[tuple[str, bool], ...] = ()
    level: int = 0
    header: tuple[tuple[str, str], ...] = ()
    rows: tuple[tuple[tuple[str, str], ...], ...] = ()
    src: str = ""
    alt: str = ""


def _inline(text: str) -> tuple[tuple[str, bool], ...]:
    """Split text on backticks: odd runs are code."""
    return tuple((run, i % 2 == 1) for i, run in enumerate(text.split("`")) if run)


def _cells(line: str) -> tuple[str, ...]:
    return tuple(cell.strip() for cell in line.strip().strip("|").split("|"))


def _table(lines: list[str]) -> Block:
    header, body = _cells(lines[0]), lines[1:]
    align: tuple[str, ...] = ()
    if body and all(SEPARATOR_CELL.match(c) for c in _cells(body[0])):
        align = tuple("right" if c.endswith(":") else "left" for c in _cells(body[0]))
        body = body[1:]

    def aligned(cells: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        return tuple((c, align[i] if i < len(align) else "left") for i, c in enumerate(cells))

    return Block("table", header=aligned(header), rows=tuple(aligned(_cells(line)) for line in body))


def report_blocks(markdown: str) -> list[Block]:
    """The blocks of a report, in order."""
    blocks: list[Block] = []
    paragraph: list[str] = []
    table: list[str] = []

    def flush() -> None:
        if paragraph:
            blocks.append(Block("paragraph", parts=_inline(" ".join(paragraph))))
            paragraph.clear()
        if table:
            blocks.append(_table(table))
            table.clear()

    for raw in markdown.splitlines():
        line = raw.strip()
        if line.startswith("|"):
            if paragraph:
                flush()
            table.append(line)
            continue
        if table:
            flush()
        if not line:
            flush()
        elif heading := HEADING.match(line):
            flush()
            blocks.append(Block("heading", parts=_inline(heading["text"]), level=len(heading["hashes"])))
        elif image := IMAGE.match(line):
            flush()
            blocks.append(Block("image", src=image["src"], alt=image["alt"]))
        else:
            paragraph.append(line)
    flush()
    return blocks
