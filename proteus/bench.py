"""``proteus bench``, its H100 suite, and ``proteus kernels report``.

``bench`` runs the pytest-benchmark suite in ``benchmarks/`` — by default the quick subset
(the kernels without their compiled providers, no cpu-tiny training step unless named;
``full`` runs everything), printing its estimated duration first and one
line per benchmark, each record appended to ``<json>.partial.jsonl`` as it is measured (an
interrupted run writes the JSON and CSV of those, exit code 130) — (every benchmark checks its
provider against the reference before timing it; peers that cannot run here are skipped with
a reason), then puts the results on record: the pytest-benchmark JSON gains a ``proteus``
section (the environment: device, torch / triton / CUDA versions, commit, date; and one record
per provider: p20/p50/p80 per call, throughput, % of the roofline on a GPU, ratio to the
group's baseline, peak memory, or the reason it was skipped), the same records go to a CSV
beside it, and one table per group is printed. ``--plot DIR`` draws one chart per benchmark
family (``proteus.plot``).

``bench --suite h100`` is the whole check on one H100 or H200: the ``cuda``-marked tests,
then every kernel at its production shape (and the sweep around it) with the peers that are
installed, one markdown table (time, TFLOPS or GB/s, % of the roofline, ratio to the best
peer) and the charts. Without a GPU it says so and exits 2.

``kernels report`` compiles every kernel for sm_90 in a subprocess (compile mode, never the
interpreter) and prints registers, spills, shared memory, wgmma use and occupancy per config.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from proteus import plot
from proteus.config import ConfigError
from proteus.files import atomic_write, atomic_write_json
from proteus.kernels._aot import format_table, problems

# Dense bf16/fp16 tensor-core FLOP/s and HBM bytes/s, matched on the CUDA device name (first
# match wins); any other GPU is compared with the H100 SXM, and says so.
PEAKS = (("H100 PCIe", 756e12, 2.0e12), ("H100 NVL", 835e12, 3.9e12),
         ("H100", 989e12, 3.35e12), ("H200", 989e12, 4.8e12))

OURS = ("triton", "ref", "ref-compile")
# Every benchmark (benchmarks/test_bench_<name>.py) and the providers it parametrizes, for
# `--benchmark` / `--provider` to check names against before running anything;
# tests/test_bench_cli.py checks that these are exactly what the benchmark files collect.
BENCHMARKS: dict[str, tuple[str, ...]] = {
    "xsa_attention": (*OURS, "sdpa-math", "sdpa-efficient", "sdpa-flash", "sdpa-cudnn",
                      "flash-attn", "fa3"),
    "leaky_relu2": (*OURS, "liger"),
    "int6_matmul": (*OURS, "dense", "torchao-int8", "torchao-int4"),
    "softcapped_ce": (*OURS, "liger"),
    "ngram": ("triton", "ref", "numpy-sorted", "numpy", "numpy-history-only",
              "numpy-whole-stream", "hashed-record"),
    "train_step": ("plain-eager", "proteus-eager-plain-features", "proteus-eager",
                   "proteus-compile"),
}
# Left out of the quick default run unless asked for with --benchmark: the cpu-tiny training
# step (17 steps per provider and precision: minutes on a loaded CPU).
QUICK_LEAVES_OUT = ("train_step",)
# The H100 suite: the kernels (not the CPU-only cache scoring or the cpu-tiny train step).
H100_SUITE = ("xsa_attention", "leaky_relu2", "int6_matmul", "softcapped_ce", "ngram")
H100_SUITE_DESELECT = "not cache_scoring"

CSV_FIELDS = ("benchmark", "family", "group", "shape", "x_name", "x", "provider", "status",
              "reason", "note", "p20_ms", "p50_ms", "p80_ms", "samples", "reps", "metric",
              "throughput", "tflops", "gbps", "roofline_pct", "roofline", "vs_baseline",
              "baseline", "mem_peak_bytes", "mem_kind", "device", "torch", "triton", "cuda",
              "commit", "date")


def _bench_dir() -> Path:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (root / "conftest.py").exists():
        raise ConfigError(f"benchmarks not found at {root}; run `proteus bench` from a clone of "
                          "the repository (pip install -e .)")
    return root


# ---------------------------------------------------------------------------------------------
# The environment on record


def _git(root: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def environment(root: Path | None = None) -> dict:
    """Where and when the numbers were taken: device, versions, commit, date (UTC)."""
    root = root or Path(__file__).resolve().parent.parent
    cuda = torch.cuda.is_available()
    commit = _git(root, "rev-parse", "HEAD")
    dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no")) if commit else False
    return {
        "device": torch.cuda.get_device_name(0) if cuda else _cpu_name(),
        "device_kind": "cuda" if cuda else "cpu",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "",
        "cudnn": str(torch.backends.cudnn.version() or "") if cuda else "",
        "python": platform.python_version(),
        "triton_interpreter": not cuda or os.environ.get("TRITON_INTERPRET") == "1",
        "commit": (commit + ("-dirty" if dirty else "")) if commit else "unknown",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def peaks(device: str) -> tuple[str, float, float]:
    """(name, FLOP/s, bytes/s) of the roofline a CUDA device is compared with."""
    for name, flops, bw in PEAKS:
        if name in device:
            return name, flops, bw
    return "H100 SXM (assumed)", PEAKS[2][1], PEAKS[2][2]


# ---------------------------------------------------------------------------------------------
# Records: one per provider and group, timed or skipped


def _rates(info: dict, t: float) -> dict:
    out = {}
    if "flops" in info:
        out["tflops"] = info["flops"] / t / 1e12
    if "bytes" in info:
        out["gbps"] = info["bytes"] / t / 1e9
    if "tokens" in info:
        out["tokens/s"] = info["tokens"] / t
    if "items" in info:
        out["ops/s"] = info["items"] / t
    return out


def _metric(rates: dict) -> tuple[str, float | None]:
    """The family's headline: TFLOPS, else GB/s, else tokens/s, else ops/s."""
    for key, name in (("tflops", "TFLOPS"), ("gbps", "GB/s"), ("tokens/s", "tokens/s"),
                      ("ops/s", "ops/s")):
        if key in rates:
            return name, rates[key]
    return "", None


