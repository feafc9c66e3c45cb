"""Bad input at the command line: every option and every ``PROTEUS_*`` variable fed a bad value,
every command fed a bad environment, bad files and unwritable folders. Each must end with exit
code 2, one line on stderr, no traceback, and no run directory or file left behind.

In-process through ``proteus.cli.main`` (a subprocess per case would cost ~4 s of imports each);
the bad values are derived from each field's declared type, choices and range, so a field added
later is covered (and a field that declares no range fails ``test_every_field_declares_its
range``).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from proteus import config as C
from proteus import data as D
from proteus import options as OPT
from proteus.cli import main
from proteus.model import build_model
from proteus.run import write_run_artifact

ROOT = Path(__file__).resolve().parent.parent

# Bad values for the fields whose range is a description, not an interval.
DESCRIBED = {
    "preset": [],  # --preset is its own option; tested below
    "train_files": ["/nope/*.bin"],
    "val_files": ["/nope/*.bin"],
    "tokenizer": ["/nope.model"],
    "out_dir": [""],
    "run_name": ["a/b", ".."],
    "value_embed_layers": ["x", "2", "1,1", "-1"],  # smoke has 2 blocks
    "cache_params": ["/nope.json"],
    "ttt_params": [""],
    "ttt_phases": ["5,3", "0", "a", "1,1"],
    "ttt_lora_targets": ["", "q,x", "q,q"],
}


def _field_kinds():
    for section, cls in C.SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield section, f, hints[f.name]


def _bad_values(f, kind) -> list[str]:
    meta = f.metadata
    if kind is bool:
        return ["maybe", "2"]
    if "choices" in meta:
        return ["bogus", ""]
    if f.name in DESCRIBED:
        return DESCRIBED[f.name]
    lo, hi, lo_open, hi_open = C._interval(meta["range"])
    if kind is int:
        return ["abc", "1.5", str(lo if lo_open else lo - 1), str(hi if hi_open else hi + 1)]
    return ["abc", "nan", "inf", str(lo if lo_open else lo - 1),
            str(hi if hi_open else hi * 10 + 1)]


CASES = [(s, f.name, v) for s, f, k in _field_kinds() for v in _bad_values(f, k)]


def test_every_field_declares_its_range():
    for _section, f, kind in _field_kinds():
        if kind is bool:
            continue
        assert "choices" in f.metadata or "range" in f.metadata, f"{f.name} declares no range"
        if "range" in f.metadata and f.name not in DESCRIBED:
            assert C._interval(f.metadata["range"]), f"{f.name}: range is not an interval"


def _one_line_exit_2(capsys, argv, needle=None):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(err.strip().splitlines()) == 1, err
    if needle:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize("section, name, value", CASES)
def test_every_option_with_a_bad_value(clean_env, capsys, section, name, value):
    out = clean_env / "runs"
    flag = "--" + name.replace("_", "-")
    args = ["train", "--preset", "smoke", flag, value]
    if name != "out_dir":
        args += ["--out-dir", str(out)]
    err = _one_line_exit_2(capsys, args)
    assert flag in err or name in err or value in err, err
    assert not out.exists() or not list(out.iterdir()), "a run directory was left behind"


@pytest.mark.parametrize("section, name, value", [c for c in CASES if c[2] != ""])
def test_every_variable_with_a_bad_value(clean_env, capsys, monkeypatch, section, name, value):
    monkeypatch.setenv("PROTEUS_" + name.upper(), value)
    out = clean_env / "runs"
    args = ["train", "--preset", "smoke"] + (["--out-dir", str(out)] if name != "out_dir" else [])
    err = _one_line_exit_2(capsys, args)
    assert name in err or "PROTEUS_" + name.upper() in err or value in err, err
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("args, needle", [
    (["--compile", "maybe"], "argument --compile: expected a boolean (true/false), got 'maybe'"),
    (["--num-heads", "0"], "argument --num-heads: expected an integer in [1, 4096], got '0'"),
    (["--mlp-mult", "nan"], "argument --mlp-mult: expected a finite number"),
    (["--num-heads", "3"], "not divisible by num_heads 3"),
    (["--num-kv-heads", "2", "--num-heads", "1"], "not a multiple of num_kv_heads"),
    (["--rope-dims", "7"], "rope_dims 7 must be even"),
    (["--seq-len", "100"], "does not divide batch_tokens"),
    (["--micro-batch-seqs", "3"], "does not divide the 8 sequences per rank"),
    (["--micro-batch-seqs", "9"], "more than the 8 sequences"),
    (["--mlp-mult", "0.001"], "needs at least 1"),
    (["--vocab-size", "2048"], "no bundled data for a vocabulary of 2048"),
    (["--val-tokens", "1"], "val_tokens 1"),
    (["--xsa-last-n", "3"], "xsa_last_n 3 must be in [0, 2]"),
    (["--iterations", "0"], "--iterations"),
    (["--batch-tokens", "0"], "--batch-tokens"),
    (["--micro-batch-seqs", "-1"], "--micro-batch-seqs"),
    (["--log-every", "0"], "--log-every"),
    (["--threads", "-1"], "--threads"),
    (["--eval-batch-seqs", "0"], "--eval-batch-seqs"),
    (["--embed-lr", "nan"], "--embed-lr"),
])
def test_cross_field_and_issue_cases(clean_env, capsys, args, needle):
    out = clean_env / "runs"
    _one_line_exit_2(capsys, ["train", "--preset", "smoke", *args, "--out-dir", str(out)], needle)
    assert not out.exists() or not list(out.iterdir())


def test_bad_preset_and_token_files(clean_env, capsys):
    out = str(clean_env / "runs")
    _one_line_exit_2(capsys, ["train", "--preset", "nope", "--out-dir", out], "unknown preset")
    empty = clean_env / "empty.bin"
    D.write_shard(empty, np.zeros(0, dtype=np.uint16))
    _one_line_exit_2(capsys, ["train", "--preset", "smoke", "--out-dir", out,
                              "--train-files", str(empty)], "holds no tokens")
    big = clean_env / "big.bin"
    D.write_shard(big, np.array([1, 5, 4000, 7], dtype=np.uint16))
    _one_line_exit_2(capsys, ["train", "--preset", "smoke", "--out-dir", out, "--val-files",
                              str(big), "--train-files", str(big)], "token id 4000")
    _one_line_exit_2(capsys, ["train", "--preset", "smoke", "--out-dir", out, "--val-files",
                              str(empty)], "validation shards hold fewer than 2 tokens")


@pytest.mark.parametrize("command", [["train", "--preset", "smoke"], ["eval", "x.ckpt"],
                                     ["audit", "x.ckpt"], ["artifact", "inspect", "x.int6"],
                                     ["kernels", "report"], ["bench"]])
def test_unknown_variable_is_refused_by_every_command(clean_env, capsys, monkeypatch, command):
    monkeypatch.setenv("PROTEUS_FOO", "1")
    args = command + (["--out-dir", str(clean_env / "runs")] if command[0] == "train" else [])
    _one_line_exit_2(capsys, args, "unknown environment variable PROTEUS_FOO")


@pytest.mark.parametrize("command, var, value", [
    (["eval", "x.ckpt"], "PROTEUS_MODEL_DIM", "64"),
    (["audit", "x.ckpt"], "PROTEUS_KERNELS", "ref"),
    (["artifact", "inspect", "x"], "PROTEUS_STRIDE", "64")])
def test_variable_a_command_does_not_read_is_refused(clean_env, capsys, monkeypatch, command,
                                                     var, value):
    monkeypatch.setenv(var, value)
    _one_line_exit_2(capsys, command, f"{var} does not apply to `proteus {command[0]}`")


@pytest.mark.parametrize("command", [["eval", "x.ckpt"], ["audit", "x.ckpt"]])
def test_eval_options_are_checked_like_train_ones(clean_env, capsys, monkeypatch, command):
    _one_line_exit_2(capsys, command + ["--stride", "-1"], "argument --stride")
    monkeypatch.setenv("PROTEUS_EVAL_BATCH_SEQS", "0")
    _one_line_exit_2(capsys, command, "PROTEUS_EVAL_BATCH_SEQS")


@pytest.mark.parametrize("env, needle", [({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc'"),
                                         ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
                                         ({"RANK": "-1"}, "RANK='-1'"),
                                         ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3")])
def test_bad_torchrun_environment(clean_env, capsys, monkeypatch, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _one_line_exit_2(capsys, ["train", "--preset", "smoke", "--out-dir",
                              str(clean_env / "runs")], needle)


def test_bad_paths_for_the_file_commands(clean_env, capsys):
    d = clean_env / "adir"
    d.mkdir()
    _one_line_exit_2(capsys, ["eval", str(d)], "is not a file")
    _one_line_exit_2(capsys, ["audit", str(d)], "is not a file")
    _one_line_exit_2(capsys, ["artifact", "inspect", str(d)], "is not a file")
    _one_line_exit_2(capsys, ["eval", str(clean_env / "none.ckpt")], "not found")
    (clean_env / "junk.int6").write_bytes(b"junk")
    _one_line_exit_2(capsys, ["artifact", "inspect", str(clean_env / "junk.int6")])
    _one_line_exit_2(capsys, ["train", "--resume", str(clean_env / "nowhere")],
                     "not a run directory")


def test_out_dir_that_cannot_be_created(clean_env, capsys):
    blocker = clean_env / "file"
    blocker.write_text("x")
    _one_line_exit_2(capsys, ["train", "--preset", "smoke", "--out-dir", str(blocker / "sub")],
                     "cannot create")


def _typed(kind: type, raw: str):
    """``raw`` as the field's type where it parses (so the range check is what must catch it),
    else the raw text (so the type check must)."""
    if kind is bool:
        return raw
    try:
        return kind(raw)
    except ValueError:
        return raw


@pytest.mark.parametrize("section, name, value", [  # a missing path is found when opened
    c for c in CASES if c[1] not in ("train_files", "val_files", "tokenizer", "cache_params")])
def test_every_bad_value_in_a_saved_config_is_refused(section, name, value):
    """A checkpoint's or run's saved config goes through the same checks as the CLI."""
    kind = typing.get_type_hints(C.SECTIONS[section])[name]
    d = build_config_dict()
    d[section][name] = _typed(kind, value)
    with pytest.raises(C.ConfigError, match="saved: invalid config|saved: config") as e:
        C.RunConfig.from_dict(d, where="saved")
    assert "\n" not in str(e.value)


def build_config_dict() -> dict:
    return OPT.build_config("smoke", environ={}).to_dict()


def test_a_closed_stdout_is_ignored(tmp_path):
    """``proteus artifact inspect X | head -0``: the reader is gone before the first line; no
    BrokenPipeError, no traceback, exit 0."""
    cfg = OPT.build_config("smoke", environ={})
    write_run_artifact(build_model(cfg), cfg, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.Popen([sys.executable, "-m", "proteus", "artifact", "inspect",
                          str(tmp_path / "model.int6")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and err == "", err
