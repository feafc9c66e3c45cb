"""H100 readiness: every kernel's production configs compile for sm_90 cleanly.

Fails if a production config spills registers, needs more than 227 KB of shared memory, fails
to compile, or (for matrix kernels) has no wgmma (HGMMA) instruction.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proteus.tools.aot import format_table, problems, report_rows
from proteus.tools.sm90_specs import SPECS

pytestmark = pytest.mark.aot


@pytest.fixture(scope="module")
def rows():
    return report_rows()


def test_no_production_config_has_a_problem(rows):
    bad = {r["kernel"]: problems(r) for r in rows if problems(r)}
    assert not bad, f"sm_90 problems: {bad}\n{format_table(rows)}"


def test_every_kernel_module_is_in_the_report(rows):
    ops = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "kernels").glob("*.py")
                 if not p.stem.startswith("_") and "@triton.jit" in p.read_text())
    assert sorted(SPECS) == ops, (
        "proteus/tools/sm90_specs.py: one SPECS entry per op module with Triton kernels")
    for op in ops:
        assert any(r["kernel"].startswith(op) for r in rows), f"{op} has no sm90 rows"


def test_matrix_kernels_use_wgmma(rows):
    mats = [r for r in rows if r.get("matrix")]
    assert mats and all(r["wgmma"] and r["n_hgmma"] > 0 for r in mats)


def test_problems_detects_spills_and_smem():
    row = dict(spill_stores=8, spill_loads=0, smem_ok=False, smem=300_000, matrix=True,
               wgmma=False)
    found = " ".join(problems(row))
    assert "spills" in found and "shared memory" in found and "wgmma" in found
