"""No hang: two gloo processes train; one is stopped (SIGSTOP: a stalled peer) or killed
(SIGKILL: a dead one). The other must end within the collective timeout, with exit code 1 and
one line that names its rank and the peer that was elsewhere.

The processes are started directly (RANK/WORLD_SIZE/MASTER_* as torchrun would set them), so
the test controls each one; ``--dist-timeout-s 4`` stands in for the run's time cap.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path: Path) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
        env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(tmp_path / f"rank{rank}.out", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "proteus", "train", "--preset", "smoke", "--iterations",
             "100000", "--max-wallclock-s", "0", "--warmup-steps", "0", "--checkpoint-every-s",
             "0", "--dist-timeout-s", str(TIMEOUT_S), "--out-dir", str(tmp_path / "runs")],
            stdout=log, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    return procs


def _wait_for_step(tmp_path: Path, procs, step: int) -> None:
    deadline = time.monotonic() + 300
    while f"step {step:6d}" not in (tmp_path / "rank0.out").read_text():
        for p in procs:
            assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("sig, why", [
    (signal.SIGSTOP, "no answer from a peer within the 4 s"),
    pytest.param(signal.SIGKILL, "a peer closed its connection", marks=pytest.mark.slow)])
def test_a_stalled_or_dead_peer_ends_the_other_rank_with_one_line(tmp_path, sig, why):
    procs = _start(tmp_path)
    try:
        _wait_for_step(tmp_path, procs, 3)
        os.kill(procs[1].pid, sig)
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=TIMEOUT_S + 60)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err[-3000:]
    assert waited < TIMEOUT_S + 30, waited  # the timeout, plus this loaded machine's slack
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("proteus: error: rank 0 of 2: ") and why in lines[0], lines[0]
    assert "; rank 1 was last at step " in lines[0], lines[0]
    assert "every rank stops; continue with: proteus train --resume " in lines[0], lines[0]