def roofline_s(info: dict, device: str) -> float | None:
    """The roofline's time for a row's work: max(FLOPs / peak FLOP/s, bytes / peak bytes/s)."""
    _, pf, pb = peaks(device)
    times = [info[k] / p for k, p in (("flops", pf), ("bytes", pb)) if k in info]
    return max(times) if times else None


def _benchmark_name(fullname: str) -> str:
    stem = Path(fullname.split("::")[0]).stem
    return stem.removeprefix("test_bench_")


def records(data: dict, skips: list[dict] | tuple = (), env: dict | None = None) -> list[dict]:
    """Flat records of a pytest-benchmark JSON (per-call p20/p50/p80 from ``extra_info``;
    the round median for rows timed without them) and of the skipped benchmarks."""
    env = env or {}
    out = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        p50 = info.get("p50", b["stats"]["median"])
        rates = _rates(info, p50)
        metric, value = _metric(rates)
        rec = {
            "benchmark": _benchmark_name(b.get("fullname", "")),
            "family": info.get("family") or b.get("group") or b["name"],
            "group": b.get("group") or b["name"], "shape": info.get("shape", ""),
            "x_name": info.get("x_name", ""), "x": info.get("x"),
            "provider": info.get("provider", b["name"]), "status": "ok", "reason": "",
            "note": info.get("note", ""),
            "p20_ms": info["p20"] * 1e3 if "p20" in info else None, "p50_ms": p50 * 1e3,
            "p80_ms": info["p80"] * 1e3 if "p80" in info else None,
            "samples": info.get("samples", b["stats"].get("rounds")), "reps": info.get("reps"),
            "metric": metric, "throughput": value, "tflops": rates.get("tflops"),
            "gbps": rates.get("gbps"), "roofline_pct": None, "roofline": "",
            "mem_peak_bytes": info.get("mem_peak_bytes"), "mem_kind": info.get("mem_kind", ""),
            "baseline": bool(info.get("baseline")), "_info": info,
        }
        if info.get("device") == "cuda" and env.get("device_kind") == "cuda":
            rt = roofline_s(info, env["device"])
            if rt is not None:
                rec["roofline_pct"] = 100.0 * rt / p50
                rec["roofline"] = peaks(env["device"])[0]
        out.append(rec)
    for s in skips:
        out.append({
            "benchmark": _benchmark_name(s.get("nodeid", "")),
            "family": s.get("family") or s.get("group") or "", "group": s.get("group") or "",
            "shape": s.get("shape", ""), "x_name": s.get("x_name", ""), "x": s.get("x"),
            "provider": s.get("provider") or "", "status": "skipped",
            "reason": s.get("reason", ""), "note": s.get("note", ""), "_info": {},
        })
    _ratios(out)
    for rec in out:
        rec.update({k: env.get(k, "") for k in ("device", "torch", "triton", "cuda", "commit",
                                                 "date")})
    return out


