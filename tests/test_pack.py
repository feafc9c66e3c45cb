"""The packed submission script: it contains what training and evaluation import, and it runs.

The end-to-end check trains and evaluates the smoke preset (2 steps) once with the installed
package and once with the packed script in a fresh process: the bpb must be identical (eager
fp32 on CPU is deterministic), which proves the minified modules are the same program.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from proteus.data import bundled_dir
from proteus.pack import minify, needed_modules, pack, packed_code_bytes, source_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_packed_modules_are_what_training_imports_and_nothing_else():
    mods = set(needed_modules())
    for m in ("proteus.run", "proteus.train", "proteus.eval", "proteus.eval.pipeline",
              "proteus.eval.counts", "proteus.eval.ttt", "proteus.commands",
              "proteus.kernels.xsa_attention", "proteus.kernels.leaky_relu2",
              "proteus.kernels.int6_matmul", "proteus.kernels.ngram_table", "proteus.cli"):
        assert m in mods, m
    for m in ("proteus.bench", "proteus.kernels._aot", "proteus.kernels._testing"):
        assert m not in mods, m


def test_minify_keeps_the_program_and_drops_docstrings():
    src = '"""Module doc."""\n\ndef f(x: int) -> int:\n    """Doc."""\n    # a comment\n' \
          '    return x + 1\n\n\nclass C:\n    """Doc."""\n'
    out = minify(src)
    assert "Doc" not in out and "comment" not in out
    ns: dict = {}
    exec(compile(out, "m", "exec", dont_inherit=True), ns)  # our own minified source
    assert ns["f"](2) == 3 and ns["f"].__annotations__ == {"x": int, "return": int}
    assert ns["C"].__doc__ is None


def test_packed_script_is_small_ascii_and_counted():
    text = pack()
    assert text.isascii()
    assert len(text.encode()) == packed_code_bytes()
    assert packed_code_bytes() < source_bytes() / 3


def _train(cmd: list[str], out_dir: str) -> str:
    data = bundled_dir()
    args = ["train", "--preset", "smoke", "--iterations", "2", "--warmup-steps", "0",
            "--val-tokens", "2048", "--run-name", "s", "--out-dir", out_dir,
            "--tokenizer", str(data / "fineweb_1024_bpe.model"),
            "--train-files", str(data / "fineweb_train_*.bin"),
            "--val-files", str(data / "fineweb_val_*.bin")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTEUS_")}
    r = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=600,
                       cwd=out_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_packed_script_trains_and_scores_like_the_package(tmp_path):
    script = tmp_path / "packed.py"
    script.write_text(pack())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ours = _train([sys.executable, "-m", "proteus"], str(tmp_path / "a"))
    packed = _train([sys.executable, str(script)], str(tmp_path / "b"))
    bpb = [re.search(r"val bpb (\d+\.\d+) \(loss", o).group(1) for o in (ours, packed)]
    assert bpb[0] == bpb[1]
    assert "int6 round trip" in packed and "of 16,000,000 bytes: OK" in packed
