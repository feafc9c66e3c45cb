"""Integrity of every file a run writes: sealed checkpoints and artifacts under seeded damage
(bit flips, truncations, byte edits) and crafted headers, finite weights, atomic writes, stale
temporary files."""

from __future__ import annotations

import dataclasses
import errno
import json
import lzma
import os
import random
import struct
import subprocess
import zlib

import pytest
import torch

from proteus import artifact as A
from proteus import checkpoint as K
from proteus.errors import ProteusError, RunFailed
from proteus.files import OutputError, atomic_write, remove_stale_temps, temp_path
from proteus.model import build_model
from proteus.options import build_config
from proteus.quant import quantize_state_dict
from proteus.run import write_run_artifact

N_MUTATIONS = 300  # each kind of file; the probe used 1,000 on model.ckpt


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A smoke-preset model (random init) saved as model.ckpt and as an int6 artifact."""
    d = tmp_path_factory.mktemp("ckpt")
    cfg = build_config("smoke", environ={})
    torch.manual_seed(0)
    model = build_model(cfg)
    K.save_checkpoint(d / "model.ckpt", model, cfg)
    write_run_artifact(model, cfg, d)
    return d, cfg, model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mutate(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One seeded damage: a bit flip, a truncation or a byte edit (never a no-op)."""
    kind = rng.choice(["flip", "truncate", "edit"])
    b = bytearray(raw)
    if kind == "flip":
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del b[rng.randrange(len(b)):]
    else:
        i = rng.randrange(len(b))
        b[i] = (b[i] + rng.randrange(1, 256)) % 256
    return kind, bytes(b)


def test_seal_keeps_the_file_a_torch_checkpoint(smoke):
    d, _, model = smoke
    blob = torch.load(d / "model.ckpt", weights_only=True)  # plain torch still reads it
    assert _same(blob["model"], _state(model))
    raw = (d / "model.ckpt").read_bytes()
    assert raw[-79:-64] == b"proteus-sha256:"


def test_fuzzed_checkpoints_are_all_refused(smoke, tmp_path):
    """Seeded damage to model.ckpt: not one loads (with changed weights or at all)."""
    d, _, model = smoke
    raw, ref = (d / "model.ckpt").read_bytes(), _state(model)
    rng = random.Random(14)
    path = tmp_path / "model.ckpt"
    changed = refused = 0
    for _ in range(N_MUTATIONS):
        _kind, bad = _mutate(raw, rng)
        path.write_bytes(bad)
        try:
            _, state, _ = K.load_checkpoint(str(path))
        except ProteusError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            refused += 1
            continue
        changed += not _same(state, ref)
    assert (refused, changed) == (N_MUTATIONS, 0)


def test_fuzzed_artifacts_are_refused_or_identical(smoke, tmp_path):
    d, _, _ = smoke
    raw = (d / "model.int6").read_bytes()
    path = tmp_path / "model.int6"
    path.write_bytes(raw)
    ref = _state(K.load_model(str(path), None)[0])
    rng = random.Random(6)
    changed = 0
    for _ in range(N_MUTATIONS):
        _kind, bad = _mutate(raw, rng)
        path.write_bytes(bad)
        try:
            model = K.load_model(str(path), None)[0]
        except ProteusError as e:
            assert "\n" not in str(e)
            continue
        changed += not _same(_state(model), ref)
    assert changed == 0


def _rewrite(raw: bytes, edit) -> bytes:
    """The artifact with its JSON header changed by ``edit`` and every checksum redone: what
    a crafted (not damaged) file looks like."""
    hlen = struct.unpack_from("<I", raw, 12)[0]
    hdr = json.loads(lzma.decompress(raw[16 : 16 + hlen]))
    edit(hdr)
    header = lzma.compress(json.dumps(hdr).encode())
    prefix = raw[:8] + struct.pack("<II", A.ARTIFACT_VERSION, len(header)) + header
    return prefix + struct.pack("<I", zlib.crc32(prefix)) + raw[16 + hlen + 4 :]


def _crafted_edits():
    bad_values = [-1, 0, 2**40, "x", None, 1.5]
    keys = {"int6": ("shape", "rows", "cols", "sym", "side", "ml", "kind"),
            "int8": ("shape", "rows", "cols", "sym", "side", "ml", "kind"),
            "fp32": ("shape", "side", "dtype", "kind"), "fp16": ("shape", "side", "dtype")}
    edits = []
    for which, names in keys.items():
        for key in names:
            for v in bad_values:
                def edit(h, which=which, key=key, v=v):
                    e = next(t for t in h["tensors"] if t.get("kind") == which)
                    e[key] = v
                edits.append((f"{which}.{key}={v!r}", edit))
    for key in ("n", "lanes", "side"):
        for v in bad_values:
            def edit(h, key=key, v=v):
                h["tensors"][-1]["streams"]["int6"][key] = v
            edits.append((f"stream.{key}={v!r}", edit))
    for key in ("offset", "nbytes", "name"):
        for v in bad_values:
            def edit(h, key=key, v=v):
                h["sections"][0][key] = v
            edits.append((f"section.{key}={v!r}", edit))
    for key, v in [("run_config", "x"), ("run_config", None), ("float_bpb", "x"),
                   ("run_config.model.model_dim", 10**6), ("run_config.model.num_heads", 0),
                   ("run_config.model.vocab_size", 65536), ("run_config.train.seq_len", -5)]:
        def edit(h, key=key, v=v):
            obj, *path, last = ["meta", *key.split(".")]
            node = h[obj]
            for p in path:
                node = node[p]
            node[last] = v
        edits.append((f"meta.{key}={v!r}", edit))
    edits += [("tensors=[]", lambda h: h.update(tensors=[])),
              ("duplicate tensor", lambda h: h["tensors"].insert(0, h["tensors"][0])),
              ("no streams", lambda h: h.update(tensors=h["tensors"][:-1])),
              ("sections=[]", lambda h: h.update(sections=[])),
              ("header is a list", lambda h: (h.clear(), h.update({"meta": []})))]
    return edits


