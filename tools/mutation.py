"""Mutation testing of the modules that produce reported numbers (run before a release, not in CI).

    pip install -e ".[test,mutation]"
    python tools/mutation.py                     # every target below, one after the other
    python tools/mutation.py evaluate ngram      # some of them
    python tools/mutation.py --count             # how many mutants each target has, no run
    python tools/mutation.py --sample 150 ngram  # a fixed-seed random sample of its mutants
    python tools/mutation.py --work W --retest schedules  # survivors of W's session, today's tests

Each target is one module of ``proteus/``, optionally narrowed to some of its functions or
classes, mutated by cosmic-ray (https://github.com/sixty-north/cosmic-ray) and checked with
the tests that cover it (a fast selection, ``-x``: the first failure kills the mutant). The
work happens in a copy of the working tree (``--work``, default a temporary folder), so the
checkout is never modified; one mutant at a time, since the machine is shared.

Which mutants: a curated subset of cosmic-ray's operators, one natural alternative per
operator (``+`` <-> ``-``, ``*`` <-> ``/``, ``<`` <-> ``<=``, ``==`` <-> ``!=``, ``and`` <->
``or``, ``not`` added or removed, numbers +-1, True <-> False, ``break`` <-> ``continue``, a
loop run zero times, an ``except`` that catches nothing): cosmic-ray's full cross product
(every binary operator into each of 11 others) is ~3x as many mutants, mostly duplicates of
these. Mutants that cannot change a number are not made: those inside type annotations (strings
at run time here), f-strings, logging calls and the message of a ``raise``.

Output: ``<work>/<target>.sqlite`` (cosmic-ray's session; ``cr-report`` reads it),
``<work>/<target>.survivors.txt`` (the diff of every surviving mutant) and a summary table on
stdout and in ``<work>/summary.md``. The score is killed / (killed + survived); a timeout
counts as killed (the mutant changed what the code does), and is listed.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = f"{sys.executable} -m pytest -x -q -p no:cacheprovider -p no:randomly"


@dataclass(frozen=True)
class Target:
    module: str  # path under the repository root
    tests: str  # pytest arguments: the tests that cover it
    only: tuple[str, ...] = ()  # top-level functions/classes to mutate ('' = all)
    skip: tuple[str, ...] = ()  # top-level functions/classes not to mutate


SCHEDULES = ("lr_scale", "muon_momentum", "WeightAverages")
TARGETS = {
    "evaluate": Target("proteus/eval/scoring.py", "tests/test_evaluate.py"),
    "data": Target("proteus/data.py", "tests/test_data.py"),
    "quant": Target("proteus/quant.py", "tests/test_quant.py"),
    # the per-row quantiser lives with the int6 kernel (one quantiser for model and artifact)
    "quantiser": Target("kernels/int6_matmul.py", "tests/test_quant.py",
                        only=("quantize_rows", "CLIP_PERCENTILES", "QMAX")),
    "artifact": Target("proteus/artifact.py", "tests/test_quant.py"),
    # the device-table backend runs on the Triton interpreter here (minutes per mutant); its
    # counts are tested equal to the reference by the interpret-marked tests
    "ngram": Target("proteus/eval/counts.py", "tests/test_ngram.py -m 'not interpret'",
                    skip=("earlier_counts_triton",)),
    "blend": Target("proteus/eval/blend.py", "tests/test_ngram.py -m 'not interpret'"),
    "cache_audit": Target("proteus/eval/cache_audit.py",
                          "tests/test_ngram.py -m 'not interpret'"),
    "optim": Target("proteus/optim.py", "tests/test_optim.py tests/test_model.py -k "
                    "'muon or newton or optimizer or optim'", skip=SCHEDULES),
    # the training schedules and weight averages live with the optimisers; training's tests
    "schedules": Target("proteus/optim.py",
                        "tests/test_train.py -k 'lr_ or momentum or average'", only=SCHEDULES),
    # the preset values (tuning choices; the h100 preset's are the record's, pinned by a test)
    # live in proteus/presets.py, which is not a target
    "config": Target("proteus/config.py", "tests/test_config.py"),
}

# One alternative per operator (cosmic-ray operator names, matched in full).
KEEP = re.compile("|".join([
    r"core/NumberReplacer",
    r"core/ReplaceBinaryOperator_(Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Div|Div_FloorDiv|"
    r"Mod_FloorDiv|Pow_Mul|BitOr_BitAnd|BitAnd_BitOr|BitXor_BitOr|LShift_RShift|RShift_LShift)",
    r"core/ReplaceComparisonOperator_(Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Eq_NotEq|NotEq_Eq|Is_IsNot|"
    r"IsNot_Is|In_NotIn|NotIn_In)",
    r"core/ReplaceUnaryOperator_(USub_UAdd|Delete_Not)",
    r"core/AddNot", r"core/ReplaceAndWithOr", r"core/ReplaceOrWithAnd",
    r"core/ReplaceTrueWithFalse", r"core/ReplaceFalseWithTrue",
    r"core/ReplaceBreakWithContinue", r"core/ReplaceContinueWithBreak",
    r"core/ZeroIterationForLoop", r"core/ExceptionReplacer",
]))


def _spans(source: str, target: Target) -> tuple[list, list]:
    """(spans to mutate, spans never to mutate) as ((line, col), (line, col)) character
    positions, the form cosmic-ray reports (ast's columns are UTF-8 byte offsets)."""
    lines = source.splitlines()

    def pos(line: int, byte_col: int) -> tuple[int, int]:
        text = lines[line - 1].encode("utf-8")
        return line, len(text[:byte_col].decode("utf-8", errors="ignore"))

    def span(node):
        return pos(node.lineno, node.col_offset), pos(node.end_lineno, node.end_col_offset)

    tree = ast.parse(source)
    include = []
    for node in tree.body:  # module-level constants too, unless ``only`` names what to take
        name = getattr(node, "name", None)
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        if (not target.only or name in target.only) and name not in target.skip:
            include.append(span(node))
    exclude = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr | ast.Raise):
            exclude.append(span(node))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(
                node.func.value, ast.Name) and node.func.value.id == "log":
            exclude.append(span(node))
        elif isinstance(node, ast.FunctionDef):
            for a in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs,
                      node.args.vararg, node.args.kwarg]:
                if a is not None and a.annotation is not None:
                    exclude.append(span(a.annotation))
            if node.returns is not None:
                exclude.append(span(node.returns))
        elif isinstance(node, ast.AnnAssign):
            exclude.append(span(node.annotation))
    return include, exclude


