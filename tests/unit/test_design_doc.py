"""DESIGN.md stays the map of the code: every "DESIGN.md §N" a module cites names a
section that exists, and the wire table lists exactly the columns common/wire.py makes."""
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from common import wire

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "DESIGN.md"
SOURCE_DIRS = ("common", "services", "tests", "deploy")

# "DESIGN.md §1.5", "DESIGN.md §1.5, §1.6", "DESIGN.md §1.4 and §2.4", 'DESIGN.md "Data on the wire"'
CITATION = re.compile(r'DESIGN(?:\.md)?\s*(?:(?P<numbers>§\s*\d+(?:\.\d+)*(?:(?:,\s*|\s+and\s+)§\s*\d+(?:\.\d+)*)*)'
                      r'|"(?P<title>[^"]+)")')
NUMBER = re.compile(r"§\s*(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,4}\s+(?:(?P<number>\d+(?:\.\d+)*)\.?\s+)?(?P<title>.+?)\s*$", re.M)


def sections(text: str) -> tuple[set[str], set[str]]:
    """The section numbers and the titles (lower case) of a design document's headings."""
    numbers, titles = set(), set()
    for match in HEADING.finditer(text):
        if match["number"]:
            numbers.add(match["number"])
        titles.add(match["title"].lower())
    return numbers, titles


def dangling_citations(source: str, design: str) -> list[str]:
    """The citations in `source` ("DESIGN.md §2.4", 'DESIGN.md "Data on the wire"') that
    name no section of `design`."""
    numbers, titles = sections(design)
    bad = []
    for match in CITATION.finditer(source):
        for number in NUMBER.findall(match["numbers"] or ""):
            if number not in numbers:
                bad.append(f"DESIGN.md §{number}")
        if match["title"] is not None and not any(match["title"].lower() in t for t in titles):
            bad.append(match.group(0))
    return bad


def _sources():
    for directory in SOURCE_DIRS:
        for path in sorted((ROOT / directory).rglob("*")):
            if path.suffix in (".py", ".yaml", ".proto", ".md") and path.is_file() and path != Path(__file__):
                yield path


def test_the_checker_finds_a_dangling_citation():
    design = "# t\n## 1. The algorithm\n### 1.2 The SDE step\n## 3. Data on the wire\n"
    source = ('a (DESIGN.md §1.2), b (DESIGN.md §1.3), c DESIGN.md §1, §4, d DESIGN.md "Data on the wire", '
              'e DESIGN.md "Nope", f DESIGN.md §1.2 and §3.1')
    assert dangling_citations(source, design) == ["DESIGN.md §1.3", "DESIGN.md §4", 'DESIGN.md "Nope"', "DESIGN.md §3.1"]


def test_every_cited_section_exists():
    design = DESIGN.read_text()
    cited, bad = 0, {}
    for path in _sources():
        text = path.read_text(errors="replace")
        cited += len(CITATION.findall(text))
        if dangling := dangling_citations(text, design):
            bad[str(path.relative_to(ROOT))] = dangling
    assert not bad, f"citations of DESIGN.md sections that do not exist: {bad}"
    assert cited >= 5  # the modules do cite it; a broken pattern would find nothing


def _wire_table(design: str) -> set[str]:
    """First-cell column names of the table in the "Data on the wire" section."""
    section = re.search(r"^## \d+\. Data on the wire\n(.*?)(?=^## )", design, re.M | re.S)
    assert section, 'DESIGN.md has no "## N. Data on the wire" section'
    return set(re.findall(r"^\| `(\w+)` \|", section.group(1), re.M))


def _columns_the_code_makes() -> set[str]:
    n = 2
    images = np.zeros((n, 4, 4, 3), np.uint8)
    batch = wire.make_rollout_batch(
        prompts=["a", "a"], prompt_index=[0, 0], metadata=[{}, {}], images=images,
        latents=np.zeros((n, 3, 1, 2, 2), np.float32), timesteps=np.ones((n, 2)), log_probs=np.zeros((n, 2)),
        policy_version=0, rollout_worker="r", prompt_embeds=[b"x", None])
    scored = wire.with_scores(batch, {"brightness": np.zeros(n)}, np.zeros(n))
    table = wire.with_advantages(pa.Table.from_batches([scored]), np.zeros(n))
    evaluation = wire.make_image_batch(["a", "a"], [0, 0], [{}, {}], images, [1, 2], 0)
    return set(table.column_names) | set(evaluation.schema.names)


def _columns_the_docstring_lists() -> set[str]:
    """Column names of the docstring's "Columns" block (indented lines up to the next
    unindented paragraph)."""
    lines = wire.__doc__.split("Columns", 1)[1].splitlines()[1:]
    block = []
    for line in lines:
        if line and not line.startswith(" "):
            break
        block.append(line)
    return set(re.findall(r"^ {4}(\w+) {2,}\S", "\n".join(block), re.M))


def test_the_wire_table_lists_every_column():
    table = _wire_table(DESIGN.read_text())
    made, listed = _columns_the_code_makes(), _columns_the_docstring_lists()
    assert listed and listed <= made, f"wire.py's docstring lists columns the code does not make: {listed - made}"
    assert made - table == set(), f"columns of common/wire.py missing from DESIGN.md's wire table: {made - table}"
    assert table - made == set(), f"DESIGN.md's wire table names columns common/wire.py does not make: {table - made}"
