"""The documentation a newcomer reads: what it cites exists."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# files our tools write (not citations): `proteus bench --suite h100`'s table, the mutation
# run's summary
WRITTEN = {"h100.md", "summary.md", "/summary.md"}
# pages other developers are writing, cited before they land on main: each is named here with
# who owes it, so the gap is visible rather than silent; remove the entry when the page lands
AWAITED: dict[str, str] = {}
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
        for ref in _cited(f.read_text(errors="replace")) - WRITTEN - set(AWAITED):
            if not ((ROOT / ref).exists() or (f.parent / ref).exists() or Path(ref).name in names):
                missing.append(f"{f.relative_to(ROOT)} cites {ref}")
    assert not missing, "cited files that are not in the repository:\n" + "\n".join(missing)


def test_an_awaited_page_is_still_missing():
    # once it lands, its entry in AWAITED must go (the citation check then covers it)
    landed = [p for p in AWAITED if (ROOT / p).exists()]
    assert not landed, f"remove from AWAITED in {__file__}: {landed}"


def test_the_citation_check_sees_a_missing_file():
    assert _cited("see NOTES.md's table, docs/architecture.md and (README.md)") == {
        "NOTES.md", "docs/architecture.md", "README.md"}


README = ROOT / "README.md"


def test_the_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines; move detail to a docs/ page and link it"


def test_every_docs_page_is_linked_from_the_readme():
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", README.read_text()))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set(), f"docs pages the README does not link: {pages - linked}"


def test_the_readme_links_resolve():
    bad = [t for t in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text())
           if not (ROOT / t).exists()]
    assert not bad, bad


def _bash_lines(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.split("#")[0].strip() for b in blocks for line in b.splitlines()]


def test_the_readme_test_command_is_what_ci_runs():
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip().startswith("pip install")]
    assert len(ci) == 1, ci
    assert ci[0] in _bash_lines(README.read_text())


def test_the_readme_runs_the_default_job():
    assert ("pip install torch==2.13.0 && pip install -e . && proteus train --preset cpu-tiny"
            in _bash_lines(README.read_text()))


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_the_mutation_targets_and_their_table_name_code_that_exists(monkeypatch):
    # modules move (proteus/evaluate.py -> proteus/eval/, the schedules -> optim.py): the tool's
    # targets, the names they narrow to, and docs/testing.md's list and table follow them
    spec = importlib.util.spec_from_file_location("mutation", ROOT / "tools" / "mutation.py")
    mutation = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mutation", mutation)  # its dataclass looks itself up
    spec.loader.exec_module(mutation)
    for name, target in mutation.TARGETS.items():
        names = _top_level_names(ROOT / target.module)
        missing = [n for n in target.only + target.skip if n not in names]
        assert not missing, f"target {name}: {target.module} has no {missing}"
    text = (ROOT / "docs" / "testing.md").read_text()
    listed = re.search(r"\[TARGET \.\.\.\]\s+# (.+)", text).group(1).split()
    assert listed == list(mutation.TARGETS)
    today = re.findall(r"\[`(\w+)`: `([\w/.]+)`\]", text)  # the table's "today's target" notes
    assert today and all(mutation.TARGETS[t].module == m for t, m in today), today