def _inside(start, end, spans) -> bool:
    return any(a <= start and end <= b for a, b in spans)


def _copy_tree(work: Path) -> Path:
    """The tracked and untracked (not ignored) files of the checkout, copied to work/src."""
    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for f in filter(None, files):
        rel = f.decode()
        if not (ROOT / rel).is_file():
            continue
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    # the installed package maps proteus.kernels to the checkout's kernels/; in the copy it is
    # found first through this link, so mutants of kernels/ are the ones imported
    (src / "proteus" / "kernels").symlink_to(Path("..") / "kernels")
    return src


def _env(src: Path) -> dict:
    env = dict(os.environ)
    # the copy's proteus (and, through its link, its kernels) comes first on the path
    env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    return {k: v for k, v in env.items() if not k.startswith("PROTEUS_")}


def _init(name: str, target: Target, src: Path, work: Path, timeout: float) -> Path:
    cfg, db = work / f"{name}.toml", work / f"{name}.sqlite"
    cfg.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{target.module}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{PYTEST} {target.tests}"\n'.replace("'", "\\\"") +
        "[cosmic-ray.distributor]\nname = \"local\"\n")
    if db.exists():
        db.unlink()
    subprocess.run([sys.executable, "-m", "cosmic_ray.cli", "init", str(cfg), str(db)], cwd=src,
                   check=True, env=_env(src))
    return cfg


