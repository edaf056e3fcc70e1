"""The README and `docs/`: every link between pages resolves (file and heading), the README stays
short, and the performance page shows the bench table of `bench/latest.json`, not a copy that
can go stale."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_links_between_pages_resolve():
    checked, broken = 0, []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = page.relative_to(ROOT)
            if not dest.exists():
                broken.append(f"{where}: no file {target}")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                broken.append(f"{where}: no heading {target}")
            checked += 1
    assert not broken, broken
    assert checked > 30


def test_every_doc_page_is_reachable_from_the_readme():
    linked = {
        (ROOT / t.partition("#")[0]).resolve()
        for t in LINK.findall((ROOT / "README.md").read_text())
        if t.startswith("docs/")
    }
    assert set(PAGES[1:]) <= linked, sorted(p.name for p in set(PAGES[1:]) - linked)


def test_readme_fits_on_a_few_screens():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 170, len(lines)
    # The quick start comes first: exactly the two commands.
    start = lines.index("## Quick start")
    block = lines[lines.index("```bash", start) + 1 : lines.index("```", start + 2)]
    assert [line.split("#")[0].strip() for line in block] == ["make demo", "make test"]


def test_pages_show_the_latest_bench_rows():
    """The bench tables of the docs are `bench/latest.json`'s, as `bench/run.py` writes them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "bench" / "docs_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    table = json.loads((ROOT / "bench" / "latest.json").read_text())["table"]
    for page, rows in tables.DOCS_TABLES.items():
        assert tables.shown(page) == tables.table_rows(table, rows), page.name
        assert tables.shown(page).count("\n| ") >= (3 if rows else 10)
    # The rows measured on vLLM 0.34's V2 runner (`bench/run.py --vllm 0.34.0`).
    next_table = json.loads((ROOT / "bench" / "latest-vllm-0.34.0.json").read_text())["table"]
    start, end = tables.next_markers("0.34.0")
    page = tables.NEXT_PAGE.read_text()
    shown = page.split(start + "\n", 1)[1].split("\n" + end, 1)[0]
    assert shown == tables.table_rows(next_table, None) and shown.count("\n| ") >= 5
