"""The package's shape: layers that import only downwards, no hidden cycles, names of our own.

Layers (the table of docs/architecture.md, which the README links), lowest first; a module may
import from its own layer's earlier modules and from any lower layer, never from a later one.
Function-local imports are allowed only in ``proteus/cli.py`` (its lazy per-subcommand imports).
Outside ``kernels/``, the kernels are used through their public names only.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each inner list is one layer, its modules in the order they may import each other.
LAYERS = [
    ["proteus.kernels"],  # kernels/: torch and triton only
    ["proteus.errors", "proteus.presets", "proteus.config", "proteus.options", "proteus.files",
     "proteus.caseops", "proteus.data", "proteus.synth", "proteus.dist", "proteus.device",
     "proteus.pack", "proteus.stats", "proteus.fingerprint"],
    # with the n-gram cache: counts, the blend, fitting, the negative example, the audit
    ["proteus.ops", "proteus.model", "proteus.optim", "proteus.quant", "proteus.gptq",
     "proteus.rans", "proteus.artifact", "proteus.tilt", "proteus.eval.progress",
     "proteus.eval.counts", "proteus.eval.stream_counts", "proteus.eval.blend", "proteus.eval.fit",
     "proteus.eval.hashed", "proteus.eval.cache_audit", "proteus.record_compat"],
    ["proteus.checkpoint"],
    # evaluation, sequenced in one place (pipeline) behind one entry point (the package)
    ["proteus.eval.scoring", "proteus.eval.plan", "proteus.eval.cache", "proteus.eval.tilt_step",
     "proteus.eval.ttt", "proteus.eval.ttt_phased", "proteus.eval.ttt_audit", "proteus.eval.audit",
     "proteus.eval.pipeline", "proteus.eval"],
    ["proteus.train", "proteus.run", "proteus.submit"],
    ["proteus.tools", "proteus.tools.sm90_specs", "proteus.tools.aot", "proteus.plot",
     "proteus.bench", "proteus.commands", "proteus.cli", "proteus.__main__"],
]
LOCAL_IMPORTS_ALLOWED = {"proteus/cli.py"}


def _rank(module: str) -> tuple[int, int] | None:
    """(layer, position within the layer) of a proteus module; kernels is one unit."""
    if module == "proteus.kernels" or module.startswith("proteus.kernels."):
        return (0, 0)
    for i, layer in enumerate(LAYERS):
        if module in layer:
            return (i, layer.index(module))
    return None


def _sources() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "proteus").rglob("*.py"):
        parts = p.relative_to(ROOT / "proteus").with_suffix("").parts
        if parts[-1] == "__init__":  # a subpackage is the module its __init__ makes
            parts = parts[:-1]
        if parts:
            out[".".join(("proteus", *parts))] = p
    out.update({"proteus.kernels." + p.stem: p for p in (ROOT / "kernels").glob("*.py")})
    return out


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, is at module level) for every import of ``path``; an import
    under a module-level ``try`` (an optional dependency) is at module level, one anywhere
    inside a function or class is not."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in tree.body:
        if isinstance(node, ast.Try):
            blocks = [node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)]
            top |= {id(n) for block in blocks for n in block}
    package = module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((base, node.lineno, id(node) in top))
    return out


def test_every_module_has_a_layer():
    missing = [m for m in _sources() if _rank(m) is None]
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


def test_no_import_goes_up_a_layer():
    bad = []
    for module, path in _sources().items():
        me = _rank(module)
        for name, line, _ in _imports(path, module):
            if not (name == "proteus" or name.startswith("proteus.")):
                continue
            if module.startswith("proteus.kernels.") and not name.startswith("proteus.kernels"):
                bad.append(f"{path.relative_to(ROOT)}:{line} kernels imports {name}")
                continue
            them = _rank(name) if name != "proteus" else (0, -1)
            if them is not None and them >= me and not (them[0] == 0 == me[0]):
                bad.append(f"{path.relative_to(ROOT)}:{line} {module} imports {name}")
    assert not bad, "imports going up (or across to a later module of) a layer:\n" + "\n".join(bad)


def test_no_function_local_imports_outside_the_allowed_places():
    bad = []
    for module, path in _sources().items():
        rel = str(path.relative_to(ROOT))
        if rel in LOCAL_IMPORTS_ALLOWED:
            continue
        bad += [f"{rel}:{line} imports {name} inside a function"
                for name, line, top in _imports(path, module) if not top]
    assert not bad, "\n".join(bad)


def test_outside_kernels_only_public_kernel_names_are_imported():
    bad = []
    for module, path in _sources().items():
        if module.startswith("proteus.kernels."):
            continue
        bad += [f"{path.relative_to(ROOT)}:{line} imports {name}"
                for name, line, _ in _imports(path, module)
                if name.startswith("proteus.kernels.") and name.split(".")[2].startswith("_")]
    for path in [*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        bad += [f"{path.relative_to(ROOT)}:{line} imports {name}"
                for name, line, _ in _imports(path, "tests.x")
                if name.startswith("proteus.kernels._")]
    assert not bad, "use the names proteus.kernels exports:\n" + "\n".join(bad)


def test_kernels_holds_ops_only():
    # the op modules and their shared private helpers; tooling lives in proteus/tools
    ops = sorted(p.stem for p in (ROOT / "kernels").glob("*.py") if not p.stem.startswith("_"))
    assert ops == ["gptq", "int6_matmul", "leaky_relu2", "ngram_table", "softcapped_ce",
                   "xsa_attention"], ops
    helpers = sorted(p.stem for p in (ROOT / "kernels").glob("_*.py"))
    assert helpers == ["__init__", "_backend", "_common", "_keys", "_origin"], helpers


LAYER_TABLES = ["README.md", "docs/architecture.md"]  # the pages that print the layer table


def _table_layers(text: str) -> list[list[str]]:
    """The modules of each row of a markdown layer table (``| 2 | `config`, `data` | ... |``)."""
    rows = re.findall(r"^\| (\d+) \| ([^|]*) \|", text, re.M)
    return [["proteus." + m if m != "proteus.kernels" else m
             for m in re.findall(r"`([^`]+)`", mods)] for _, mods in rows]


@pytest.mark.parametrize("page", LAYER_TABLES)
def test_the_layer_table_is_the_layer_test(page):
    assert _table_layers((ROOT / page).read_text()) == LAYERS, (
        f"{page}'s layer table and LAYERS in {__file__} describe different layers")


def test_the_layer_check_catches_an_upward_import(tmp_path):
    # the checker itself: a data module importing the evaluator is reported
    src = tmp_path / "data.py"
    src.write_text("from proteus.eval.scoring import score_tokens\n")
    names = [n for n, _, _ in _imports(src, "proteus.data")]
    assert names == ["proteus.eval.scoring"] and _rank("proteus.eval.scoring") > _rank(
        "proteus.data")


def test_the_local_import_check_tells_a_function_from_an_optional_import(tmp_path):
    src = tmp_path / "plot.py"
    src.write_text("try:\n    import matplotlib\nexcept ImportError:\n    matplotlib = None\n"
                   "def f():\n    try:\n        import numpy\n    except ImportError:\n"
                   "        pass\n")
    assert [(n, top) for n, _, top in _imports(src, "proteus.plot")] == [
        ("matplotlib", True), ("numpy", False)]


def _installed() -> importlib.metadata.Distribution:
    """The installed distribution (its dist-info, which has a RECORD; not the egg-info that an
    editable install leaves in the source tree)."""
    for dist in importlib.metadata.distributions(name="proteus-kernels"):
        if dist.read_text("RECORD"):
            return dist
    pytest.fail("proteus-kernels is not installed (pip install -e .)")


def test_installed_distribution_takes_no_top_level_kernels_module():
    dist = _installed()
    top = (dist.read_text("top_level.txt") or "").split()
    assert "kernels" not in top and "proteus" in top
    record = [line.split(",")[0] for line in dist.read_text("RECORD").splitlines()]
    assert not [p for p in record if p.startswith("kernels/")], record
    # an editable install maps import names to folders: 'kernels' must not be one of them
    for path in record:
        if path.endswith("_finder.py"):
            text = Path(dist.locate_file(path)).read_text()
            assert "'proteus.kernels':" in text and "'kernels':" not in text



def test_import_kernels_outside_the_source_tree_is_not_ours(tmp_path):
    # from any other folder, the name `kernels` is free for Hugging Face's package (or absent)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import importlib.util, proteus.kernels as pk; s = importlib.util.find_spec('kernels');"
            "print(s.origin if s else None); print(pk.__name__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    origin, name = r.stdout.split()
    assert name == "proteus.kernels"
    assert origin == "None" or not origin.startswith(str(ROOT)), origin


def test_kernels_import_as_proteus_kernels():
    import proteus.kernels as pk

    assert Path(pk.__file__).resolve().parent.name == "kernels"
    assert callable(pk.xsa_attention) and callable(pk.leaky_relu2_mlp)


def test_distribution_name_is_our_own():
    # neither PyPI's "proteus" (a Tryton client) nor Hugging Face's "kernels"
    assert _installed().metadata["Name"] == "proteus-kernels"
