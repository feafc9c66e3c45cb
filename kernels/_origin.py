"""Run at the first import of ``proteus.kernels``: ``proteus`` and ``proteus.kernels`` must come
from one tree (see the package docstring). Reads no file: it compares module paths."""

import sys
from pathlib import Path


def check_one_tree() -> None:
    """``proteus`` and ``proteus.kernels`` from one tree: the installed layout (``kernels``
    inside ``proteus``) or the repository's (``kernels`` beside ``proteus``)."""
    parent = sys.modules.get(__package__.rpartition(".")[0])
    if parent is None:
        return
    here = Path(__file__).resolve().parent
    hint = ("run from another folder, rename that folder, or install that tree with "
            "`pip install -e`")
    origin = getattr(parent, "__file__", None)
    if origin is None:  # a namespace package: a folder without __init__.py came first
        where = ", ".join(str(p) for p in getattr(parent, "__path__", [])) or "?"
        raise ImportError(f"proteus: the folder {where} (no __init__.py: a clone of the "
                          f"repository?) shadows the installed package proteus; {hint}")
    pkg = Path(origin).resolve().parent
    if here.parent not in (pkg, pkg.parent):
        raise ImportError(f"proteus: the package came from {pkg} but proteus.kernels from "
                          f"{here}: the folder {pkg} shadows the installed package; {hint}")


check_one_tree()
