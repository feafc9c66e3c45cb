"""End to end through the command line: a smoke run, eval of its checkpoint, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from proteus.train import lr_scale

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
                "--cache", "ngram", "--val-every", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "s", r


def test_smoke_run_writes_the_run_directory(smoke_run):
    run_dir, r = smoke_run
    for name in ("config.json", "log.jsonl", "model.ckpt", "summary.json"):
        assert (run_dir / name).exists(), name
    assert not [p for p in os.listdir(run_dir) if ".tmp" in p]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and 0 < summary["val"]["bpb"] < 10
    assert "unigram" in r.stdout and "val bpb" in r.stdout
    assert "with the n-gram cache" in r.stdout and "audit: PASS" in r.stdout
    assert summary["cache"]["audit_passed"] and summary["cache"]["gain"] > 0
    assert (run_dir / "model.int6").exists() and "of 16,000,000 bytes: OK" in r.stdout
    events = [json.loads(line)["event"] for line in (run_dir / "log.jsonl").open()]
    assert events[0] == "config" and "step" in events and events[-1] == "final"


def test_plot_of_the_run(smoke_run, tmp_path):
    pytest.importorskip("matplotlib", reason="proteus plot needs matplotlib (pip install .[test])")
    run_dir, _ = smoke_run
    records = [json.loads(line) for line in (run_dir / "log.jsonl").open()]
    vals = [r for r in records if r["event"] == "val"]
    assert [v["step"] for v in vals] == [3, 6] and all(v["train_s"] > 0 for v in vals)
    r = run_cli("plot", str(run_dir), "--out", str(tmp_path / "t.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "6 step records, 3 validation points" in r.stdout
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")
    r = run_cli("plot", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no log.jsonl" in r.stderr


def test_eval_of_checkpoint_reproduces_train_bpb(smoke_run):
    run_dir, _ = smoke_run
    summary = json.loads((run_dir / "summary.json").read_text())
    r = run_cli("eval", str(run_dir / "model.ckpt"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{summary['val']['bpb']:.4f}" in r.stdout


@pytest.mark.interpret
def test_artifact_eval_triton_equals_ref_to_4_decimals(smoke_run):
    run_dir, _ = smoke_run
    art = str(run_dir / "model.int6")
    out = {}
    for kind in ("ref", "triton"):
        r = run_cli("eval", art, "--kernels", kind, "--val-tokens", "1024")
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"kernels={kind}" in r.stdout
        line = next(ln for ln in r.stdout.splitlines() if "(plain" in ln)
        out[kind] = line.split()[2]
    assert out["ref"] == out["triton"]


def test_audit_command_passes_ours_and_flags_the_record(smoke_run):
    run_dir, _ = smoke_run
    r = run_cli("audit", str(run_dir / "model.ckpt"), "--audit-positions", "8")
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
         "does not match the tokenizer"),
        (["train", "--preset", "smoke", "--seq-len", "100"], {}, "does not divide batch_tokens"),
        (["train", "--preset", "smoke", "--tokenizer", "/nope.model"], {}, "tokenizer /nope.model"),
        (["train", "--preset", "smoke", "--train-files", "/nope/*.bin"], {}, "no train shards"),
        (["eval", "/nope.ckpt"], {}, "not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, env, needle):
    r = run_cli(*args, "--out-dir", str(tmp_path), env=env) if args[0] == "train" else run_cli(
        *args, env=env)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
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


def test_lr_schedule_step_based_and_wallclock_aware():
    tc = _TC()
    assert lr_scale(0, tc, 0, 0) == 1.0
    assert lr_scale(950, tc, 0, 0) == pytest.approx(0.5)
    tc.max_wallclock_s = 10.0  # 100 ms/step, 5 s used -> 50 steps left -> half way down
    assert lr_scale(10, tc, 100.0, 5000.0) == pytest.approx(0.5)
    assert lr_scale(10, tc, 100.0, 10_000.0) == 0.0
