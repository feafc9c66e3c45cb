"""Issue 29, "trust nothing that is not sealed": every JSON the project reads fuzzed (depth,
types, sizes), files given by path that are devices, FIFOs or too large (under a memory limit
set inside the test), run directories that appear whole or not at all and that no refused run
leaves behind, a sealed config.json that ``--resume`` checks, symlinks and user files in a run
directory, the fallback from a damaged newest checkpoint, and the lost-peer line.

In-process through ``proteus.cli.main`` and the library (a subprocess only where the memory
limit must not touch the test process).
"""

from __future__ import annotations

import json
import logging
import lzma
import os
import random
import socket
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from proteus import checkpoint as K
from proteus import commands
from proteus import dist as P
from proteus.artifact import read_artifact, write_artifact
from proteus.cli import main
from proteus.errors import ProteusError
from proteus.eval.blend import NgramConfig
from proteus.eval.fit import cache_params_dict, load_cache_params
from proteus.files import (
    SEAL_KEY,
    InputError,
    read_json,
    remove_stale_temps,
    seal_json,
    sha256_file,
    write_sealed_json,
)
from proteus.model import build_model
from proteus.options import build_config
from proteus.plot import read_run_log
from proteus.quant import quantize_state_dict
from proteus.run import SUMMARY_SEAL, open_run_dir, read_run_config
from proteus.submit import artifact_provenance, check_summary_types

ROOT = Path(__file__).resolve().parent.parent
BAD_VALUES = ["abc", None, [1], {}, {"a": [1]}, 1e308, -1, True, 2**70, ""]


def _one_line(capsys, argv, needle="", code=2) -> str:
    try:
        got = main(argv)
    except SystemExit as e:  # argparse's own errors
        got = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    assert got == code and len(err.strip().splitlines()) == 1, (got, err)
    assert needle in err, (needle, err)
    return err


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _smoke(tmp_path: Path, **over):
    return build_config("smoke", {"train.out_dir": str(tmp_path / "runs"), **over}, environ={})


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A real int6 artifact of an untrained smoke model."""
    cfg = build_config("smoke", {}, environ={})
    torch.manual_seed(0)
    state = {k: v.detach() for k, v in build_model(cfg, "ref").state_dict().items()}
    path = tmp_path_factory.mktemp("art") / "model.int6"
    write_artifact(str(path), quantize_state_dict(state), {"run_config": cfg.to_dict(),
                                                           "float_bpb": 9.0})
    return path


def _rewrite_header(raw: bytes, edit) -> bytes:
    """The artifact's bytes with its header JSON edited and its crc32 made valid again."""
    hlen = struct.unpack_from("<I", raw, 12)[0]
    hdr = json.loads(lzma.decompress(raw[16 : 16 + hlen]))
    new = edit(hdr)
    body = new if isinstance(new, bytes) else json.dumps(hdr).encode()
    header = lzma.compress(body)
    prefix = raw[:8] + struct.pack("<II", 2, len(header)) + header
    return prefix + struct.pack("<I", zlib.crc32(prefix)) + raw[16 + hlen + 4 :]


