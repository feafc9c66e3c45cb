"""``proteus bench``: the summary's arithmetic, and one real run of a benchmark through the CLI."""

from __future__ import annotations

import json

from proteus.bench import run_bench, summarize


def _row(provider, median, **info):
    return {"name": f"b[{provider}]", "group": "g", "stats": {"median": median},
            "extra_info": {"provider": provider, "device": "cpu", **info}}


def test_summary_ratios_and_throughput():
    text = summarize({"benchmarks": [_row("triton", 0.5, tokens=1000), _row("ref", 1.0),
                                     _row("ref-compile", 4.0)]})
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ") and "ms" in ln}
    assert "2.00x faster" in lines["triton"] and "2.00 ktokens/s" in lines["triton"]
    assert "baseline" in lines["ref"]
    assert "4.00x slower" in lines["ref-compile"]


def test_summary_honours_an_explicit_baseline():
    text = summarize({"benchmarks": [_row("ours", 1.0), _row("theirs", 3.0, baseline=True)]})
    assert "vs theirs" in text and "3.00x faster" in text


def test_bench_command_checks_then_times(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = run_bench(str(out), ["-k", "test_bench_elementwise"])
    assert rc == 0
    data = json.loads(out.read_text())
    providers = sorted(b["extra_info"]["provider"] for b in data["benchmarks"])
    assert providers == ["ref", "ref-compile", "triton"]
    assert "leaky_relu2 elementwise" in capsys.readouterr().out