def _filter(db_path: Path, target: Target, src: Path, sample: int) -> tuple[int, int]:
    """Mark the mutants outside the curated set and scope as skipped, and with ``sample`` all
    but that many of the rest, drawn with a fixed seed; (kept, skipped)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    include, exclude = _spans((src / target.module).read_text(), target)
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        items = list(db.pending_work_items)
        keep = []
        for item in items:
            m = item.mutations[0]
            start, end = tuple(m.start_pos), tuple(m.end_pos)
            if (KEEP.fullmatch(m.operator_name) and _inside(start, end, include)
                    and not _inside(start, end, exclude)):
                keep.append(item.job_id)
        if sample and sample < len(keep):
            keep = random.Random(0).sample(sorted(keep), sample)
        keep = set(keep)
        for item in items:
            if item.job_id not in keep:
                db.set_result(item.job_id, WorkResult(output="not in the curated set, scope "
                                                      "or sample",
                                                      worker_outcome=WorkerOutcome.SKIPPED))
    return len(keep), len(items) - len(keep)


def _summary(name: str, db_path: Path, work: Path) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    out = dict(name=name, killed=0, survived=0, timeout=0, incompetent=0, pending=0,
               minutes=float((work / f"{name}.minutes").read_text())
               if (work / f"{name}.minutes").exists() else float("nan"))
    lines = []
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        out["pending"] = sum(1 for _ in db.pending_work_items)
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            if result.test_outcome == TestOutcome.SURVIVED:
                out["survived"] += 1
                m = item.mutations[0]
                lines.append(f"--- {item.job_id} {m.operator_name} line {m.start_pos[0]}\n"
                             f"{result.diff}\n")
            elif result.test_outcome == TestOutcome.KILLED:
                out["killed"] += 1
                out["timeout"] += (result.output or "").strip() == "timeout"
            else:
                out["incompetent"] += 1
    (work / f"{name}.survivors.txt").write_text("".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("targets", nargs="*", metavar="TARGET",
                    help=f"some of {', '.join(TARGETS)} (default: all)")
    ap.add_argument("--work", default="", help="work folder (default: a new temporary one)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant")
    ap.add_argument("--sample", type=int, default=0,
                    help="run only this many mutants per target, a fixed-seed random sample")
    ap.add_argument("--count", action="store_true", help="count the mutants, run nothing")
    ap.add_argument("--resume", action="store_true",
                    help="continue the sessions in --work instead of starting them again")
    ap.add_argument("--report", action="store_true",
                    help="only print the table of the sessions already in --work")
    ap.add_argument("--retest", action="store_true",
                    help="run the survivors of the sessions in --work again, against the "
                    "current tests (the mutated modules must be unchanged)")
    args = ap.parse_args(argv)
    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="proteus-mutation-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.report:
        rows = [_summary(n, work / f"{n}.sqlite", work) for n in names
                if (work / f"{n}.sqlite").exists()]
        print(_table(rows))
        return 0
    if args.retest:
        if not args.work:
            ap.error("--retest needs the --work folder of an earlier run")
        for name in names:  # mutants are recorded by position: the module must be the same
            old = work / "src" / TARGETS[name].module
            if old.read_bytes() != (ROOT / TARGETS[name].module).read_bytes():
                ap.error(f"{TARGETS[name].module} changed since that run: start a new one")
    src = work / "src" if args.resume else _copy_tree(work)
    print(f"work folder {work}", flush=True)
    rows = []
    for name in names:
        target = TARGETS[name]
        db = work / f"{name}.sqlite"
        cfg = work / f"{name}.toml"
        if args.retest:
            with sqlite3.connect(db) as con:
                n = con.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'").rowcount
            print(f"{name}: {n} survivors to test again", flush=True)
        elif not args.resume or not db.exists():
            cfg = _init(name, target, src, work, args.timeout)
            kept, skipped = _filter(db, target, src, args.sample)
            print(f"{name}: {kept} mutants ({skipped} outside the curated set, scope or sample)",
                  flush=True)
            if args.count:
                continue
            # the tests must pass on the unmutated copy, or every mutant would look killed
            base = subprocess.run(f"{PYTEST} {target.tests}", shell=True, cwd=src, env=_env(src),
                                  capture_output=True, text=True)
            if base.returncode != 0:
                print(f"{name}: the tests fail without any mutation:\n{base.stdout[-3000:]}")
                return 1
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "cosmic_ray.cli", "exec", str(cfg), str(db)],
                       cwd=src, env=_env(src), check=True)
        minutes = work / f"{name}.minutes"  # summed over resumed and retested runs
        spent = (float(minutes.read_text()) if minutes.exists() and (args.resume or args.retest)
                 else 0.0) + (time.time() - t0) / 60
        minutes.write_text(f"{spent:.2f}")
        rows.append(_summary(name, db, work))
        print(_table(rows[-1:]), flush=True)
    if rows:
        text = _table(rows)
        (work / "summary.md").write_text(text + "\n")
        print(text)
    return 0


def _table(rows: list[dict]) -> str:
    out = ["| module | killed | survived | score | timeouts | incompetent | not run | minutes |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        total = r["killed"] + r["survived"]
        score = f"{100 * r['killed'] / total:.1f}%" if total else "–"
        out.append(f"| {TARGETS[r['name']].module} | {r['killed']} | {r['survived']} | {score} "
                   f"| {r['timeout']} | {r['incompetent']} | {r['pending']} | {r['minutes']:.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
