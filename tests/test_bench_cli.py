"""``proteus bench``: the records' and tables' arithmetic, one real run through the command
(check, time, skip a peer with its reason, JSON + CSV on record), the catalogue of providers
against what the benchmark files collect, and bad input (one line, exit code 2)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from proteus import bench as bench_mod
from proteus import cli, plot
from proteus.bench import (
    BENCHMARKS,
    CSV_FIELDS,
    markdown_table,
    peaks,
    read_partial,
    records,
    run_bench,
    summarize,
    write_csv,
)

ROOT = Path(__file__).resolve().parent.parent
H100 = {"device": "NVIDIA H100 80GB HBM3", "device_kind": "cuda", "torch": "2.x",
        "triton": "3.x", "cuda": "12.8", "commit": "abc", "date": "2026-01-01T00:00:00+00:00"}


def _row(provider, median, group="g", **info):
    return {"name": f"b[{provider}]", "group": group, "stats": {"median": median},
            "extra_info": {"provider": provider, "device": "cpu", **info}}


def test_summary_ratios_and_throughput():
    text = summarize({"benchmarks": [_row("triton", 0.5, tokens=1000), _row("ref", 1.0),
                                     _row("ref-compile", 4.0)]})
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ") and "ms" in ln}
    assert "2.00x faster" in lines["triton"] and "2.00 ktokens/s" in lines["triton"]
    assert "baseline" in lines["ref"]
    assert "4.00x slower" in lines["ref-compile"]


def test_summary_honours_an_explicit_baseline_and_lists_skips():
    skip = {"nodeid": "benchmarks/test_bench_x.py::t[fa3]", "group": "g", "provider": "fa3",
            "reason": "fa3 is not installed"}
    text = summarize({"benchmarks": [_row("ours", 1.0), _row("theirs", 3.0, baseline=True)]},
                     [skip])
    assert "vs theirs" in text and "3.00x faster" in text
    assert "fa3" in text and "skipped: fa3 is not installed" in text


def test_records_use_per_call_percentiles_roofline_and_memory():
    work = dict(flops=2e12, bytes=1e9, device="cuda", p20=0.9e-3, p50=1e-3, p80=1.2e-3,
                mem_peak_bytes=123, mem_kind="cuda peak allocated", family="f", x_name="M", x=8)
    data = {"benchmarks": [
        _row("triton", 5.0, **work),  # the round median (5 s) must not be used: p50 is
        _row("ref", 5.0, **{**work, "p50": 4e-3}),
    ]}
    recs = records(data, [], H100)
    ours = next(r for r in recs if r["provider"] == "triton")
    assert ours["p50_ms"] == pytest.approx(1.0) and ours["p20_ms"] == pytest.approx(0.9)
    assert ours["tflops"] == pytest.approx(2000.0) and ours["gbps"] == pytest.approx(1000.0)
    # roofline: max(2e12 / 989e12, 1e9 / 3.35e12) s = 2.02 ms against 1 ms measured
    assert ours["roofline_pct"] == pytest.approx(100 * max(2e12 / 989e12, 1e9 / 3.35e12) / 1e-3)
    assert ours["roofline"] == "H100" and peaks("NVIDIA H200")[0] == "H200"
    assert ours["vs_baseline"] == pytest.approx(4.0) and ours["mem_peak_bytes"] == 123
    assert ours["device"] == H100["device"] and ours["commit"] == "abc"
    # no roofline on CPU
    assert records(data, [], {**H100, "device_kind": "cpu"})[0]["roofline_pct"] is None


def test_markdown_table_gives_the_ratio_to_the_best_peer():
    info = dict(flops=1e12, device="cuda", family="attn", shape="T2048")
    data = {"benchmarks": [_row("triton", 1.0, **info, p50=1e-3),
                           _row("sdpa-flash", 1.0, **info, p50=1.5e-3),
                           _row("ref", 1.0, **info, p50=3e-3)]}
    skip = {"nodeid": "x", "group": "g", "provider": "fa3", "reason": "needs Hopper"}
    table = markdown_table(records(data, [skip], H100))
    rows = {ln.split("|")[3].strip(): ln for ln in table.splitlines() if ln.startswith("| attn")}
    assert "1.50×" in rows["**triton**"]  # the best peer (sdpa-flash, 1.5 ms) over ours (1 ms)
    assert "1.00× (best peer)" in rows["sdpa-flash"] and "0.50×" in rows["ref"]
    assert "1,000.0 TFLOPS" in rows["**triton**"] and "%" in rows["**triton**"]
    assert "- fa3: needs Hopper" in table


def test_csv_round_trip(tmp_path):
    data = {"benchmarks": [_row("triton", 0.5, p20=0.4, p50=0.5, p80=0.7, items=10)]}
    recs = records(data, [{"nodeid": "n", "group": "g", "provider": "liger",
                           "reason": "not installed"}], H100)
    write_csv(tmp_path / "r.csv", [{k: v for k, v in r.items() if k[0] != "_"} for r in recs])
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert tuple(rows[0]) == CSV_FIELDS
    assert rows[0]["provider"] == "triton" and float(rows[0]["p80_ms"]) == pytest.approx(700)
    assert rows[1]["status"] == "skipped" and rows[1]["reason"] == "not installed"
    assert rows[1]["torch"] == "2.x"


def test_bench_command_checks_times_and_records(tmp_path, capfd):
    out = tmp_path / "bench.json"
    rc = run_bench(str(out), ["-k", "test_bench_forward and not backward"],
                   benchmarks=["xsa_attention"], providers=["triton", "ref", "flash-attn"])
    assert rc == 0
    text = capfd.readouterr().out  # the pytest subprocess's lines, then ours
    # the estimate first, then one line per benchmark instead of pytest's dots
    assert re.search(r"proteus bench: 6 benchmarks \(the quick subset.*\), estimated \d+m\d\ds",
                     text), text[:3000]
    lines = [ln for ln in text.splitlines() if re.match(r"\[ *\d+/6\] ", ln)]
    assert len(lines) == 6 and all("left)" in ln for ln in lines), text[:3000]
    assert any(": ok, p50 " in ln for ln in lines) and any(": skipped (" in ln for ln in lines)
    assert not any(re.fullmatch(r"[.s]+", ln.strip()) for ln in text.splitlines())
    assert not out.with_suffix(".partial.jsonl").exists()  # complete: the JSON is the record
    data = json.loads(out.read_text())
    env, recs = data["proteus"]["environment"], data["proteus"]["records"]
    assert env["torch"] == torch.__version__ and env["triton"] and env["commit"] and env["date"]
    assert env["device"] and "cuda" in env
    timed = [r for r in recs if r["status"] == "ok"]
    assert sorted((r["provider"], r["x"]) for r in timed) == sorted(
        (p, t) for p in ("triton", "ref") for t in (64, 128))  # --providers kept only these
    for r in timed:
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["samples"] >= 1
        assert r["family"] == "xsa_attention fwd" and r["metric"] == "TFLOPS"
        assert isinstance(r["mem_peak_bytes"], int) and r["mem_peak_bytes"] >= 0
    skipped = [r for r in recs if r["status"] == "skipped"]
    assert {r["provider"] for r in skipped} == {"flash-attn"} and len(skipped) == 2
    for r in skipped:  # not installed here, or no GPU: either way one line saying so
        assert r["reason"] and "\n" not in r["reason"] and "flash-attn" in r["reason"]
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert len(rows) == len(recs) and {r["status"] for r in rows} == {"ok", "skipped"}
    assert "xsa_attention fwd B1 H4/2 T128 D64" in text and "skipped:" in text
    assert data["proteus"]["complete"] is True and data["proteus"]["quick"] is True


def test_ctrl_c_writes_the_records_measured_so_far(tmp_path, monkeypatch, capsys):
    # in-process, the pytest subprocess stood in for: it has appended two records (one
    # benchmark, one skip) and a torn line when Ctrl-C reaches the command
    out = tmp_path / "b.json"
    partial = out.with_suffix(".partial.jsonl")
    bench_rec = {"kind": "benchmark", "name": "test_bench_table[2048-ref-insert]",
                 "fullname": "benchmarks/test_bench_ngram.py::test_bench_table[2048-ref-insert]",
                 "group": "ngram table insert 2,048 keys", "stats": {"median": 2e-4, "rounds": 3},
                 "extra_info": {"provider": "ref", "p20": 1e-4, "p50": 2e-4, "p80": 3e-4,
                                "family": "ngram table insert", "items": 2048}}
    skip_rec = {"kind": "skip", "nodeid": "benchmarks/test_bench_ngram.py::t[triton]",
                "group": "ngram table insert 2,048 keys", "provider": "triton",
                "reason": "no GPU"}

    real_popen = subprocess.Popen

    class Child:
        def __new__(cls, cmd, **kw):  # git (the environment on record) runs for real
            return super().__new__(cls) if "pytest" in cmd else real_popen(cmd, **kw)

        def __init__(self, cmd, cwd=None):
            assert f"--records-jsonl={partial}" in cmd and "--progress-lines" in cmd
            assert "--quick" in cmd
            partial.write_text(json.dumps(bench_rec) + "\n" + json.dumps(skip_rec) + "\n{\"ki")
            self.waits = 0

        def wait(self, timeout=None):
            self.waits += 1
            if self.waits == 1:
                raise KeyboardInterrupt
            return 2  # pytest's exit code after an interrupt

        def kill(self):
            raise AssertionError("the child stopped by itself")

    monkeypatch.setattr(bench_mod.subprocess, "Popen", Child)
    assert run_bench(str(out), benchmarks=["ngram"]) == 130
    data = json.loads(out.read_text())
    assert data["proteus"]["complete"] is False
    recs = data["proteus"]["records"]
    assert [(r["provider"], r["status"]) for r in recs] == [("ref", "ok"), ("triton", "skipped")]
    assert recs[0]["p50_ms"] == pytest.approx(0.2)
    assert len(list(csv.DictReader(out.with_suffix(".csv").open()))) == 2
    err = capsys.readouterr().err
    assert "interrupted; the 1 benchmark(s) measured before the stop are on record" in err
    assert partial.exists()


@pytest.mark.slow  # two processes importing torch and triton, and a kernel on the interpreter
def test_an_interrupted_bench_keeps_what_it_measured(tmp_path):
    # Ctrl-C (SIGINT to the process group, as a terminal sends it) once the first benchmark is
    # on record: the JSON and CSV hold it, exit code 130, no traceback
    out = tmp_path / "b.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proteus", "bench", "--benchmark", "int6_matmul", "--provider",
         "triton", "--json", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    partial = out.with_suffix(".partial.jsonl")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_text().endswith("\n"):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout[-3000:] + stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "interrupted; the 1 benchmark(s) measured before the stop are on record" in stderr
    data = json.loads(out.read_text())
    recs = data["proteus"]["records"]
    assert data["proteus"]["complete"] is False
    assert [(r["provider"], r["status"], r["x"]) for r in recs] == [("triton", "ok", 4)]
    assert recs[0]["p50_ms"] > 0
    assert len(list(csv.DictReader(out.with_suffix(".csv").open()))) == 1
    assert partial.exists()  # the lines as they came stay, next to the record


def test_read_partial_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"kind": "benchmark", "name": "b", "stats": {"median": 1.0},
                                "extra_info": {}}) + "\n"
                    + json.dumps({"kind": "skip", "nodeid": "x", "reason": "r"}) + "\n"
                    + '{"kind": "benchmark", "na')
    data, skips = read_partial(path)
    assert [b["name"] for b in data["benchmarks"]] == ["b"] and skips == [
        {"nodeid": "x", "reason": "r"}]
    assert read_partial(tmp_path / "missing.jsonl") == ({"benchmarks": []}, [])


def test_catalogue_matches_what_the_benchmarks_collect():
    # collect benchmarks/ in a subprocess and read each item's provider parameter
    code = """
