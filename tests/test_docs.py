"""The documentation a newcomer reads: what it cites exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# files our tools write (not citations): `proteus bench --suite h100`'s table, the mutation
# run's summary
WRITTEN = {"h100.md", "summary.md", "/summary.md"}
SOURCES = ["README.md", "setup.py", "proteus", "kernels", "tests", "benchmarks", "tools", "docs",
           ".ci"]


def _files() -> list[Path]:
    out = []
    for name in SOURCES:
        p = ROOT / name
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += [f for f in p.rglob("*") if f.is_file() and f.suffix in (".py", ".md", "")
                    and "__pycache__" not in f.parts]
    return [f for f in out if f.name != "test_docs.py"]  # this file names missing ones


def _cited(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w./-])([\w./-]*[\w-]\.md)\b", text))


def test_every_cited_markdown_file_exists():
    names = {p.name for p in _files()}
    missing = []
    for f in _files():
        for ref in _cited(f.read_text(errors="replace")) - WRITTEN:
            if not ((ROOT / ref).exists() or (f.parent / ref).exists() or Path(ref).name in names):
                missing.append(f"{f.relative_to(ROOT)} cites {ref}")
    assert not missing, "cited files that are not in the repository:\n" + "\n".join(missing)


def test_the_citation_check_sees_a_missing_file():
    assert _cited("see NOTES.md's table, docs/architecture.md and (README.md)") == {
        "NOTES.md", "docs/architecture.md", "README.md"}
