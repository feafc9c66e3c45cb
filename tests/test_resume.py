"""Runs that survive: a run stopped by SIGTERM and then by ``kill -9`` at random steps, resumed
each time, ends with weights bit-identical to a run that never stopped (eager, fixed step count);
a diverged run stops with one line and writes nothing final; run directories never collide.

The end-to-end runs are subprocesses of ``proteus train`` (smoke preset, 8 steps); the
2-process version (torchrun, gloo) is behind ``slow``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from proteus import checkpoint as K
from proteus.cli import main
from proteus.errors import ConfigError
from proteus.options import build_config
from proteus.run import open_run_dir

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
ARGS = ["--preset", "smoke", "--compile", "false", "--iterations", str(STEPS),
        "--checkpoint-every", "1", "--val-tokens", "1024"]


def _env(nproc: int) -> dict:
    """One process keeps torch's threads (the proof covers multi-threaded kernels); two share
    the cores one thread each."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("PROTEUS_") and k != "OMP_NUM_THREADS"}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    if nproc > 1:
        e["OMP_NUM_THREADS"] = "1"
    return e


def _cmd(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "proteus", "train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "proteus", "train"]


def _run(nproc: int, args: list[str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as out:
        r = subprocess.run(_cmd(nproc) + args, stdout=out, stderr=subprocess.PIPE, text=True,
                           env=_env(nproc), timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _stop_at(nproc: int, args: list[str], log: Path, step: int, sig: int) -> tuple[int, str]:
    """Start a run, send ``sig`` once it has logged ``step`` (SIGKILL: to every process of the
    run, as when the machine goes away; SIGTERM: to the launcher, as a scheduler does)."""
    with open(log, "w") as out:
        p = subprocess.Popen(_cmd(nproc) + args, stdout=out, stderr=subprocess.PIPE, text=True,
                             env=_env(nproc), cwd=ROOT)
        deadline = time.monotonic() + 600
        while f"step {step:6d}" not in log.read_text():
            assert p.poll() is None, p.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        if sig == signal.SIGKILL:
            for pid in _tree(p.pid):  # torchrun starts its workers in sessions of their own
                os.kill(pid, signal.SIGKILL)
        else:
            p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    return p.returncode, err


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _stopped_and_resumed(tmp_path: Path, nproc: int, seed: int, extra: tuple = ()) -> None:
    args = [*ARGS, *extra]
    out = tmp_path / "runs"
    rng = random.Random(seed)
    term_at = rng.randint(2, 4)
    _run(nproc, [*args, "--out-dir", str(out), "--run-name", "straight"], tmp_path / "u.log")

    run_dir = out / "stopped"
    code, err = _stop_at(nproc, [*args, "--out-dir", str(out), "--run-name", "stopped"],
                         tmp_path / "k.log", term_at, signal.SIGTERM)
    assert code != 0
    if nproc == 1:  # torchrun adds its own report of the stopped workers
        assert code == 128 + signal.SIGTERM
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert f"continue with: proteus train --resume {run_dir}" in err, err
    assert "stopped by SIGTERM after step" in err, err[-3000:]
    saved = K.state_paths(run_dir)
    assert saved and not (run_dir / "model.ckpt").exists()
    stopped = int(saved[-1].stem.split("-")[1])  # torchrun's forwarding may take a step or two
    assert term_at <= stopped < STEPS - 1, stopped
    kill_at = rng.randint(stopped + 1, STEPS - 1)

    code, _ = _stop_at(nproc, ["--resume", str(run_dir)], tmp_path / "r1.log", kill_at,
                       signal.SIGKILL)
    assert code != 0
    _run(nproc, ["--resume", str(run_dir)], tmp_path / "r2.log")

    straight, resumed = _summary(out / "straight"), _summary(run_dir)
    assert resumed["steps"] == straight["steps"] == STEPS
    assert resumed["param_digest"] == straight["param_digest"]  # bit-identical final weights
    assert resumed["losses"] == straight["losses"]
    assert resumed["val"]["bpb"] == straight["val"]["bpb"]
    assert "resumed from" in (tmp_path / "r2.log").read_text()
    leftovers = [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    events = [json.loads(line)["event"] for line in (run_dir / "log.jsonl").open()]
    assert events.count("resume") == 2 and events[-1] == "final"


def test_sigterm_then_kill9_then_resume_is_bit_identical(tmp_path):
    _stopped_and_resumed(tmp_path, 1, seed=14)


@pytest.mark.slow
def test_two_processes_sigterm_then_kill9_then_resume_is_bit_identical(tmp_path):
    _stopped_and_resumed(tmp_path, 2, seed=15)


@pytest.mark.slow
def test_compiled_and_deterministic_resume_is_bit_identical(tmp_path):
    """Under torch.compile on the CPU, inductor's parallel scatter-adds (embedding gradients)
    race across threads, so two compiled runs differ in the last bits; with --deterministic
    they fall back to ATen's ordered kernels and a resumed run matches a straight one again."""
    _stopped_and_resumed(tmp_path, 1, seed=16, extra=("--compile", "true",
                                                      "--deterministic", "true"))


# ---------------------------------------------------------------------------------------------
# In-process: divergence, run directories, what --resume accepts


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("PROTEUS_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(k)


def _main(capsys, argv) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    return code, err


def test_nan_stops_the_run_with_one_line_and_nothing_final(clean_env, capsys, tmp_path):
    code, err = _main(capsys, ["train", "--preset", "smoke", "--matrix-lr", "1e6",
                               "--warmup-steps", "0", "--iterations", "6",
                               "--checkpoint-every", "2", "--out-dir", str(tmp_path),
                               "--run-name", "nan"])
    run_dir = tmp_path / "nan"
    assert code == 1
    assert "training diverged at step 5: loss nan; first non-finite tensor: " in err, err
    assert "nothing final written (last checkpoint: " in err
    for final in ("model.ckpt", "model.int6", "summary.json"):
        assert not (run_dir / final).exists(), final
    for p in K.state_paths(run_dir):  # the checkpoints it kept are good ones
        assert K.first_nonfinite(K.load_train_state(p)["model"]) is None


def test_weights_the_artifact_cannot_hold_stop_the_run(clean_env, capsys, tmp_path):
    code, err = _main(capsys, ["train", "--preset", "smoke", "--embed-lr", "1e6",
                               "--warmup-steps", "0", "--iterations", "3",
                               "--out-dir", str(tmp_path), "--run-name", "big"])
    assert code == 1 and "cannot be stored in the artifact" in err, err
    assert not (tmp_path / "big" / "model.int6").exists()
    assert not (tmp_path / "big" / "summary.json").exists()


def test_run_directories_never_collide(clean_env, tmp_path, monkeypatch):
    named = build_config("smoke", {"train.out_dir": str(tmp_path), "train.run_name": "x"},
                         environ={})
    assert open_run_dir(named) == tmp_path / "x"
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        open_run_dir(named)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")  # the same second
    auto = build_config("smoke", {"train.out_dir": str(tmp_path)}, environ={})
    first, second = open_run_dir(auto), open_run_dir(auto)
    assert first.name == "smoke-20260101-000000" and second.name == "smoke-20260101-000000-2"
    assert (second / "config.json").exists()
    (first / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="that run finished"):
        open_run_dir(auto, resume=first)
    assert open_run_dir(auto, resume=second) == second  # the only way into an existing dir


def test_resume_keeps_the_runs_config(clean_env, capsys, tmp_path):
    cfg = build_config("smoke", {"train.out_dir": str(tmp_path), "train.run_name": "r"},
                       environ={})
    run_dir = open_run_dir(cfg)
    code, err = _main(capsys, ["train", "--resume", str(run_dir), "--seed", "7",
                               "--matrix-lr", "0.1"])
    assert code == 2
    assert "these options differ from it: seed (1337 -> 7), matrix_lr (0.025 -> 0.1)" in err
    code, err = _main(capsys, ["train", "--resume", str(run_dir), "--preset", "h100"])
    assert code == 2 and "preset ('smoke' -> 'h100')" in err
    state = K.state_dir(run_dir)
    state.mkdir()
    (state / "step-000000003.ckpt").write_bytes(b"damaged")
    code, err = _main(capsys, ["train", "--resume", str(run_dir)])
    assert code == 2 and f"{state / 'step-000000003.ckpt'} is damaged" in err, err


def test_train_state_holds_what_resuming_needs(clean_env, tmp_path):
    """The saved state round-trips every piece the loop restores (the bit-identity test above
    proves they are the right pieces)."""
    from proteus.train import train

    cfg = build_config("smoke", {"train.iterations": 3, "train.checkpoint_every": 1,
                                 "train.warmup_steps": 0}, environ={})
    trained = train(cfg, run_dir=tmp_path)
    states = K.state_paths(tmp_path)
    assert [p.name for p in states] == ["step-000000002.ckpt", "step-000000003.ckpt"]
    s = K.load_train_state(states[-1])
    assert s["step"] == 3 and len(s["losses"]) == 3 and s["train_s"] > 0 and s["step_ms"] > 0
    assert {"model", "optimizers", "averages", "stream", "shards", "rng", "world"} <= set(s)
    muon = s["optimizers"][0]["state"]
    assert any("momentum_buffer" in v for v in muon.values())
    assert s["averages"]["ema"] is not None and s["averages"]["swa_count"] >= 1
    assert torch.equal(s["rng"]["cpu"], torch.get_rng_state())
    assert trained.stats["steps"] == 3


def test_a_resumed_run_logs_each_step_once(clean_env, tmp_path, caplog):
    """kill -9 after step 2 was logged and before its state was written (here: that state lost),
    the line it was writing torn: the resumed run logs step 2 again, and log.jsonl (what the
    plot draws) holds each step once, the torn line gone; one "resumed from" line."""
    from proteus.train import train

    fast = {"train.checkpoint_every": 1, "train.warmup_steps": 0, "train.compile": False,
            "train.threads": 1}
    cfg = build_config("smoke", {"train.iterations": 2, **fast}, environ={})
    log_path = tmp_path / "log.jsonl"
    threads = torch.get_num_threads()  # train.threads sets the process's count
    try:
        jlog = K.JsonLog(log_path)
        train(cfg, run_dir=tmp_path, jlog=jlog)
        jlog.close()
        K.state_paths(tmp_path)[-1].unlink()  # step 2's state: never written
        with open(log_path, "a") as f:
            f.write('{"event": "step", "step": 3, "lo')  # torn by the kill
        jlog = K.JsonLog(log_path)
        with caplog.at_level("INFO", logger="proteus"):
            train(cfg, run_dir=tmp_path, jlog=jlog, resume=K.state_paths(tmp_path)[-1])
        jlog.close()
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in log_path.open()]
    steps = [r["step"] for r in records if r["event"] == "step"]
    assert steps == [1, 2], steps
    saved = [r["step"] for r in records if r["event"] == "checkpoint"]
    assert saved == [1, 2], saved
    assert [r["step"] for r in records if r["event"] == "resume"] == [1]
    assert sum("resumed from" in r.getMessage() for r in caplog.records) == 1


def test_drop_after_keeps_what_the_resumed_run_will_not_write_again(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = ['{"event": "config"}', '{"event": "step", "step": 1}',
             '{"event": "resume", "step": 1}', '{"event": "step", "step": 2}',
             '{"event": "val", "step": 3}', '{"event": "final", "steps": 3}', "[1]",
             '{"event": "step", "step": 4']
    path.write_text("\n".join(lines))
    log = K.JsonLog(path)
    assert log.drop_after(2) == 4
    log.write(event="resume", step=2)
    log.close()
    assert path.read_text().splitlines() == lines[:4] + ['{"event": "resume", "step": 2}']
    assert K.JsonLog(None).drop_after(0) == 0


def test_full_disk_is_one_line_and_nothing_final_is_half_written(clean_env, capsys, tmp_path,
                                                                 monkeypatch):
    real = os.replace

    def replace(src, dst):  # the disk fills up when the artifact is renamed into place
        if str(dst).endswith("model.int6"):
            raise OSError(28, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    code, err = _main(capsys, ["train", "--preset", "smoke", "--iterations", "1",
                               "--warmup-steps", "0", "--out-dir", str(tmp_path),
                               "--run-name", "full"])
    run_dir = tmp_path / "full"
    assert code == 2 and f"cannot write {run_dir / 'model.int6'}: No space left" in err, err
    assert sorted(p.name for p in run_dir.iterdir()) == [  # no artifact, no summary
        "checkpoints", "config.json", "log.jsonl", "model.ckpt", "train.log"]