import json, sys, pytest
seen = []
class Grab:
    def pytest_collection_modifyitems(self, items):
        for it in items:
            p = it.callspec.params
            seen.append([it.path.stem, p["provider"], str(p.get("t", p.get("m", "")))])
rc = pytest.main(["benchmarks", "--collect-only", "-q", "-o", "addopts=",
                  "-p", "no:cacheprovider"], plugins=[Grab()])
print("JSON" + json.dumps(seen))
sys.exit(rc)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    seen = json.loads(r.stdout.split("JSON", 1)[1])
    by_file: dict[str, set] = {}
    for stem, provider, _ in seen:
        by_file.setdefault(stem.removeprefix("test_bench_"), set()).add(provider)
    assert by_file == {name: set(provs) for name, provs in BENCHMARKS.items()}
    # the compiled reference runs at one point of each sweep, every other provider at all
    # (benchmarks outside a sweep, such as the masked attention rows, have no point)
    points = {(stem, x) for stem, p, x in seen if p == "ref-compile" and x}
    assert len(points) == len({stem for stem, p, x in seen if p == "ref-compile" and x})


def _one_line_error(capsys, argv, *expect):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for e in expect:
        assert e in err, err
    return err


def test_bad_names_are_one_line_exit_2(capsys):
    _one_line_error(capsys, ["bench", "--benchmark", "xsa_attention,nope"],
                    "unknown benchmark 'nope'")
    _one_line_error(capsys, ["bench", "--provider", "flash-attn3"],
                    "unknown provider 'flash-attn3'")
    _one_line_error(capsys, ["bench", "--benchmark", "int6_matmul", "--provider", "sdpa-flash"],
                    "unknown provider 'sdpa-flash' of int6_matmul")
    _one_line_error(capsys, ["bench", "--suite", "h100", "--provider", "triton"],
                    "--suite h100 runs every kernel")


def test_unwritable_plot_dir_and_missing_matplotlib_are_one_line_exit_2(tmp_path, capsys,
                                                                        monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    if plot.Figure is not None:
        _one_line_error(capsys, ["bench", "--benchmark", "ngram", "--plot", str(blocker / "d")],
                        "cannot write charts to")
    monkeypatch.setattr(plot, "Figure", None)
    _one_line_error(capsys, ["bench", "--benchmark", "ngram", "--provider", "ref", "--plot",
                             str(tmp_path / "charts")], "matplotlib")
    _one_line_error(capsys, ["plot", str(tmp_path)], "matplotlib")
    assert not (tmp_path / "charts").exists()  # refused before running anything


def test_suite_h100_without_a_gpu_says_so_and_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(capsys, ["bench", "--suite", "h100"], "needs a CUDA GPU", "none is visible")


def test_package_and_bench_import_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.figure'] = None;"
            "import proteus.plot as p, proteus.bench, proteus.cli; print(p.Figure)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr[-2000:]
