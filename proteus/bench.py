"""``proteus bench`` and ``proteus kernels report``.

``bench`` runs the pytest-benchmark suite in ``benchmarks/`` (every benchmark checks its kernel
against the reference before timing it), writes the JSON and prints one table per group with
each provider's median time as a ratio to the group's baseline (``ref``, or the provider that
marks itself ``baseline``), plus throughput where the benchmark states its work (tokens,
items, bytes, FLOPs) and, on a GPU, % of the H100 roofline.

``kernels report`` compiles every kernel for sm_90 in a subprocess (compile mode, never the
interpreter) and prints registers, spills, shared memory, wgmma use and occupancy per config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from proteus.config import ConfigError
from proteus.files import atomic_write_json
from proteus.kernels._aot import format_table, problems

# H100 SXM dense peaks: HBM3 bandwidth and bf16/fp16 tensor-core throughput
H100_GBPS = 3350.0
H100_TFLOPS = 989.0


def _bench_dir() -> Path:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (root / "conftest.py").exists():
        raise ConfigError(f"benchmarks not found at {root}; run `proteus bench` from a clone of "
                          "the repository (pip install -e .)")
    return root


def _rate(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.1f} "


def summarize(data: dict) -> str:
    """Tables of a pytest-benchmark JSON: median, ratio to the group's baseline, throughput."""
    groups: dict[str, list[dict]] = {}
    for b in data.get("benchmarks", []):
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    out = []
    for group, rows in groups.items():
        base = next((r for r in rows if r["extra_info"].get("baseline")), None) or next(
            (r for r in rows if r["extra_info"].get("provider") == "ref"), rows[0])
        t0 = base["stats"]["median"]
        out.append(f"\n{group}")
        vs = "vs " + base["extra_info"].get("provider", "?")
        w = max([16] + [len(str(r["extra_info"].get("provider", r["name"]))) for r in rows])
        out.append(f"  {'provider':{w}s} {'median':>12s} {vs:>14s}  throughput")
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            info, t = r["extra_info"], r["stats"]["median"]
            tp = []
            if "tokens" in info:
                tp.append(f"{_rate(info['tokens'] / t)}tokens/s")
            if "items" in info:
                tp.append(f"{_rate(info['items'] / t)}ops/s")
            if "bytes" in info:
                gbps = info["bytes"] / t / 1e9
                tp.append(f"{gbps:.2f} GB/s" + (f" ({100 * gbps / H100_GBPS:.1f}% of H100 HBM)"
                                                 if info.get("device") == "cuda" else ""))
            if "flops" in info:
                tf = info["flops"] / t / 1e12
                tp.append(f"{tf:.3f} TFLOPS" + (f" ({100 * tf / H100_TFLOPS:.1f}% of H100 bf16)"
                                                if info.get("device") == "cuda" else ""))
            speed = t0 / t
            name = info.get("provider", r["name"])
            rel = ("baseline" if r is base else f"{speed:.2f}x faster" if speed >= 1
                   else f"{1 / speed:.2f}x slower")
            out.append(f"  {name:{w}s} {t * 1e3:10.3f}ms {rel:>14s}")
            if tp:
                out[-1] += "  " + ", ".join(tp)
    device = {r["extra_info"].get("device") for rs in groups.values() for r in rs}
    if "cpu" in device:
        out.append("\n(cpu: Triton kernels ran on the interpreter at small shapes; their times "
                   "prove the harness, not the kernels' speed)")
    return "\n".join(out)


def run_bench(json_path: str, pytest_args: list[str] | None = None) -> int:
    bench = _bench_dir()
    cmd = [sys.executable, "-m", "pytest", str(bench), "-o", "addopts=", "-p", "no:cacheprovider",
           "-q", f"--rootdir={bench.parent}", f"--benchmark-json={json_path}",
           "--benchmark-columns=median,iqr,rounds", *(pytest_args or [])]
    print("proteus bench:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=bench.parent)
    try:
        with open(json_path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = None  # nothing was timed (every benchmark failed its check, or none ran)
    if data and data.get("benchmarks"):
        print(summarize(data))
        print(f"\nresults: {json_path}")
    elif rc == 0:
        rc = 5  # pytest's "no tests collected"
    if rc != 0:
        print(f"proteus bench: pytest exited with {rc} (a kernel failed its check or a "
              "benchmark errored; see above)", file=sys.stderr)
    return rc


def run_report(json_path: str | None = None) -> int:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "proteus.kernels._aot", "--json"], env=env,
                            stdout=subprocess.PIPE, text=True)
    rows = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            row = json.loads(line)
            rows.append(row)
            print(f"  compiled {row.get('kernel')} [{row.get('shape')}]", file=sys.stderr,
                  flush=True)
    proc.wait()
    if not rows:
        print("proteus kernels report: no kernel compiled (is Triton's ptxas available?)",
              file=sys.stderr)
        return 1
    print(format_table(rows))
    bad = [r for r in rows if problems(r)]
    if json_path:
        atomic_write_json(Path(json_path), rows)
    if bad:
        print(f"\n{len(bad)} config(s) with problems (spills, shared memory over 227 KB, no "
              "wgmma on a matrix path, or a compile error)", file=sys.stderr)
        return 1
    print(f"\n{len(rows)} configs: 0 spills, shared memory within 227 KB, wgmma on every "
          "matrix path")
    return 0
