"""Convergence: the model trains with ``--kernels triton`` (every kernel, on the interpreter on
CPU) and its loss curve follows ``--kernels ref``.

Tolerance: every step's loss within 1e-3 relative of the reference run (fp32 both; the only
difference is the order of floating-point sums inside the kernels), and both runs learn. The
step count is fixed and the wall-clock cap off: the LR warm-down follows the time left when a
cap is set, so on a loaded machine the slower (interpreted) run would stop early and decay its
learning rate sooner.
"""

from __future__ import annotations

import pytest

from proteus.config import build_config
from proteus.train import train

pytestmark = pytest.mark.interpret


def _run(kernels: str) -> list[float]:
    cfg = build_config("smoke", {"train.kernels": kernels, "train.iterations": 30,
                                 "train.max_wallclock_s": 0,
                                 "train.warmup_steps": 0, "train.seq_len": 32,
                                 "train.batch_tokens": 128, "train.warmdown_steps": 10,
                                 "train.swa_every": 0, "train.ema_decay": 0.0,
                                 "eval.val_tokens": 256}, environ={})
    return train(cfg).stats["losses"]


def test_triton_kernels_follow_the_reference_loss_curve():
    ref, tri = _run("ref"), _run("triton")
    assert len(ref) == len(tri) == 30
    for i, (a, b) in enumerate(zip(ref, tri, strict=True)):
        assert b == pytest.approx(a, rel=1e-3), f"step {i}: triton {b} vs ref {a}"
    assert sum(tri[-5:]) / 5 < tri[0] - 0.5  # and it learns
