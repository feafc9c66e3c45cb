"""`proteus data synth-val`: a validation stand-in spliced from the bundled documents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from proteus import data as D
from proteus import synth
from proteus.cli import main


def _docs(tok: np.ndarray) -> list[np.ndarray]:
    starts = list(np.flatnonzero(tok == D.BOS_ID)) + [tok.size]
    return [tok[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


def test_synth_val_writes_documents_of_real_lengths(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synth, "SHARD_TOKENS", 20_000)  # several shards, documents across them
    assert main(["data", "synth-val", "--docs", "40", "--out", str(tmp_path / "v")]) == 0
    assert "40 documents" in capsys.readouterr().out
    rec = json.loads((tmp_path / "v" / "synth_val.json").read_text())
    files = sorted((tmp_path / "v").glob("fineweb_val_*.bin"))
    assert [f.name for f in files] == rec["shards"] and len(files) >= 2
    tok = D.load_tokens(str(tmp_path / "v" / "fineweb_val_*.bin"), "val").numpy()
    assert tok.size == rec["tokens"] and tok[0] == D.BOS_ID
    docs = _docs(tok)
    assert len(docs) == rec["docs"] == 40
    src = synth.bundled_documents()
    lengths = {d.size for d in synth.bundled_documents("val")}
    assert all(d.size in lengths for d in docs)  # the real length distribution
    # spliced, not copied: no document's first 300 tokens are one slice of a source document
    flat = np.concatenate(src)
    for d in docs:
        if d.size < 300:
            continue
        head = d[1:301]
        at = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(flat, 16).__eq__(
            head[:16]).all(1))
        assert not any(np.array_equal(flat[i : i + 300], head) for i in at)


def test_synth_val_is_deterministic_and_seeded():
    a = [d.tolist() for d in synth.synth_documents(5, seed=3)]
    b = [d.tolist() for d in synth.synth_documents(5, seed=3)]
    c = [d.tolist() for d in synth.synth_documents(5, seed=4)]
    assert a == b and a != c


@pytest.mark.parametrize("args, msg", [(["--docs", "0"], "--docs must be in"),
                                       (["--docs", "-5"], "--docs must be in")])
def test_synth_val_bad_input_one_line_exit_2(tmp_path, capsys, args, msg):
    out = tmp_path / "v"
    assert main(["data", "synth-val", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # nothing left behind


def test_synth_val_refuses_a_directory_with_shards(tmp_path, capsys):
    D.write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 5, 6], np.uint16))
    assert main(["data", "synth-val", "--docs", "2", "--out", str(tmp_path)]) == 2
    assert "already holds validation shards" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fineweb_val_000000.bin"]


def test_data_without_an_action_exit_2(capsys):
    assert main(["data"]) == 2
    assert "name an action" in capsys.readouterr().err
