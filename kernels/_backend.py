"""Where Triton kernels run (compiled for a CUDA GPU, or Triton's interpreter on CPU), and
exactly what importing ``proteus.kernels`` changes in the process.

The choice is made once, when ``proteus.kernels`` is first imported, before any kernel module is
decorated (Triton decides compiled-vs-interpreted when each ``@triton.jit`` decorator runs):

* ``TRITON_INTERPRET=1`` (or true/yes/on) forces the interpreter; any other value forces
  compilation (the sm_90 ahead-of-time report runs with ``TRITON_INTERPRET=0`` in its own
  subprocess: it needs real ``JITFunction`` objects).
* Unset: the interpreter when no CUDA device is visible, compiled kernels otherwise. If Triton
  was already switched to its interpreter (``triton.knobs.runtime.interpret``), we follow it.

Process-wide changes (``tests/test_backend.py`` checks that these, and only these, happen):

* Compiled mode: **none**. ``triton`` is imported; no variable, knob or class is touched.
* Interpreter mode:

  1. ``triton.knobs.runtime.interpret = True``: Triton's own switch, which Triton mirrors into
     ``os.environ["TRITON_INTERPRET"] = "1"`` (so torch's Triton integration and child
     processes see the same mode; a child that needs compiled kernels sets it to 0, as the
     sm_90 report does). Every ``@triton.jit`` decorated afterwards (ours and anyone's) is
     interpreted. It cannot be scoped to our kernels: Triton reads it when a kernel is
     decorated and again while one runs.
  2. ``JITFunction.__call__``: when an interpreted kernel calls a ``@triton.jit`` helper that was
     decorated in compiled mode — ``tl.zeros`` and the other ``triton.language`` helpers, as soon
     as ``triton`` was imported before the switch (``torch.compile`` imports it) — Triton
     raises "Cannot call @triton.jit'd outside of the scope of a kernel"; the patched call
     interprets the helper instead. Only that error case changes.
  3. Triton's interpreter computes bf16 arithmetic, dots, reductions and casts in fp32 with
     round-to-nearest-even (``InterpreterBuilder.create_dot/binary_op/unary_op/cast_impl``,
     ``ReduceScanOpInterface.apply``); unpatched it does integer math on the raw bf16 bits and
     truncates fp32→bf16 casts. Interpreted kernels only: a GPU never runs this code.

  Not changed: any other environment variable, Triton's autotuner and the interpreter's
  options.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter as ti
from triton.runtime.jit import JITFunction

_STATE: dict[str, bool] = {}


def configure() -> bool:
    """Choose the execution mode once; return True when kernels run on the interpreter."""
    if "interpret" in _STATE:
        return _STATE["interpret"]
    env = os.environ.get("TRITON_INTERPRET")
    if env is None:
        interpret = not torch.cuda.is_available()
    else:
        interpret = env.strip().lower() in ("1", "true", "yes", "on")
    if triton.knobs.runtime.interpret:  # already interpreting: our decorators will follow it
        interpret = True
    if interpret:
        triton.knobs.runtime.interpret = True
        _interpret_compiled_helpers()
        _patch_interpreter_bf16()
    _STATE["interpret"] = interpret
    return interpret


def interpreting() -> bool:
    """True when Triton kernels execute on the CPU interpreter."""
    return configure()


def kernel_device() -> str:
    """The torch device kernels run on in this process: 'cuda' or 'cpu' (interpreter)."""
    return "cpu" if configure() else "cuda"


def _interpret_compiled_helpers() -> None:
    if getattr(JITFunction, "_proteus_interprets_calls", False):
        return
    interpreted: dict = {}

    def call(self, *args, **kwargs):
        fn = interpreted.get(self.fn)
        if fn is None:
            fn = interpreted[self.fn] = ti.InterpretedFunction(self.fn)
        return fn(*args, **kwargs)

    JITFunction.__call__ = call
    JITFunction._proteus_interprets_calls = True


def _patch_interpreter_bf16() -> None:
    if getattr(ti, "_proteus_patched", False):
        return
    ti._proteus_patched = True

    def as_f32(h):  # bf16 handle (raw uint16 bits) -> float32 values
        if h.dtype.scalar == tl.bfloat16:
            return (h.data.astype(np.uint32) << 16).view(np.float32)
        return h.data

    def to_bf16(x):  # float32 values -> bf16 bits, round to nearest even (as torch and cvt.rn)
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
        return np.where(np.isnan(x), np.uint16(0x7FC0), rounded.astype(np.uint16))

    builder, reducer, handle = ti.InterpreterBuilder, ti.ReduceScanOpInterface, ti.TensorHandle
    dot0, binop0, unop0 = builder.create_dot, builder.binary_op, builder.unary_op
    cast0, apply0 = builder.cast_impl, reducer.apply

    def create_dot(self, a, b, d, *rest):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            a, b = handle(as_f32(a), tl.float32), handle(as_f32(b), tl.float32)
        return dot0(self, a, b, d, *rest)

    def binary_op(self, lhs, rhs, op):
        if lhs.dtype.scalar == tl.bfloat16 and rhs.dtype.scalar == tl.bfloat16:
            out = op(as_f32(lhs), as_f32(rhs))
            if out.dtype == np.bool_:
                return handle(out, lhs.dtype.scalar)
            return handle(to_bf16(out), tl.bfloat16)
        return binop0(self, lhs, rhs, op)

    def unary_op(self, a, op):
        if a.dtype.scalar == tl.bfloat16:
            return handle(to_bf16(op(as_f32(a))), tl.bfloat16)
        return unop0(self, a, op)

    def cast_impl(self, src, dst):
        if dst.scalar == tl.bfloat16 and src.dtype.scalar != tl.bfloat16:
            return handle(to_bf16(src.data.astype(np.float32)), tl.bfloat16)
        return cast0(self, src, dst)

    def convert(t, frm, to, f):
        if isinstance(t, tl.tensor) and t.dtype == frm:
            return tl.tensor(handle(f(t.handle), to), t.type.with_element_ty(to))
        return t

    def apply(self, inputs):
        if not isinstance(inputs, tuple):
            return apply(self, (inputs,))[0]
        was_bf16 = [isinstance(t, tl.tensor) and t.dtype == tl.bfloat16 for t in inputs]
        if not any(was_bf16):
            return apply0(self, inputs)
        out = apply0(self, tuple(convert(t, tl.bfloat16, tl.float32, as_f32) for t in inputs))
        return tuple(
            convert(o, tl.float32, tl.bfloat16, lambda h: to_bf16(h.data))
            if i < len(was_bf16) and was_bf16[i]
            else o
            for i, o in enumerate(out)
        )

    builder.create_dot, builder.binary_op, builder.unary_op = create_dot, binary_op, unary_op
    builder.cast_impl, reducer.apply = cast_impl, apply


# The documented import-time side effect of the kernel modules (see the module docstring).
configure()
