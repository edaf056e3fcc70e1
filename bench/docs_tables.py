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


def table_rows(text: str, rows: tuple[str, ...] | None) -> str:
    """The header and the given rows (by number) of a bench table; every row for None."""
    lines = text.splitlines()
    keep = [line for line in lines[2:] if rows is None or line.split(".")[0][2:] in rows]
    return "\n".join(lines[:2] + keep)


def shown(page: Path) -> str:
    """The rows that `page` shows now."""
    text = page.read_text()
    return text.split(TABLE_START + "\n", 1)[1].split("\n" + TABLE_END, 1)[0]


def write_docs_table(text: str) -> None:
    """Put the rows of a bench table into the pages that show them."""
    for page, rows in DOCS_TABLES.items():
        head, _, rest = page.read_text().partition(TABLE_START + "\n")
        _, _, tail = rest.partition(TABLE_END)
        page.write_text(f"{head}{TABLE_START}\n{table_rows(text, rows)}\n{TABLE_END}{tail}")
