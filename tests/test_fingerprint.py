"""Refusal by content: a token stream that overlaps the validation tokens or a checkpoint's
training tokens is refused whatever its header, slicing, concatenation or order, and unrelated
real shards are not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from proteus import data as D
from proteus.checkpoint import save_checkpoint
from proteus.config import build_config
from proteus.fingerprint import (
    REFUSE_FRACTION,
    files_fingerprint,
    fingerprint,
    overlap,
    reference_fingerprints,
    refuse_overlaps,
)
from proteus.model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "proteus", "data")
TRAIN = os.path.join(DATA, "fineweb_train_00000{}.bin")
VAL = os.path.join(DATA, "fineweb_val_000000.bin")
TRAINED = os.path.join(DATA, "fineweb_train_00000[01].bin")  # the checkpoint's train_files


@pytest.fixture(scope="module")
def refs():
    return reference_fingerprints(TRAINED, VAL)


def _shard(tmp_path, name, tokens):
    path = str(tmp_path / name)
    D.write_shard(path, np.asarray(tokens, np.uint16))
    return path


def _refused(path, refs, label):
    with pytest.raises(D.DataError) as e:
        refuse_overlaps([path], refs, "fitting uses held-out training tokens only")
    msg = str(e.value)
    assert path in msg and label in msg and "sampled 16-token windows" in msg, msg
    return msg


def test_a_changed_header_integer_is_still_the_validation_shard(tmp_path, refs):
    raw = bytearray(open(VAL, "rb").read())
    raw[4 * 7] ^= 0x5A  # header integer 7: unused, so the whole-file hash changes only
    path = str(tmp_path / "val_edited.bin")
    open(path, "wb").write(bytes(raw))
    assert D.read_shard_header(path) == D.read_shard_header(VAL)
    msg = _refused(path, refs, "the validation tokens")
    assert "(100.0%)" in msg


def test_slices_concatenations_and_reorderings_are_refused(tmp_path, refs):
    val, t1 = D.load_shard(VAL), D.load_shard(TRAIN.format(1))
    t0, t2 = D.load_shard(TRAIN.format(0)), D.load_shard(TRAIN.format(2))
    half = _shard(tmp_path, "half.bin", val[: val.size // 2])
    _refused(half, refs, "the validation tokens")
    mixed = _shard(tmp_path, "mixed.bin", np.concatenate([val, t2]))
    msg = _refused(mixed, refs, "the validation tokens")
    assert "(71." in msg or "(72." in msg, msg  # 1.04M of 1.45M tokens are validation
    both = _shard(tmp_path, "both.bin", np.concatenate([t0, t1]))
    _refused(both, refs, "the checkpoint's training tokens")
    # documents reordered: the K-grams inside each document are kept
    starts = np.flatnonzero(t1 == D.BOS_ID)
    docs = np.split(t1, starts[1:])
    shuffled = _shard(tmp_path, "shuffled.bin", np.concatenate(docs[::-1]))
    _refused(shuffled, refs, "the checkpoint's training tokens")


def test_unrelated_real_shards_pass_and_their_overlaps_are_recorded(refs):
    held_out = TRAIN.format(2)
    got = refuse_overlaps([held_out], refs, "x")
    row = got[held_out]
    assert set(row) == {"the validation tokens", "the checkpoint's training tokens"}
    assert all(0 <= v < REFUSE_FRACTION for v in row.values()), row
    # the largest natural overlap among the bundled shards (docstring: 0.70%) stays below it
    ov = overlap(D.load_shard(TRAIN.format(1)), files_fingerprint([VAL]))
    assert 0.003 < ov.fraction < REFUSE_FRACTION / 2, ov


def test_fingerprint_is_a_pure_function_of_content():
    a = fingerprint(np.arange(5000) % 997)
    b = fingerprint(np.arange(5000) % 997)
    assert a.digest() == b.digest() and a.summary()["sampled"] == a.hashes.size > 0
    c = fingerprint(np.arange(5000) % 991)
    assert c.digest() != a.digest()
    assert overlap(np.arange(100) % 997, a).hits == overlap(np.arange(100) % 997, a).sampled
    with pytest.raises(ValueError, match="different methods"):
        _ = a | fingerprint(np.arange(50), k=8)
    assert fingerprint(np.arange(3)).hashes.size == 0 and overlap(np.arange(3), a).sampled == 0


def _tune_cache(tmp_path):
    cfg = build_config("smoke", {"train.train_files": TRAINED}, environ={})
    torch.manual_seed(0)
    ckpt = str(tmp_path / "model.ckpt")
    save_checkpoint(ckpt, build_model(cfg, "ref"), cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "proteus", "tune-cache", ckpt, *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, cwd=ROOT,
                                    timeout=600)
    return ckpt, run


def test_tune_cache_refuses_by_content_in_one_line(tmp_path):
    ckpt, run = _tune_cache(tmp_path)
    val = D.load_shard(VAL)
    bad = _shard(tmp_path, "looks_like_train.bin",
                 np.concatenate([D.load_shard(TRAIN.format(2)), val[:200_000]]))
    r = run("--tune-files", bad)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert bad in r.stderr and "overlaps the validation tokens" in r.stderr


@pytest.mark.slow
def test_tune_cache_records_fingerprints(tmp_path):
    ckpt, run = _tune_cache(tmp_path)
    out = tmp_path / "p.json"
    r = run("--tune-files", TRAIN.format(2), "--tune-tokens", "2000", "--iterations", "3",
            "--out", str(out), "--stride", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    fitted = json.loads(out.read_text())["fitted_on"]
    assert fitted["fingerprint"]["tokens"] == 2001 and fitted["fingerprint"]["k"] == 16
    rc = fitted["refused_by_content"]
    assert rc["the validation tokens"]["sha256"] == files_fingerprint([VAL]).digest()
    assert rc["overlaps"]["fineweb_train_000002.bin"]["the validation tokens"] < REFUSE_FRACTION