def _leaves(obj, path=()):
    """Every (path, value) of a JSON object, containers included."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))


def _replaced(obj, path, value):
    obj = json.loads(json.dumps(obj))
    if not path:
        return value
    node = obj
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return obj


def _variants(obj, rng: random.Random | None = None, n: int | None = None):
    cases = [(p, v) for p, _ in _leaves(obj) for v in BAD_VALUES]
    if rng is not None and n is not None and len(cases) > n:
        cases = rng.sample(cases, n)
    for p, v in cases:
        yield p, _replaced(obj, p, v)


def _only_one_line_errors(fn, label) -> int:
    """Call ``fn``; it may return or raise a ProteusError with a one-line message, nothing
    else. Returns 1 when it refused."""
    try:
        fn()
    except ProteusError as e:
        assert "\n" not in str(e) and str(e), (label, str(e))
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# Fuzz over every JSON the project reads


def test_fuzz_config_json(clean_env):
    """config.json: every field (and every section) given every wrong type, resealed so the
    type checks answer, not the seal; all refused in one line (a wrong value cannot pass)."""
    run = open_run_dir(_smoke(clean_env, **{"train.run_name": "r"}))
    good = json.loads((run / "config.json").read_text())
    seal = good.pop(SEAL_KEY)
    kind = lambda v: ("bool" if isinstance(v, bool) else "number" if isinstance(v, (int, float))  # noqa: E731
                      else type(v).__name__)
    refused = 0
    for path, bad in _variants(good):
        (run / "config.json").write_text(json.dumps(
            seal_json(bad, seal["format"], seal["binds"]) if isinstance(bad, dict) else bad))
        if not _only_one_line_errors(lambda: read_run_config(run), path):
            # what passes is a legal value of the field's own type (True for a flag, a path
            # for a path, -1 in a range that holds it); no section or field may be missing
            new, old = _replaced(bad, (), bad), good
            for k in path:
                new, old = new[k], old[k]
            assert len(path) == 2 and kind(new) == kind(old), (path, new)
        refused += 1
    assert refused > 800
    (run / "config.json").write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(InputError, match="nests 50000 levels deep"):
        read_run_config(run)


def test_config_of_an_older_proteus_reads_with_defaults(clean_env, caplog):
    """A run started before some options existed still resumes: its sealed config.json lacks
    them, and they take their defaults (the behaviour from before they existed), said in one
    line. A section stripped of most of its fields is refused."""
    cfg = _smoke(clean_env, **{"train.run_name": "old"})
    run = open_run_dir(cfg)
    good = json.loads((run / "config.json").read_text())
    seal = good.pop(SEAL_KEY)
    old = json.loads(json.dumps(good))
    for k in ("ttt_docs", "ttt_beta2"):
        del old["eval"][k]
    (run / "config.json").write_text(json.dumps(seal_json(old, seal["format"], seal["binds"])))
    with caplog.at_level(logging.INFO, logger="proteus.run"):
        assert read_run_config(run) == cfg
    assert "older proteus: 2 option(s)" in caplog.text and "eval.ttt_beta2" in caplog.text
    gutted = json.loads(json.dumps(good))
    gutted["train"] = {k: v for k, v in list(good["train"].items())[:3]}
    (run / "config.json").write_text(json.dumps(seal_json(gutted, seal["format"],
                                                          seal["binds"])))
    with pytest.raises(ProteusError, match="lacks most of section"):
        read_run_config(run)


def test_fuzz_cache_params(tmp_path):
    good = cache_params_dict(NgramConfig(order=5, doc=True), 1024)
    path = tmp_path / "p.json"
    refused = 0
    for p, bad in _variants(good):
        path.write_text(json.dumps(bad))
        refused += _only_one_line_errors(lambda: load_cache_params(str(path), 5, True, 1024), p)
    assert refused > 0
    for text, needle in (("[" * 100_000, "nests 100000 levels"), ("\xff", "is not JSON")):
        path.write_text(text)
        with pytest.raises(ProteusError, match=needle):
            load_cache_params(str(path), 5, True, 1024)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ProteusError, match="not UTF-8"):
        load_cache_params(str(path), 5, True, 1024)
    with open(path, "wb") as f:
        f.truncate(2 << 20)
    with pytest.raises(ProteusError, match="over the 1.0 MiB limit"):
        load_cache_params(str(path), 5, True, 1024)


def test_fuzz_artifact_header(artifact, tmp_path):
    """Header JSON whose crc32 is valid: deep, mistyped meta, tensors and sections (a sample);
    every one is read back or refused in one line before anything is decoded wrongly."""
    raw = artifact.read_bytes()
    hlen = struct.unpack_from("<I", raw, 12)[0]
    hdr = json.loads(lzma.decompress(raw[16 : 16 + hlen]))
    path = tmp_path / "a.int6"
    path.write_bytes(_rewrite_header(raw, lambda h: b"[" * 100_000 + b"]" * 100_000))
    with pytest.raises(ProteusError, match="nests 100000 levels deep"):
        K.load_model(str(path), "ref")
    rng = random.Random(29)
    refused = 0
    for p, bad in _variants(hdr, rng, 60):
        path.write_bytes(_rewrite_header(raw, lambda h, bad=bad: json.dumps(bad).encode()))
        refused += _only_one_line_errors(lambda: K.load_model(str(path), "ref"), p)
    assert refused >= 30


def test_fuzz_summary_fields_reach_no_traceback(tmp_path):
    """summary.json as submit reads it, resealed after each type change: load_run and every
    function that reads its numbers refuse in one line or work (submit's own checks; the seal
    and the binds are tested in test_submit.py)."""
    good = dict(steps=10, train_seconds=1.0, eval_seconds=1.0, hardware="x",
                val=dict(bpb=1.0, loss=1.0, tokens=10, bytes=20),
                val_sliding=dict(bpb=1.0, stride=32),
                cache=dict(bpb_cache=1.0, audit_passed=True), ttt=dict(bpb=1.0),
                artifact=dict(quantized_bpb=1.0, scores={"int6 plain": 1.0}))
    for p, bad in _variants(good):
        if not isinstance(bad, dict):
            bad = {"artifact": bad}
        _only_one_line_errors(lambda bad=bad: check_summary_types(bad, "s"), p)


def test_fuzz_run_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    good = [{"event": "config", "config": {"train": {"preset": "smoke"}}, "params": 5,
             "world": 1},
            {"event": "step", "step": 1, "train_s": 0.5, "loss": 6.0, "tok_s": 100.0},
            {"event": "val", "step": 1, "bpb": 3.0, "train_s": 0.5},
            {"event": "final", "val": {"bpb": 3.0}, "steps": 1, "train_seconds": 0.5}]
    refused = 0
    for i, rec in enumerate(good):
        for p, bad in _variants(rec):
            lines = [*good[:i], bad, *good[i + 1 :]]
            (run / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
            refused += _only_one_line_errors(lambda: read_run_log(run), (i, p))
    assert refused >= 100  # every mistyped field the figure reads
    for raw, needle in ((b"\x80\x81 junk\n", "not UTF-8"), (b"[" * 5000 + b"\n", "nests"),
                        (b'{"event": "step"\n', "is not JSON")):
        (run / "log.jsonl").write_bytes(raw)
        with pytest.raises(ProteusError, match=needle):
            read_run_log(run)


def test_plot_of_binary_junk_is_one_line(tmp_path, capsys):
    (tmp_path / "log.jsonl").write_bytes(b"\xff\xfe" + bytes(range(256)) * 4)
    _one_line(capsys, ["plot", str(tmp_path)], "not UTF-8")


# ---------------------------------------------------------------------------------------------
# Devices, FIFOs and huge files, under a memory limit


def test_devices_fifos_and_huge_files_are_refused_under_a_memory_limit(artifact, tmp_path):
    """Each case in a subprocess limited to 3 GiB of address space: reading /dev/zero would end
    in MemoryError (exit 1, "out of memory"); a FIFO would block. Each must be exit 2 and one
    line, before a byte is read."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    devzero_cfg = build_config("smoke", {"train.tokenizer": "/dev/zero"}, environ={})
    bad_art = tmp_path / "devzero.int6"
    qs, meta = read_artifact(str(artifact))
    write_artifact(str(bad_art), qs, {**meta, "run_config": devzero_cfg.to_dict()})
    run = tmp_path / "run"
    run.mkdir()
    os.symlink("/dev/zero", run / "log.jsonl")
    out = str(tmp_path / "runs")
    train = ["train", "--preset", "smoke", "--out-dir", out]
    cases = [
        (train + ["--tokenizer", "/dev/zero"], "is a character device"),
        (train + ["--tokenizer", str(fifo)], "is a FIFO"),
        (train + ["--cache", "ngram", "--cache-params", "/dev/zero"], "is a character device"),
        (train + ["--val-files", str(fifo)], "is a FIFO"),
        (["eval", str(bad_art), "--val-tokens", "256"], "tokenizer /dev/zero is a character"),
        (["plot", str(run)], "is a character device"),
        (["artifact", "inspect", "/dev/zero"], "not a file"),
        (["eval", str(fifo)], "not a file"),
    ]
    script = textwrap.dedent("""
        import io, json, resource, sys, contextlib
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from proteus.cli import main
        out = []
        for argv, _ in json.loads(sys.argv[1]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as e:
                    code = e.code
            out.append([code, err.getvalue()])
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (argv, needle), (code, err) in zip(cases, results, strict=True):
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (argv, err)
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------------
# Run directories: atomic, half-made ones recognised, none left by a refused run


@pytest.mark.parametrize("args, env, needle", [
    (["--val-start", str(2**48)], {}, "val"),
    (["--ttt", "true", "--ttt-chunk", "3"], {}, "ttt"),
    ([], {"LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
    ([], {"WORLD_SIZE": "2"}, "RANK, MASTER_ADDR, MASTER_PORT are not set"),
    (["--batch-tokens", str(2**36)], {}, "GiB of memory"),
    (["--model-dim", "65536", "--num-layers", "1024"], {}, "GiB of memory"),
    (["--preset", ""], {}, "unknown preset ''"),
    (["--run-name", "a\nb"], {}, "plain folder name"),
    (["--run-name", " "], {}, "plain folder name"),
])
def test_no_refused_run_leaves_a_directory(clean_env, capsys, monkeypatch, args, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = clean_env / "runs"
    preset = [] if "--preset" in args else ["--preset", "smoke"]
    err = _one_line(capsys, ["train", *preset, *args, "--out-dir", str(out),
                             "--iterations", "1"], needle)
    if "GiB of memory" in needle:
        assert "needs at least" in err and "available" in err  # the estimate and the limit
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("CUDA out of memory. Tried")])
def test_an_out_of_memory_exit_leaves_no_directory(clean_env, capsys, monkeypatch, exc):
    def oom(*a, **k):
        raise exc
    monkeypatch.setattr(commands, "run", oom)
    out = clean_env / "runs"
    _one_line(capsys, ["train", "--preset", "smoke", "--out-dir", str(out)], "out of memory",
              code=1)
    assert out.is_dir() and not list(out.iterdir())


def test_a_half_made_run_directory_is_reused_or_named(clean_env, capsys):
    cfg = _smoke(clean_env, **{"train.run_name": "r"})
    half = clean_env / "runs" / "r"
    half.mkdir(parents=True)  # an older proteus killed between mkdir and config.json
    _one_line(capsys, ["train", "--resume", str(half)], "a half-made run directory")
    logging.getLogger("proteus").setLevel(logging.INFO)  # as the command line sets it
    assert open_run_dir(cfg) == half
    said = capsys.readouterr().out
    assert "left half-made by a killed run" in said and "reusing it" in said
    assert read_run_config(half) == cfg
    # a directory with anything else in it is somebody's: refused, not reused
    other = clean_env / "runs" / "o"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ProteusError, match="already exists"):
        open_run_dir(_smoke(clean_env, **{"train.run_name": "o"}))


def test_a_killed_start_leaves_no_name_taken(clean_env):
    """Creation is a rename of ``.NAME.tmpPID``: a start killed before it leaves only that,
    which the next start of the name removes (its process is gone); a live one is kept."""
    parent = clean_env / "runs"
    dead = parent / f".r.tmp{_dead_pid()}"
    live_pid_dir = parent / f".r.tmp{os.getppid()}"  # a start still running
    for d in (dead, live_pid_dir):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    run = open_run_dir(_smoke(clean_env, **{"train.run_name": "r"}))
    assert run == parent / "r" and (run / "config.json").is_file()
    assert not dead.exists() and live_pid_dir.exists()
    assert sorted(p.name for p in parent.iterdir() if not p.name.startswith(".r.tmp")) == ["r"]


def test_resume_refuses_an_edited_config(clean_env, capsys):
    run = open_run_dir(_smoke(clean_env, **{"train.run_name": "r"}))
    path = run / "config.json"
    good = path.read_text()
    d = json.loads(good)
    d["model"]["mlp_mult"] = 2.0  # the case: a different model, silently
    path.write_text(json.dumps(d))
    _one_line(capsys, ["train", "--resume", str(run)], "changed after it was written")
    rng = random.Random(5)
    for _ in range(20):  # random byte edits (the rope_base 10000 -> 10080)
        b = bytearray(good.encode())
        b[rng.randrange(len(b))] = rng.randrange(32, 127)
        if bytes(b) == good.encode():
            continue
        path.write_bytes(bytes(b))
        _one_line(capsys, ["train", "--resume", str(run)])
    d.pop(SEAL_KEY)
    path.write_text(json.dumps(d))
    _one_line(capsys, ["train", "--resume", str(run)], "has no seal")


def test_resume_refuses_symlinks_and_folders_among_the_run_files(clean_env, capsys):
    run = open_run_dir(_smoke(clean_env, **{"train.run_name": "r"}))
    target = clean_env / "elsewhere.txt"
    target.write_text("keep\n")
    (run / "log.jsonl").symlink_to(target)
    _one_line(capsys, ["train", "--resume", str(run)], "log.jsonl is a symbolic link")
    (run / "log.jsonl").unlink()
    (run / "train.log").mkdir()
    _one_line(capsys, ["train", "--resume", str(run)], "train.log is not a regular file")
    assert target.read_text() == "keep\n"


def test_resume_cleans_only_its_own_temporary_files(tmp_path):
    dead = _dead_pid()
    mine = [f"notes.tmp{dead}", f".notes.tmp{dead}", "x.tmp1"]
    ours = [f".model.ckpt.tmp{dead}", f".config.json.tmp{dead}"]
    for n in mine + ours:
        (tmp_path / n).write_text("x")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / f".step-000000004.ckpt.tmp{dead}").write_text("x")
    removed = K.clean_run_dir(tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours + [f".step-000000004.ckpt.tmp{dead}"])
    assert all((tmp_path / n).exists() for n in mine)
    assert remove_stale_temps(tmp_path / "missing") == []


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(clean_env, capsys):
    cfg = _smoke(clean_env, **{"train.run_name": "r"})
    run = open_run_dir(cfg)
    model = {k: v.detach() for k, v in build_model(cfg, "ref").state_dict().items()}
    for step in (2, 4, 6):
        K.save_train_state(run, step, {"config": cfg.to_dict(), "model": model, "step": step}, 3)
    newest = K.state_paths(run)
    for p in newest[1:]:
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 2] ^= 1
        p.write_bytes(bytes(raw))
    state, skipped = K.newest_intact_state(run)
    assert state["step"] == 2 and len(skipped) == 2 and "step-000000006" in skipped[0]
    # the command says so, one line per skipped state (the run's own "resumed from" line
    # names the one it takes; not a second line here)
    code = main(["train", "--resume", str(run), "--seed", "7"])  # then refused: seed differs
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 3, err
    assert "step-000000006.ckpt failed its integrity check" in err[0]
    assert "step-000000004.ckpt failed its integrity check" in err[1]
    assert "seed" in err[2] and not any("resum" in line for line in err[:2])
    newest[0].write_bytes(b"damaged")
    with pytest.raises(K.CheckpointError, match="no older training state of the run is intact"):
        K.newest_intact_state(run)


# ---------------------------------------------------------------------------------------------
# The rest of the tracebacks and small items


def test_eval_with_bogus_kernels_is_one_line(capsys, tmp_path):
    _one_line(capsys, ["eval", str(tmp_path / "m.ckpt"), "--kernels", "bogus"],
              "invalid choice: 'bogus'")


def test_the_lost_peer_is_named(tmp_path):
    """A SIGTERM under torchrun: the line names the peer whose process is gone (heartbeats in
    the group's store carry host and pid)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        P.heartbeat("step 3")
        store = P._store()
        store.set(f"{P._HEARTBEAT}1", f"0|{socket.gethostname()}|{_dead_pid()}|step 12")
        note = P._peers(0, 2)
        assert "rank 1 was last at step 12" in note and "has exited: the lost peer" in note
        assert "rank 0 of 1: torchrun stops the other ranks" in P.signal_note()
    finally:
        dist.destroy_process_group()
    assert P.signal_note() == ""


def test_artifact_provenance_ties_the_header_to_its_run(artifact, tmp_path):
    art = tmp_path / "model.int6"
    art.write_bytes(artifact.read_bytes())
    assert "no sealed summary.json of its run vouches for it" in artifact_provenance(art)
    digest, n = sha256_file(art, "artifact", 1 << 30)
    write_sealed_json(tmp_path / "summary.json", {"a": 1}, SUMMARY_SEAL,
                      {"artifact_sha256": digest, "artifact_bytes": n})
    assert "the file its run's sealed" in artifact_provenance(art)
    # a header edited with its crc32 fixed: the crc passes, the run's seal does not vouch
    art.write_bytes(_rewrite_header(art.read_bytes(),
                                    lambda h: h["meta"].update(float_bpb=0.5)))
    assert read_artifact(str(art))[1]["float_bpb"] == 0.5
    assert "not verified" in artifact_provenance(art)


def test_read_json_limits(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"a": [1, {"b": "[[[[[["}]}')
    assert read_json(p, "x") == {"a": [1, {"b": "[[[[[["}]}
    p.write_text("[" * 33 + "]" * 33)
    with pytest.raises(InputError, match="nests 33 levels deep, more than the 32"):
        read_json(p, "x")
    link = tmp_path / "l.json"
    link.symlink_to(p)
    with pytest.raises(InputError, match="symbolic link"):
        read_json(link, "x", follow=False)
