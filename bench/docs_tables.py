"""The bench rows that the docs show, written from `bench/latest.json` by `bench/run.py` and
checked by `tests/test_docs.py`, so that no page holds figures of an older run."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Pages that show bench rows, between the markers: the performance page every row, the
#: lm-eval page the rows of lm-eval.
DOCS_TABLES: dict[Path, tuple[str, ...] | None] = {
    ROOT / "docs" / "performance.md": None,
    ROOT / "docs" / "lm-eval.md": ("8", "10", "11", "13", "14", "15"),
}
TABLE_START = "<!-- bench table: written by bench/run.py from bench/latest.json; do not edit -->"
TABLE_END = "<!-- end of bench table -->"
#: The performance page's table of the rows measured on another vLLM (`run.py --vllm VERSION`,
#: `bench/latest-vllm-VERSION.json`): vLLM 0.34's Model Runner V2.
NEXT_PAGE = ROOT / "docs" / "performance.md"


def next_markers(version: str) -> tuple[str, str]:
    return (
        f"<!-- bench table of vLLM {version}: written by bench/run.py --vllm {version}; do not edit -->",
        f"<!-- end of bench table of vLLM {version} -->",
    )


def table_rows(text: str, rows: tuple[str, ...] | None) -> str:
    """The header and the given rows (by number) of a bench table; every row for None."""
    lines = text.splitlines()
    keep = [line for line in lines[2:] if rows is None or line.split(".")[0][2:] in rows]
    return "\n".join(lines[:2] + keep)


def shown(page: Path) -> str:
    """The rows that `page` shows now."""
    text = page.read_text()
    return text.split(TABLE_START + "\n", 1)[1].split("\n" + TABLE_END, 1)[0]


def write_docs_table(text: str, version: str | None = None) -> None:
    """Put the rows of a bench table into the pages that show them (those of another vLLM
    `version` into the performance page's table of that version)."""
    pages = DOCS_TABLES.items() if version is None else [(NEXT_PAGE, None)]
    start, end = (TABLE_START, TABLE_END) if version is None else next_markers(version)
    for page, rows in pages:
        head, found, rest = page.read_text().partition(start + "\n")
        if not found:
            raise SystemExit(f"{page} has no {start!r}")
        _, _, tail = rest.partition(end)
        page.write_text(f"{head}{start}\n{table_rows(text, rows)}\n{end}{tail}")
