"""The code a submission ships: one self-contained, compressed, self-extracting Python script.

The challenge counts the bytes of the code a submission runs plus the compressed model. Ours is
the part of the package that training and evaluation import — found by following ``proteus``
imports from the command line (``proteus.__main__`` and ``proteus.commands``), so the benchmark
harness and the ahead-of-time report stay out — with docstrings and comments removed
(``ast.unparse``: the same program), stored as LZMA + base85 inside a short loader. Run, the
script writes the modules to a temporary folder (Triton reads kernel source from files) and
calls ``proteus.cli.main`` with its own arguments: ``python packed.py train --preset smoke``.

Data (tokenizer and shards) are not code: the challenge provides them, so pass ``--tokenizer``,
``--train-files`` and ``--val-files`` to the packed script.
"""

from __future__ import annotations

import ast
import base64
import functools
import importlib.util
import json
import lzma
from pathlib import Path

ENTRY_MODULES = ("proteus.__main__", "proteus.commands")

LOADER = """import atexit,base64,json,lzma,os,shutil,sys,tempfile
F=json.loads(lzma.decompress(base64.b85decode({blob!r})))
R=tempfile.mkdtemp(prefix='proteus-')
atexit.register(shutil.rmtree,R,True)
for n,s in F.items():
 p=os.path.join(R,n);os.makedirs(os.path.dirname(p),exist_ok=True)
 with open(p,'w') as f:f.write(s)
sys.path.insert(0,R)
from proteus.cli import main
sys.exit(main())
"""


def package_dirs() -> dict[str, Path]:
    """Folder of each package of the distribution, found without importing ``proteus.kernels``
    (an editable install keeps it in the repository's ``kernels/`` folder)."""
    out = {}
    for name in ("proteus", "proteus.eval", "proteus.kernels"):
        spec = importlib.util.find_spec(name)
        out[name] = Path(next(iter(spec.submodule_search_locations)))
    return out


def _module_file(module: str, dirs: dict[str, Path]) -> Path | None:
    for pkg in sorted(dirs, key=len, reverse=True):
        if module == pkg:
            return dirs[pkg] / "__init__.py"
        if module.startswith(pkg + "."):
            rest = module[len(pkg) + 1 :]
            if "." in rest:
                continue
            path = dirs[pkg] / f"{rest}.py"
            return path if path.exists() else None
    return None


def _imports(path: Path, module: str) -> set[str]:
    """``proteus`` modules imported at module level by ``path`` (relative imports resolved).
    Function-local imports are the command line's lazy per-subcommand ones: the subcommands a
    submission runs are the entry modules."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in out if m == "proteus" or m.startswith("proteus.")}


def needed_modules(entries: tuple[str, ...] = ENTRY_MODULES) -> dict[str, Path]:
    """Every ``proteus`` module reachable by imports from ``entries`` (and the packages'
    ``__init__``s), with its source file."""
    dirs = package_dirs()
    todo = ["proteus", *entries]
    seen: dict[str, Path] = {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = _module_file(module, dirs)
        if path is None:  # a name imported from a module, not a module itself
            continue
        seen[module] = path
        todo.extend(_imports(path, module))
        parent = module.rsplit(".", 1)[0]
        if parent != module:
            todo.append(parent)
    return seen


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant) and isinstance(
                    body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def minify(source: str) -> str:
    """The same program without docstrings, comments or layout (``ast.unparse``)."""
    return ast.unparse(_strip_docstrings(ast.parse(source))) + "\n"


def _archive_name(module: str, path: Path) -> str:
    parts = module.split(".")
    if path.name == "__init__.py":
        return "/".join(parts) + "/__init__.py"
    return "/".join(parts) + ".py"


@functools.cache
def pack() -> str:
    """The self-extracting script's text (ASCII); built once per process (every run of a
    ``--seeds`` series and ``proteus submit`` count the same sources)."""
    files = {_archive_name(m, p): minify(p.read_text())
             for m, p in sorted(needed_modules().items())}
    payload = lzma.compress(json.dumps(files, separators=(",", ":")).encode(),
                            preset=9 | lzma.PRESET_EXTREME)
    return LOADER.format(blob=base64.b85encode(payload).decode())


def packed_code_bytes() -> int:
    """Bytes of the packed script: the code a submission ships, as the challenge counts it."""
    return len(pack().encode())


def source_bytes() -> int:
    """Bytes of the unpacked sources that training and evaluation import (for comparison)."""
    return sum(p.stat().st_size for p in needed_modules().values())
