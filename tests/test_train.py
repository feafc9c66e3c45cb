"""End to end through the command line: a smoke run, eval of its checkpoint, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from proteus import data as D
from proteus.cli import main
from proteus.train import WeightAverages, lr_scale, muon_momentum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None, cwd=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    e.update(env or {})
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "proteus", *args], capture_output=True,
                          text=True, env=e, cwd=cwd or ROOT, timeout=600)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    r = run_cli("train", "--preset", "smoke", "--out-dir", str(out), "--run-name", "s",
                "--cache", "ngram", "--val-every", "3", "--log-every", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "s", r


def test_smoke_run_writes_the_run_directory(smoke_run):
    run_dir, r = smoke_run
    for name in ("config.json", "log.jsonl", "model.ckpt", "summary.json"):
        assert (run_dir / name).exists(), name
    assert not [p for p in os.listdir(run_dir) if ".tmp" in p]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and 0 < summary["val"]["bpb"] < 10
    # the reported bpb is the loss over the 4,096 targets' bytes, counted here independently
    val, sp = D.load_tokens(D.bundled_val_glob(), "val", limit=4097), D.load_tokenizer()
    nbytes = int(D.build_byte_lut(sp, 1024).target_bytes(val[:-1], val[1:]).sum())
    v = summary["val"]
    assert (v["tokens"], v["bytes"]) == (4096, nbytes)
    assert v["bpb"] == pytest.approx(v["loss"] * 4096 / math.log(2) / nbytes, rel=1e-12)
    assert summary["cache"]["bpb_model"] == pytest.approx(v["bpb"], rel=1e-12)
    assert "unigram" in r.stdout and "val bpb" in r.stdout
    assert "with the n-gram cache" in r.stdout and "audit: PASS" in r.stdout
    assert summary["cache"]["audit_passed"] and summary["cache"]["gain"] > 0
    assert (run_dir / "model.int6").exists() and "of 16,000,000 bytes: OK" in r.stdout
    records = [json.loads(line) for line in (run_dir / "log.jsonl").open()]
    events = [r["event"] for r in records]
    assert events[0] == "config" and "step" in events and events[-1] == "final"
    # every step on record (what `proteus plot` draws), however seldom a line is printed:
    # the screen has steps 1, 4 and the last (--log-every 4; others only when 10 s passed
    # since the last line, which a loaded machine can make happen), the log all six
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert [r["loss"] for r in steps] == summary["losses"]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("step ")]
    shown = [int(ln.split()[1]) for ln in lines]
    assert {1, 4, 6} <= set(shown) and shown == sorted(set(shown)), r.stdout[-3000:]
    assert lines[-1].endswith("eta 0m00s")  # the last of 6 steps: nothing left (issue 23)
    assert "warm-up: 1 step(s), discarded" in r.stdout


def test_plot_of_the_run(smoke_run, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="proteus plot needs matplotlib (pip install .[test])")
    run_dir, _ = smoke_run
    records = [json.loads(line) for line in (run_dir / "log.jsonl").open()]
    vals = [r for r in records if r["event"] == "val"]
    assert [v["step"] for v in vals] == [3, 6] and all(v["train_s"] > 0 for v in vals)
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "t.png")]) == 0  # in-process
    out = capsys.readouterr()
    assert "6 step records, 3 validation points" in out.out, out.err[-2000:]
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no log.jsonl" in err


def test_eval_of_checkpoint_reproduces_train_bpb(smoke_run):
    run_dir, _ = smoke_run
    summary = json.loads((run_dir / "summary.json").read_text())
    r = run_cli("eval", str(run_dir / "model.ckpt"), "--like-run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{summary['val']['bpb']:.4f}" in r.stdout


@pytest.mark.interpret
def test_artifact_eval_triton_equals_ref_to_4_decimals(smoke_run):
    run_dir, _ = smoke_run
    art = str(run_dir / "model.int6")
    out = {}
    for kind in ("ref", "triton"):
        r = run_cli("eval", art, "--kernels", kind, "--val-tokens", "512", "--cache", "none")
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"kernels={kind}" in r.stdout
        line = next(ln for ln in r.stdout.splitlines() if "plain)" in ln)
        out[kind] = line.split()[2]
    assert out["ref"] == out["triton"]


def test_audit_command_passes_ours_and_flags_the_record(smoke_run):
    run_dir, _ = smoke_run
    r = run_cli("audit", str(run_dir / "model.ckpt"), "--like-run", "--audit-positions", "8",
                "--val-tokens", "1024")  # holds a BOS target and one after it
    assert r.returncode == 0, r.stderr[-3000:]
    assert "audit: PASS" in r.stdout and "negative example: FAIL" in r.stdout


def test_artifact_inspect(smoke_run):
    run_dir, _ = smoke_run
    r = run_cli("artifact", "inspect", str(run_dir / "model.int6"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "blocks.0" in r.stdout


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["train", "--preset", "nope"], {}, "unknown preset 'nope'"),
        (["train", "--preset", "smoke", "--bogus", "1"], {}, "unrecognized arguments: --bogus"),
        (["train", "--preset", "smoke"], {"PROTEUS_BOGUS": "1"}, "unknown environment variable"),
        (["train", "--preset", "smoke", "--vocab-size", "2048"], {},
         "no bundled data for a vocabulary of 2048"),
        (["train", "--preset", "smoke", "--vocab-size", "2048", "--tokenizer",
          str(D.bundled_dir() / "fineweb_1024_bpe.model")], {}, "does not match the tokenizer"),
        (["train", "--preset", "smoke", "--seq-len", "100"], {}, "does not divide batch_tokens"),
        (["train", "--preset", "smoke", "--tokenizer", "/nope.model"], {}, "tokenizer /nope.model"),
        (["train", "--preset", "smoke", "--train-files", "/nope/*.bin"], {}, "no train shards"),
        (["eval", "/nope.ckpt"], {}, "not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, env, needle):
    # in-process (a subprocess costs ~3 s of imports); the exit code of ``python -m proteus``
    # itself is checked by the subprocess tests around this one
    for k in [k for k in os.environ if k.startswith("PROTEUS_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = [*args, "--out-dir", str(tmp_path)] if args[0] == "train" else list(args)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (code, err[-2000:])
    assert needle in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    # nothing half-written: no checkpoint, no temp files
    for _root, _dirs, files in os.walk(tmp_path):
        assert not [f for f in files if f.endswith(".ckpt") or ".tmp" in f], files


def test_unreadable_checkpoint_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    r = run_cli("eval", str(bad))
    assert r.returncode == 2 and "unreadable" in r.stderr and "Traceback" not in r.stderr


def test_help_documents_every_option():
    r = run_cli("train", "--help")
    assert r.returncode == 0
    for flag in ("--model-dim", "--xsa-last-n", "--matrix-lr", "--max-wallclock-s", "--stride",
                 "--kernels", "PROTEUS_MODEL_DIM"):
        assert flag in r.stdout


class _TC:
    iterations, warmdown_steps, lr_warmup_steps, max_wallclock_s = 1000, 100, 0, 0.0
    warmdown_frac, min_lr = 0.0, 0.0


def test_lr_schedule_step_based_and_wallclock_aware():
    tc = _TC()
    assert lr_scale(0, tc, 0, 0) == 1.0
    assert lr_scale(950, tc, 0, 0) == pytest.approx(0.5)
    tc.max_wallclock_s = 10.0  # 100 ms/step, 5 s used -> 50 steps left -> half way down
    assert lr_scale(10, tc, 100.0, 5000.0) == pytest.approx(0.5)
    assert lr_scale(10, tc, 100.0, 10_000.0) == 0.0


def _tc(**over):
    tc = _TC()
    for k, v in over.items():
        setattr(tc, k, v)
    return tc


def test_lr_schedule_at_its_boundaries():
    # warm-down over the last 100 of 1000 steps: full until step 900, then (1000 - step) / 100
    tc = _tc()
    assert [lr_scale(s, tc, 0, 0) for s in (0, 899, 900, 901, 999, 1000, 1001)] == [
        1.0, 1.0, 1.0, 0.99, 0.01, 0.0, 0.0]
    # ramp-up over 4 steps: (step + 1) / 4, times the warm-down factor
    tc = _tc(lr_warmup_steps=4, iterations=10, warmdown_steps=8)
    assert [lr_scale(s, tc, 0, 0) for s in range(5)] == [0.25, 0.5, 0.75, 0.875, 0.75]
    # no warm-down: the ramp alone, whatever the clock says
    tc = _tc(lr_warmup_steps=2, warmdown_steps=0, max_wallclock_s=1.0)
    assert [lr_scale(s, tc, 500.0, 5000.0) for s in (0, 1, 999)] == [0.5, 1.0, 1.0]
    # the clock: steps left = min(steps by count, time left / step time)
    tc = _tc(max_wallclock_s=10.0)
    assert lr_scale(0, tc, 100.0, 0.0) == 1.0  # 100 steps of time left: the top of the ramp
    assert lr_scale(0, tc, 100.0, 1000.0) == 0.9  # 9 s left = 90 steps
    assert lr_scale(0, tc, 100.0, 9990.0) == pytest.approx(0.001)
    assert lr_scale(950, tc, 1.0, 0.0) == 0.5  # time is plentiful: the step count decides
    assert lr_scale(0, tc, 100.0, 20_000.0) == 0.0  # past the cap: never negative
    assert lr_scale(0, tc, 0.0, 9990.0) == 1.0  # no step time measured yet: by count
    tc = _tc(max_wallclock_s=0.0)
    assert lr_scale(0, tc, 100.0, 1e9) == 1.0  # no cap: the clock is ignored
    # small values are values: a half-second cap, a sub-millisecond step, a 1-step warm-down
    assert lr_scale(0, _tc(max_wallclock_s=0.5), 10.0, 0.0) == 0.5  # 50 steps of time left
    assert lr_scale(0, _tc(max_wallclock_s=10.0), 0.5, 9975.0) == 0.5
    assert lr_scale(0, _tc(warmdown_steps=1, max_wallclock_s=10.0), 100.0, 9950.0) == 0.5


def test_muon_momentum_warmup():
    tc = _tc(muon_momentum=0.99, muon_momentum_start=0.85, muon_momentum_warmup=300)
    assert muon_momentum(0, tc) == 0.85
    assert muon_momentum(150, tc) == pytest.approx(0.92)
    assert muon_momentum(299, tc) == pytest.approx(0.85 + 0.14 * 299 / 300)
    assert muon_momentum(300, tc) == pytest.approx(0.99) and muon_momentum(5000, tc) == 0.99
    tc.muon_momentum_warmup = 1  # one step of warm-up: step 0 still starts at the start
    assert (muon_momentum(0, tc), muon_momentum(1, tc)) == (0.85, 0.99)
    tc.muon_momentum_warmup = 0
    assert muon_momentum(0, tc) == 0.99


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 3))
        self.register_buffer("b", torch.zeros(3, dtype=torch.float64))


def _set(net, w, b):
    with torch.no_grad():
        net.w.fill_(w)
        net.b.fill_(b)


def test_weight_averages_against_arithmetic():
    # EMA e <- d e + (1 - d) w, starting from the initial weights; SWA = the mean of the EMA's
    # snapshots; final: SWA if any snapshot, else EMA, else the raw weights
    net = _Net()
    _set(net, 2.0, -1.0)
    avg = WeightAverages(net, _tc(ema_decay=0.75))
    e = 2.0
    snaps = []
    for step, w in enumerate([4.0, 0.0, 8.0, -4.0]):
        _set(net, w, 10.0 * w)
        avg.update_ema(net)
        e = 0.75 * e + 0.25 * w
        assert torch.allclose(avg.ema["w"], torch.full((2, 3), e), rtol=0, atol=1e-6)
        if step % 2:
            avg.snapshot(net)
            snaps.append(e)
    state, which = avg.final_state(net)
    assert which == "swa(2)" and avg.swa_count == 2
    assert torch.allclose(state["w"], torch.full((2, 3), sum(snaps) / 2), atol=1e-6)
    assert state["w"].dtype == torch.float32 and state["b"].dtype == torch.float64
    eb = [-1.0]
    for w in (4.0, 0.0, 8.0, -4.0):
        eb.append(0.75 * eb[-1] + 0.25 * 10.0 * w)
    assert torch.allclose(state["b"], torch.full((3,), (eb[2] + eb[4]) / 2, dtype=torch.float64))


def test_weight_averages_without_ema_or_snapshots():
    net = _Net()
    _set(net, 1.0, 0.0)
    raw = WeightAverages(net, _tc(ema_decay=0.0))
    raw.update_ema(net)  # no EMA: a no-op
    assert raw.ema is None
    state, which = raw.final_state(net)
    assert which == "raw" and torch.equal(state["w"], torch.ones(2, 3))
    for w in (3.0, 5.0, 10.0):  # SWA of the raw weights
        _set(net, w, 0.0)
        raw.snapshot(net)
    state, which = raw.final_state(net)
    assert which == "swa(3)" and torch.allclose(state["w"], torch.full((2, 3), 6.0))
    ema = WeightAverages(net, _tc(ema_decay=0.5))
    _set(net, 0.0, 0.0)  # 10 -> 5 -> 2.5
    ema.update_ema(net)
    ema.update_ema(net)
    state, which = ema.final_state(net)
    assert which == "ema" and torch.allclose(state["w"], torch.full((2, 3), 2.5))
    assert torch.equal(net.w, torch.zeros(2, 3))  # the model itself is left alone


def test_swa_snapshots_in_the_loop_follow_the_schedule():
    # 8 steps, warm-down over all 8: lr scale (8 - step) / 8 at step 0..7; a snapshot after
    # every 2nd step (steps 1, 3, 5, 7) whose scale is below 3/8: step 7 only (step 5's scale is
    # 3/8 itself) -> swa(1)
    from proteus.options import build_config
    from proteus.train import train

    cfg = build_config("smoke", {"train.iterations": 8, "train.warmdown_steps": 8,
                                 "train.max_wallclock_s": 0.0, "train.swa_every": 2,
                                 "train.swa_lr_below": 0.375, "train.warmup_steps": 0,
                                 "train.seq_len": 32, "train.batch_tokens": 64}, environ={})
    stats = train(cfg).stats
    assert stats["final_weights"] == "swa(1)" and stats["steps"] == 8


def test_lr_schedule_warmdown_fraction_and_floor():
    """pg-record's schedule: full LR for the first 1 - warmdown_frac of training, then
    (1 - frac) / warmdown_frac, never below min_lr; frac by step count or by the clock."""
    tc = _tc(iterations=100, warmdown_frac=0.85, min_lr=0.1)
    got = [lr_scale(s, tc, 0, 0) for s in (0, 15, 50, 91, 95, 100)]
    assert got == pytest.approx([1.0, 1.0, 0.5 / 0.85, 0.09 / 0.85, 0.1, 0.1])
    tc = _tc(iterations=100, warmdown_frac=0.85, min_lr=0.1, max_wallclock_s=10.0)
    assert lr_scale(0, tc, 100.0, 5000.0) == pytest.approx(0.5 / 0.85)  # half the cap spent
    assert lr_scale(60, tc, 100.0, 1000.0) == pytest.approx(0.4 / 0.85)  # the steps lead
    # the floor holds for the step-count warm-down too
    assert lr_scale(990, _tc(min_lr=0.2), 0, 0) == 0.2
