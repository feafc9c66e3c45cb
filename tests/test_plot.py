"""Charts: a benchmark family's lines (one per provider, the roofline dashed on a GPU), the
files written beside each other, and a run's curves from its log.jsonl."""

from __future__ import annotations

import json

import pytest

from proteus import plot
from proteus.bench import peaks, records
from proteus.config import ConfigError

pytest.importorskip("matplotlib", reason="charts need matplotlib (pip install '.[test]')")

PNG = b"\x89PNG\r\n\x1a\n"


def _bench_records(device_kind="cuda"):
    rows = []
    for x in (512, 1024, 2048):
        for provider, speed in (("triton", 2.0), ("ref", 1.0)):
            t = x * 1e-6 / speed
            rows.append({"name": provider, "group": f"attn T{x}", "stats": {"median": t},
                         "extra_info": dict(provider=provider, device=device_kind, family="attn",
                                            shape=f"T{x}", x_name="T", x=x, p50=t,
                                            flops=1e9 * x, bytes=4e6 * x)})
    skip = {"nodeid": "f::t", "group": "attn T512", "family": "attn", "provider": "fa3",
            "reason": "FlashAttention-3 is not installed"}
    env = {"device": "NVIDIA H100 80GB HBM3", "device_kind": device_kind, "torch": "t",
           "triton": "tr", "commit": "c", "date": "d"}
    return records({"benchmarks": rows}, [skip], env), env


def test_family_chart_has_one_line_per_provider_and_the_roofline():
    recs, env = _bench_records()
    fig = plot.bench_figure("attn", recs, env, peaks(env["device"]))
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"triton", "ref", "H100 roofline"}
    assert list(lines["triton"].get_xdata()) == [512, 1024, 2048]
    # throughput = flops / p50: 1e9 x / (x 1e-6 / 2) = 2000 TFLOPS for ours at every x
    assert list(lines["triton"].get_ydata()) == pytest.approx([2000.0] * 3)
    assert lines["H100 roofline"].get_linestyle() == "--"
    # arithmetic intensity 250 FLOP/byte: min(989, 3.35e12 * 250 / 1e12) = 837.5 TFLOPS
    assert list(lines["H100 roofline"].get_ydata()) == pytest.approx([837.5] * 3)
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "TFLOPS"
    foot = " ".join(t.get_text() for t in fig.texts)
    assert "skipped fa3: FlashAttention-3 is not installed" in foot


def test_cpu_chart_says_interpreter_and_has_no_roofline():
    recs, env = _bench_records("cpu")
    ax = plot.bench_figure("attn", recs, env).axes[0]
    assert {ln.get_label() for ln in ax.get_lines()} == {"triton", "ref"}
    assert "interpreter" in ax.get_title()


def test_single_point_family_is_bars(tmp_path):
    recs, env = _bench_records("cpu")
    one = [r for r in recs if r.get("x") in (512, None)]
    for r in one:
        r["family"] = "train-step"
    paths = plot.bench_charts(one, env, tmp_path)
    assert [p.name for p in paths] == ["train-step.png"]
    assert paths[0].read_bytes().startswith(PNG)
    assert (tmp_path / "train-step.csv").read_text().count("\n") == len(one) + 1
    ax = plot.bench_figure("train-step", one, env).axes[0]
    assert len(ax.patches) == 2 and not ax.get_lines()  # two bars, triton and ref


def _write_log(run_dir, with_val_time=True):
    run_dir.mkdir()
    recs = [{"event": "config", "config": {"train": {"preset": "smoke"}}, "world": 1,
             "params": 1234}]
    for s in (1, 10, 20, 30):
        recs.append({"event": "step", "step": s, "loss": 5.0 - s / 10, "lr_scale": 1.0,
                     "tok_s": 1000.0 + s, "step_ms": 10.0, "train_s": s * 0.5})
        if s in (10, 30):
            v = {"event": "val", "step": s, "bpb": 3.0 - s / 100, "loss": 2.0}
            recs.append({**v, "train_s": s * 0.5} if with_val_time else v)
    recs.append({"event": "final", "steps": 30, "train_seconds": 15.0, "val": {"bpb": 2.5}})
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.mark.parametrize("with_val_time", [True, False])
def test_run_chart_draws_loss_bpb_and_speed_against_step_and_time(tmp_path, with_val_time):
    _write_log(tmp_path / "run", with_val_time)
    log = plot.read_run_log(tmp_path / "run")
    fig = plot.run_figure(log, "run")
    axes = fig.axes
    assert len(axes) == 6
    (loss_step, loss_wall), (bpb_step, bpb_wall), (tok_step, tok_wall) = (
        axes[0:2], axes[2:4], axes[4:6])
    assert tok_step.get_xlabel() == "step" and tok_wall.get_xlabel().startswith("training wall")
    assert list(loss_step.get_lines()[0].get_xdata()) == [1, 10, 20, 30]
    assert list(loss_wall.get_lines()[0].get_xdata()) == [0.5, 5.0, 10.0, 15.0]
    assert list(bpb_step.get_lines()[0].get_ydata()) == pytest.approx([2.9, 2.7])
    # val at steps 10 and 30 sit at 5 s and 15 s, read or interpolated from the step records
    assert list(bpb_wall.get_lines()[0].get_xdata()) == pytest.approx([5.0, 15.0])
    assert list(bpb_step.get_lines()[1].get_ydata()) == [2.5]  # the final score
    assert list(tok_wall.get_lines()[0].get_ydata()) == [1001.0, 1010.0, 1020.0, 1030.0]
    assert "preset smoke" in fig._suptitle.get_text()


def test_plot_command_writes_the_png_and_refuses_a_dir_without_a_log(tmp_path, capsys):
    _write_log(tmp_path / "run")
    assert plot.main_plot(str(tmp_path / "run")) == 0
    assert (tmp_path / "run" / "training.png").read_bytes().startswith(PNG)
    assert "training.png" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no log.jsonl in"):
        plot.main_plot(str(tmp_path))
    with pytest.raises(ConfigError, match="not found"):
        plot.main_plot(str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="is not JSON"):
        plot.main_plot(str(tmp_path / "bad"))


def test_a_short_run_with_one_step_record_draws_every_steps_loss(tmp_path, capsys):
    # issue 23: a log written when only every log_every-th step had a record (here step 1 of
    # 5) drew empty loss and tokens/s panels; summary.json had every loss
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"event": "config", "config": {}, "world": 1, "params": 10},
            {"event": "step", "step": 1, "loss": 5.0, "lr_scale": 1.0, "tok_s": 900.0,
             "step_ms": 10.0, "train_s": 2.0},
            {"event": "final", "steps": 5, "train_seconds": 10.0, "val": {"bpb": 2.5}}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "summary.json").write_text(json.dumps({"losses": [5.0, 4.5, 4.0, 3.8, 3.7]}))
    fig = plot.run_figure(plot.read_run_log(run), "run")
    loss_step, loss_wall, tok_step = fig.axes[0], fig.axes[1], fig.axes[4]
    line = loss_step.get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 3, 4, 5]
    assert list(line.get_ydata()) == [5.0, 4.5, 4.0, 3.8, 3.7]
    assert list(loss_wall.get_lines()[0].get_xdata()) == pytest.approx([2.0, 4.0, 6.0, 8.0, 10.0])
    # one point is still visible: drawn with a marker
    assert line.get_marker() == "o" and tok_step.get_lines()[0].get_marker() == "o"
    assert list(tok_step.get_lines()[0].get_ydata()) == [900.0]
    assert plot.main_plot(str(run)) == 0
    assert "the loss of 5 steps from summary.json" in capsys.readouterr().out