def _ratios(recs: list[dict]) -> None:
    """``vs_baseline``: the group's baseline time / this time (> 1: faster than it). The
    baseline is the row marked ``baseline``, else ``ref``, else the group's first row."""
    groups: dict[str, list[dict]] = {}
    for r in recs:
        if r["status"] == "ok":
            groups.setdefault(r["group"], []).append(r)
    for rows in groups.values():
        base = next((r for r in rows if r["baseline"]), None) or next(
            (r for r in rows if r["provider"] == "ref"), rows[0])
        for r in rows:
            r["baseline"] = r is base
            r["_base"] = base["provider"]
            r["vs_baseline"] = base["p50_ms"] / r["p50_ms"]


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}x faster" if x >= 1 else f"{1 / x:.2f}x slower"


def _rate(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.1f} "


def _mem(n: int | None) -> str:
    if n is None:
        return ""
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _throughput_text(r: dict) -> str:
    info, t = r["_info"], r["p50_ms"] / 1e3
    parts = []
    for key, text in _rates(info, t).items():
        if key == "tokens/s":
            parts.append(f"{_rate(text)}tokens/s")
        elif key == "ops/s":
            parts.append(f"{_rate(text)}ops/s")
        elif key == "gbps":
            parts.append(f"{text:.2f} GB/s")
        else:
            parts.append(f"{text:.3f} TFLOPS")
    if r.get("roofline_pct") is not None:
        parts.append(f"{r['roofline_pct']:.1f}% of {r['roofline']} roofline")
    return ", ".join(parts)


def summarize(data: dict, skips: list[dict] | tuple = (), env: dict | None = None) -> str:
    """One table per group: p50 per call, p20-p80, ratio to the group's baseline, throughput,
    peak memory; then the group's skipped providers and why."""
    recs = records(data, skips, env)
    groups: dict[str, list[dict]] = {}
    for r in recs:
        groups.setdefault(r["group"], []).append(r)
    out = []
    for group, rows in groups.items():
        ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["p50_ms"])
        out.append(f"\n{group}")
        w = max([16] + [len(r["provider"]) for r in rows])
        if ok:
            vs = "vs " + ok[0]["_base"]
            out.append(f"  {'provider':{w}s} {'median':>12s} {'p20-p80 ms':>17s} {vs:>16s}"
                       "  throughput; peak memory")
        for r in ok:
            spread = (f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}" if r["p20_ms"] is not None
                      else "")
            rel = "baseline" if r["baseline"] else _fmt_ratio(r["vs_baseline"])
            line = f"  {r['provider']:{w}s} {r['p50_ms']:10.3f}ms {spread:>17s} {rel:>16s}"
            tail = "; ".join(x for x in (_throughput_text(r), _mem(r.get("mem_peak_bytes")))
                             if x)
            out.append(line + (f"  {tail}" if tail else ""))
        for r in rows:
            if r["status"] == "skipped":
                out.append(f"  {r['provider']:{w}s} skipped: {r['reason']}")
    if any(r.get("_info", {}).get("device") == "cpu" for r in recs):
        out.append("\n(cpu: Triton kernels ran on the interpreter at small shapes; their times "
                   "prove the harness, not the kernels' speed)")
    return "\n".join(out)


