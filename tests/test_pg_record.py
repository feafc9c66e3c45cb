"""The pg-record preset end to end: its options on the command line, depth recurrence switched
on by the loop at its training fraction, and (slow) a smoke-scale run with every component on
that resumes bit-identically and passes the audit."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proteus import train as T
from proteus.cli import build_parser
from proteus.config import PRESETS, ModelConfig, TrainConfig, build_config

ROOT = Path(__file__).resolve().parent.parent

NEW_MODEL = ("rope_yarn_len", "skip_gates", "smear_window", "attn_gate_window",
             "attn_gate_scale", "parallel_from", "parallel_final", "recur_first",
             "recur_last", "recur_extra", "init_orthogonal")
NEW_TRAIN = ("warmdown_frac", "min_lr", "recur_at_frac", "muon_ns_coeffs", "muon_row_norm",
             "adam_eps", "scalar_wd")

# every component on, at smoke scale (4 blocks of width 64, 64-token sequences)
ALL_ON = ["--num-layers", "4", "--xsa-last-n", "4", "--q-gain-init", "5", "--mlp-mult", "4",
          "--mlp-slope", "0.5", "--rope-yarn-len", "32", "--skip-gates", "true",
          "--parallel-from", "2", "--recur-first", "1", "--recur-last", "1",
          "--recur-extra", "2", "--attn-gate-window", "12", "--attn-gate-scale", "0.5",
          "--smear-window", "12", "--bigram-buckets", "0", "--value-embed-layers", "",
          "--attn-docs", "true", "--warmdown-frac", "0.85", "--min-lr", "0.1",
          "--recur-at-frac", "0.35", "--muon-ns-coeffs", "polar-express",
          "--muon-row-norm", "true", "--adam-beta2", "0.99", "--adam-eps", "1e-8",
          "--adam-wd", "0.085", "--scalar-wd", "0.02", "--muon-wd", "0.095",
          "--ema-decay", "0.9965", "--swa-every", "0", "--max-wallclock-s", "0",
          "--init-orthogonal", "true"]


def _cli(*args) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "proteus", *args], capture_output=True,
                          text=True, env=e, cwd=ROOT, timeout=600)


def test_help_lists_every_pg_record_option_with_its_range(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--preset", "pg-record", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for cls, names in ((ModelConfig, NEW_MODEL), (TrainConfig, NEW_TRAIN)):
        for f in dataclasses.fields(cls):
            if f.name not in names:
                continue
            flag = "--" + f.name.replace("_", "-")
            assert flag in text, flag
            rng = f.metadata.get("range") or "|".join(f.metadata.get("choices", ()))
            if rng:
                assert rng in text, (flag, rng)
    assert "pg-record" in text


def test_the_preset_is_the_entrys_command():
    p = PRESETS["pg-record"]
    m, t = p["model"], p["train"]
    assert (m["xsa_last_n"], m["num_layers"], m["q_gain_init"], m["rope_dims"]) == (11, 11, 5.0,
                                                                                   16)
    assert (m["parallel_from"], m["recur_first"], m["recur_last"], m["recur_extra"]) == (
        8, 3, 5, 2)
    assert (m["attn_gate_window"], m["attn_gate_scale"], m["smear_window"]) == (12, 0.5, 12)
    assert (t["warmdown_frac"], t["min_lr"], t["recur_at_frac"], t["adam_beta2"]) == (
        0.85, 0.1, 0.35, 0.99)
    assert (t["matrix_lr"], t["grad_clip"], t["ema_decay"], t["warmup_steps"]) == (
        0.026, 0.3, 0.9965, 20)


def test_recurrence_switches_on_at_its_training_fraction(monkeypatch):
    """The loop turns recurrence off before recur_at_frac and on from it (warm-up: both)."""
    cfg = build_config("smoke", {"model.num_layers": 3, "model.recur_first": 1,
                                 "model.recur_last": 1, "model.recur_extra": 1,
                                 "train.recur_at_frac": 0.5, "train.iterations": 2,
                                 "train.batch_tokens": 128,
                                 "train.warmup_steps": 2, "train.max_wallclock_s": 0.0,
                                 "train.compile": False, "model.xsa_last_n": 1,
                                 "model.value_embed_layers": ""}, environ={})
    seen: list[bool] = []
    real = T.GPT.set_recurrence

    def spy(self, on):
        seen.append(bool(on))
        real(self, on)

    monkeypatch.setattr(T.GPT, "set_recurrence", spy)
    trained = T.train(cfg)
    # warm-up (off, on), steps 0 and 1 at frac 0 and .5, then on for the final model
    assert seen == [False, True, False, True, True]
    assert trained.model.recurring


@pytest.mark.slow
def test_smoke_scale_run_with_every_component_resumes_bit_identically(tmp_path):
    from test_resume import _stopped_and_resumed  # the same proof as the default model's

    _stopped_and_resumed(tmp_path, 1, seed=24, extra=tuple(ALL_ON))
    r = _cli("audit", str(tmp_path / "runs" / "straight" / "model.ckpt"), "--audit-positions",
             "8", "--val-tokens", "1024")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "audit: PASS" in r.stdout
