"""What importing proteus.kernels changes in the process is exactly what kernels/_backend.py and
docs/ops.md ("What importing the ops changes in your process") document, and the ops work
whatever the import order.

Each case runs in a fresh interpreter: it snapshots Triton's switch, the patched classes and the
environment, imports ``proteus.kernels``, and reports what changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys
import torch
if sys.argv[1] == "fake-gpu":  # a CUDA machine, as far as the mode choice can tell
    torch.cuda.is_available = lambda: True
import triton
from triton.runtime import interpreter as ti
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

PATCHABLE = {
    "JITFunction.__call__": (JITFunction, "__call__"),
    "InterpreterBuilder.create_dot": (ti.InterpreterBuilder, "create_dot"),
    "InterpreterBuilder.binary_op": (ti.InterpreterBuilder, "binary_op"),
    "InterpreterBuilder.unary_op": (ti.InterpreterBuilder, "unary_op"),
    "InterpreterBuilder.cast_impl": (ti.InterpreterBuilder, "cast_impl"),
    "ReduceScanOpInterface.apply": (ti.ReduceScanOpInterface, "apply"),
    "Autotuner.do_bench": (Autotuner, "do_bench"),
}

def snap():
    out = {k: id(cls.__dict__.get(name)) for k, (cls, name) in PATCHABLE.items()}
    out["knobs.runtime.interpret"] = bool(triton.knobs.runtime.interpret)
    out["interpreter_builder.options"] = repr(ti.interpreter_builder.options)
    return out

env0, before = dict(os.environ), snap()
import proteus.kernels as pk
after = snap()
env = {k: os.environ.get(k) for k in set(env0) | set(os.environ)
       if env0.get(k) != os.environ.get(k)}
result = dict(changed=sorted(k for k in before if before[k] != after[k]), env=env,
              interpret=pk._backend.interpreting())
if result["interpret"]:  # triton was imported first: the ops must still run, in bf16 too
    x, w_up, w_down = (torch.randn(shape).bfloat16() for shape in ((5, 16), (32, 16), (16, 32)))
    y = pk.leaky_relu2_mlp(x, w_up, w_down, 0.5).float()
    ref = pk.leaky_relu2_mlp_ref(x, w_up, w_down, 0.5).float()
    result["mlp_rel_err"] = ((y - ref).abs().max() / ref.abs().max()).item()
print(json.dumps(result))
"""

INTERPRETER_MODE_CHANGES = [
    "InterpreterBuilder.binary_op",
    "InterpreterBuilder.cast_impl",
    "InterpreterBuilder.create_dot",
    "InterpreterBuilder.unary_op",
    "JITFunction.__call__",
    "ReduceScanOpInterface.apply",
    "knobs.runtime.interpret",
]


def _run(case: str, **env_changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes)
    r = subprocess.run([sys.executable, "-c", SCRIPT, case], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.interpret
def test_interpreter_mode_changes_exactly_what_is_documented():
    # no GPU visible, TRITON_INTERPRET unset: the interpreter, whose three documented changes
    # are the only ones; and triton imported before us (as torch.compile does) still works
    out = _run("no-gpu", CUDA_VISIBLE_DEVICES="")
    assert out["interpret"] is True
    assert out["changed"] == INTERPRETER_MODE_CHANGES
    assert out["env"] == {"TRITON_INTERPRET": "1"}  # Triton's own mirror of its switch
    assert out["mlp_rel_err"] <= 0.02  # bf16 rounding; integer math on bf16 bits is off by >1


def test_compiled_mode_changes_nothing():
    for case, env in (("fake-gpu", {}), ("no-gpu", {"TRITON_INTERPRET": "0"})):
        out = _run(case, **env)
        assert out["interpret"] is False, case
        assert out["changed"] == [] and out["env"] == {}, (case, out)