def _metric_text(metric: str, v: float) -> str:
    if metric in ("tokens/s", "ops/s"):
        return f"{_rate(v)}{metric}"
    return f"{v:,.1f} {metric}" if v >= 10 else f"{v:.3g} {metric}"


def markdown_table(recs: list[dict], ours: str = "triton") -> str:
    """One markdown table of every timed row: time, throughput, % of the roofline and the
    ratio to the best peer of its group (best peer's p50 / this p50; > 1: faster), then the
    skipped peers."""
    lines = ["| benchmark | shape | provider | p50 | p20–p80 | throughput | % of roofline "
             "| vs best peer | peak memory |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    groups: dict[str, list[dict]] = {}
    for r in recs:
        if r["status"] == "ok":
            groups.setdefault(r["group"], []).append(r)
    for rows in groups.values():
        peers = [r for r in rows if r["provider"] != ours]
        best = min(peers, key=lambda r: r["p50_ms"]) if peers else None
        for r in sorted(rows, key=lambda r: r["p50_ms"]):
            name = f"**{r['provider']}**" if r["provider"] == ours else r["provider"]
            vs = ""
            if best is not None:
                vs = f"{best['p50_ms'] / r['p50_ms']:.2f}×" + (" (best peer)" if r is best
                                                               else "")
            tp = _metric_text(r["metric"], r["throughput"]) if r.get("throughput") else ""
            pct = f"{r['roofline_pct']:.1f}%" if r.get("roofline_pct") is not None else ""
            spread = (f"{r['p20_ms']:.4g}–{r['p80_ms']:.4g} ms" if r.get("p20_ms") is not None
                      else "")
            lines.append(f"| {r['family']} | {r['shape']} | {name} | {r['p50_ms']:.4g} ms | "
                         f"{spread} | {tp} | {pct} | {vs} | {_mem(r.get('mem_peak_bytes'))} |")
    skipped = sorted({(r["provider"], r["reason"]) for r in recs if r["status"] == "skipped"})
    if skipped:
        lines += ["", "Skipped:"] + [f"- {p}: {why}" for p, why in skipped]
    return "\n".join(lines)


def write_csv(path: Path, recs: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in recs:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    atomic_write(path, buf.getvalue().encode())


def _public(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in recs]


# ---------------------------------------------------------------------------------------------
# Running


def _split(names) -> list[str]:
    return [n for item in (names or ()) for n in str(item).split(",") if n]


def check_selection(benchmarks, providers) -> tuple[list[str], list[str]]:
    """The benchmark and provider names asked for, each checked against ``BENCHMARKS``."""
    bench, prov = _split(benchmarks), _split(providers)
    for b in bench:
        if b not in BENCHMARKS:
            raise ConfigError(f"unknown benchmark {b!r}; one of {', '.join(BENCHMARKS)}")
    known = {p for b in (bench or BENCHMARKS) for p in BENCHMARKS[b]}
    for p in prov:
        if p not in known:
            where = f" of {', '.join(bench)}" if bench else ""
            raise ConfigError(f"unknown provider {p!r}{where}; one of {', '.join(sorted(known))}")
    return bench, prov


def _csv_path(json_path: str, csv_path: str | None) -> Path:
    return Path(csv_path) if csv_path else Path(json_path).with_suffix(".csv")


def _writable_file(path: Path, what: str) -> None:
    """Fail before a long run, not after it, when an output file cannot be written."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
        if not existed:
            path.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the {what} {path}: {e.strerror or e}") from None


def _partial_path(json_path: str) -> Path:
    """Where the records go as each benchmark finishes (one JSON object a line)."""
    return Path(json_path).with_suffix(".partial.jsonl")


def read_partial(path: Path) -> tuple[dict, list]:
    """The pytest-benchmark-like data and the skips of a ``--records-jsonl`` file (a run that
    was interrupted keeps these); a torn last line (killed mid-write) is left out."""
    data: dict = {"benchmarks": []}
    skips: list = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return data, skips
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        kind = rec.pop("kind", None)
        if kind == "benchmark" and "stats" in rec:
            data["benchmarks"].append(rec)
        elif kind == "skip":
            skips.append(rec)
    return data, skips


def _run_pytest_bench(json_path: str, pytest_args, bench_names, providers, quick: bool = False
                      ) -> tuple[int, dict, list, bool]:
    """Run the benchmarks in a pytest subprocess: (exit code, pytest-benchmark data, skips,
    interrupted). Each finished benchmark is appended to the partial JSONL file at once, so
    an interrupted run (Ctrl-C) still has the records of what it measured."""
    bench = _bench_dir()
    if not bench_names and quick:
        bench_names = [b for b in BENCHMARKS if b not in QUICK_LEAVES_OUT]
    files = [str(bench / f"test_bench_{b}.py") for b in bench_names] or [str(bench)]
    skips_path = Path(json_path).with_suffix(".skips.json")
    partial = _partial_path(json_path)
    partial.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *files, "-o", "addopts=", "-p", "no:cacheprovider",
           "-q", "-rs", f"--rootdir={bench.parent}", f"--benchmark-json={json_path}",
           "--benchmark-columns=median,iqr,rounds", f"--skips-json={skips_path}",
           f"--records-jsonl={partial}", "--progress-lines",
           "-o", "console_output_style=classic", *(["--quick"] if quick else []),
           *([f"--providers={','.join(providers)}"] if providers else []),
           *(pytest_args or [])]
    print("proteus bench:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=bench.parent)
    interrupted = False
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached pytest too: let it finish its current record
        interrupted = True
        try:
            rc = proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            rc = proc.wait()
    data, skips = {}, []
    try:
        data = json.loads(Path(json_path).read_text())
    except (OSError, ValueError):
        pass  # nothing was timed (every benchmark failed its check, or none ran)
    try:
        skips = json.loads(skips_path.read_text())
        skips_path.unlink()
    except (OSError, ValueError):
        pass
    if interrupted or not data.get("benchmarks"):
        kept, kept_skips = read_partial(partial)  # what was measured before the stop
        if len(kept["benchmarks"]) > len(data.get("benchmarks", [])):
            data = {**data, **kept}
        if len(kept_skips) > len(skips):
            skips = kept_skips
    if not interrupted:
        partial.unlink(missing_ok=True)
    return rc, data, skips, interrupted


def _bench(json_path: str, pytest_args=None, benchmarks=(), providers=(),
           plot_dir: str | None = None, csv_path: str | None = None, full: bool = True):
    bench_names, prov = check_selection(benchmarks, providers)
    csv_file = _csv_path(json_path, csv_path)
    _writable_file(Path(json_path), "results file")
    _writable_file(csv_file, "CSV file")
    out_dir = plot.prepare_dir(plot_dir) if plot_dir else None
    env = environment()
    rc, data, skips, interrupted = _run_pytest_bench(json_path, pytest_args, bench_names, prov,
                                                     quick=not full)
    recs = records(data, skips, env)
    if data.get("benchmarks"):
        data["proteus"] = {"environment": env, "records": _public(recs),
                           "complete": not interrupted, "quick": not full}
        atomic_write_json(Path(json_path), data)
        write_csv(csv_file, _public(recs))
        print(summarize(data, skips, env))
        print(f"\non record: {env['device']}, torch {env['torch']}, triton {env['triton']}"
              f"{', CUDA ' + env['cuda'] if env['cuda'] else ''}, commit {env['commit']}, "
              f"{env['date']}")
        print(f"results: {json_path} (pytest-benchmark JSON + 'proteus' records), {csv_file}")
        if out_dir is not None:
            roof = peaks(env["device"]) if env["device_kind"] == "cuda" else None
            for path in plot.bench_charts(recs, env, out_dir, roof):
                print(f"chart: {path}")
    elif rc == 0:
        rc = 5  # pytest's "no tests collected"
    if interrupted:
        n = len(data.get("benchmarks", []))
        print(f"proteus bench: interrupted; the {n} benchmark(s) measured before the stop are on "
              f"record" + (f" ({json_path}, {csv_file}; as they came: "
                           f"{_partial_path(json_path)})" if n else ""), file=sys.stderr)
        return 130, recs, env
    if rc != 0:
        print(f"proteus bench: pytest exited with {rc} (a kernel failed its check or a "
              "benchmark errored; see above)", file=sys.stderr)
    return rc, recs, env


def run_bench(json_path: str, pytest_args: list[str] | None = None, *, benchmarks=(),
              providers=(), plot_dir: str | None = None, csv_path: str | None = None,
              full: bool = False) -> int:
    """``proteus bench``: check and time, print the tables, write JSON + CSV (+ charts).
    Without ``full``, the quick subset: no compiled providers unless ``providers`` names
    them, and no ``train_step`` unless ``benchmarks`` names it."""
    return _bench(json_path, pytest_args, benchmarks, providers, plot_dir, csv_path, full)[0]


def run_suite(suite: str, out_dir: str | None = None, pytest_args: list[str] | None = None
              ) -> int:
    """``proteus bench --suite h100``: cuda tests, every kernel with its peers, table, charts."""
    if suite != "h100":
        raise ConfigError(f"unknown suite {suite!r}; the one suite is h100")
    if not torch.cuda.is_available():
        raise ConfigError("--suite h100 needs a CUDA GPU (an H100 or H200) and none is visible "
                          "here (torch.cuda.is_available() is False)")
    charts = plot.Figure is not None
    out = plot.prepare_dir(out_dir or "bench-h100", charts=False)
    if not charts:
        print("proteus bench --suite h100: matplotlib is not installed, so no charts (pip "
              "install 'proteus-kernels[plot]'); the tables and records are written", flush=True)
    root = _bench_dir().parent
    t0 = time.perf_counter()
    print(f"== 1/2 cuda-marked tests ({torch.cuda.get_device_name(0)}) ==", flush=True)
    rc_tests = subprocess.call([sys.executable, "-m", "pytest", str(root / "tests"), "-m", "cuda",
                                "-q", "-rs", "-p", "no:cacheprovider", f"--rootdir={root}"],
                               cwd=root)
    t1 = time.perf_counter()
    print("\n== 2/2 kernels at the production shapes, with the peers installed ==", flush=True)
    rc_bench, recs, env = _bench(str(out / "bench.json"), ["-k", H100_SUITE_DESELECT,
                                                           *(pytest_args or [])],
                                 benchmarks=H100_SUITE, plot_dir=str(out) if charts else None)
    table = markdown_table(recs)
    atomic_write(out / "h100.md", (table + "\n").encode())
    t2 = time.perf_counter()
    print(f"\n{table}\n")
    print(f"suite h100 on {env['device']}: cuda tests {t1 - t0:.0f} s (exit {rc_tests}), "
          f"benchmarks {t2 - t1:.0f} s (exit {rc_bench}), total {t2 - t0:.0f} s; "
          f"table {out / 'h100.md'}")
    return rc_tests or rc_bench


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