CRAFTED = _crafted_edits()


def test_crafted_artifact_headers_give_one_line_never_a_crash(smoke, tmp_path):
    """Checksums valid, content made up: every one is refused with one line (no traceback, no
    terabyte allocation, no NaN model) or loads the same weights (an edit that changes
    nothing the reader uses, like the float_bpb note)."""
    d, _, _ = smoke
    raw = (d / "model.int6").read_bytes()
    path = tmp_path / "model.int6"
    path.write_bytes(raw)
    ref = _state(K.load_model(str(path), None)[0])
    loaded = []
    for label, edit in CRAFTED:
        path.write_bytes(_rewrite(raw, edit))
        try:
            model = K.load_model(str(path), None)[0]
        except ProteusError as e:
            assert "\n" not in str(e), label
            continue
        except Exception as e:  # noqa: BLE001 - the test names the case that escaped
            pytest.fail(f"{label}: {type(e).__name__}: {e}")
        assert _same(_state(model), ref), label
        loaded.append(label)
    assert len(loaded) < len(CRAFTED) // 10, loaded  # the rest are caught by the table checks


def test_inf_weight_in_an_artifact_is_refused(smoke, tmp_path):
    _, cfg, model = smoke
    qs = quantize_state_dict(_state(model))
    name, t = next((n, t) for n, t in qs.tensors.items() if t.kind == "fp32")
    t.data[0] = float("inf")
    A.write_artifact(str(tmp_path / "m.int6"), qs, {"run_config": cfg.to_dict()})
    with pytest.raises(ProteusError, match=rf"{name} \(inf\) is not finite"):
        K.load_model(str(tmp_path / "m.int6"), None)


def test_checkpoint_refusals_name_the_file(smoke, tmp_path):
    d, cfg, model = smoke
    state = {k: v.clone() for k, v in model.state_dict().items()}
    p = tmp_path / "x.ckpt"
    # a directory, an unsealed torch file, a malformed config, a non-finite weight
    with pytest.raises(ProteusError, match="is not a file"):
        K.load_model(str(tmp_path), None)
    torch.save({"format": K.CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": state}, p)
    with pytest.raises(ProteusError, match=f"{p} has no integrity seal"):
        K.load_model(str(p), None)
    for config in ({"model": {"num_heads": "eight"}}, {"model": {"num_heads": 0}}, "x",
                   {"model": {"bogus": 1}}):
        K.write_sealed(p, {"format": K.CHECKPOINT_FORMAT, "config": config, "model": state})
        with pytest.raises(ProteusError, match=f"checkpoint {p}"):
            K.load_model(str(p), None)
    nan = dict(state)
    nan["tok_emb.weight"] = state["tok_emb.weight"].clone()
    nan["tok_emb.weight"][3, 1] = float("nan")
    K.write_sealed(p, {"format": K.CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": nan})
    with pytest.raises(ProteusError, match=r"tok_emb.weight \(nan\) is not finite"):
        K.load_model(str(p), None)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, model_dim=32,
                                                               bigram_dim=16))
    K.write_sealed(p, {"format": K.CHECKPOINT_FORMAT, "config": other.to_dict(),
                       "model": state})
    with pytest.raises(ProteusError, match="does not match its config"):
        K.load_model(str(p), None)


def test_nothing_non_finite_is_written(smoke, tmp_path):
    _, cfg, model = smoke
    bad = build_model(cfg)
    bad.load_state_dict(_state(model))
    with torch.no_grad():
        bad.tok_emb.weight[0, 0] = float("inf")
    with pytest.raises(RunFailed, match=r"tok_emb.weight \(inf\) is not finite"):
        K.save_checkpoint(tmp_path / "model.ckpt", bad, cfg)
    assert not os.listdir(tmp_path)


def test_atomic_write_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=r"cannot write .*f\.bin: No space left on device"):
        atomic_write(path, [b"new", b"er"])
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(
        OSError(errno.EROFS, os.strerror(errno.EROFS))))
    with pytest.raises(OutputError, match="Read-only file system"):
        atomic_write(path, b"new")
    assert os.listdir(tmp_path) == ["f.bin"]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temporary_files_are_removed_and_ignored(smoke, tmp_path):
    _, cfg, model = smoke
    live = temp_path(tmp_path / "a.ckpt")  # this process's: a write in progress, kept
    live.write_bytes(b"x")
    gone = _dead_pid()
    dead = tmp_path / f".model.ckpt.tmp{gone}"  # its process is gone: a killed write
    dead.write_bytes(b"half")
    (tmp_path / f"model.int6.tmp{gone}").write_bytes(b"")  # the old artifact writer's naming
    keep = tmp_path / "notes.tmp"
    keep.write_text("not ours")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [f".model.ckpt.tmp{gone}", f"model.int6.tmp{gone}"]
    assert live.exists() and keep.exists()
    # a run's state listing skips temporaries of killed writes
    states = K.state_dir(tmp_path)
    states.mkdir()
    (states / f".step-000000003.ckpt.tmp{gone}").write_bytes(b"half")
    K.save_train_state(tmp_path, 2, dict(model=_state(model), config=cfg.to_dict()), keep=2)
    assert [p.name for p in K.state_paths(tmp_path)] == ["step-000000002.ckpt"]
