"""Where Triton kernels run: compiled for a CUDA GPU, or Triton's interpreter on CPU.

Rules (applied once, when ``proteus.kernels`` is first imported, before any kernel module:
Triton decides compiled-vs-interpreted when each ``@triton.jit`` decorator runs, and its own
``@jit`` helpers when ``triton.language`` is first imported):

* ``TRITON_INTERPRET=1`` forces the interpreter; ``TRITON_INTERPRET=0`` forces compilation
  (used by the sm_90 ahead-of-time report, which needs real ``JITFunction`` objects).
* Unset: the interpreter when no CUDA device is visible, compiled kernels otherwise.

In interpreter mode three known interpreter gaps are mended (see the project's
TRITON_ON_CPU notes): bf16 arithmetic/dots/reductions/casts are done in fp32 with
round-to-nearest-even (the interpreter otherwise does integer math on the raw bits),
``@triton.autotune`` gets a CPU timer instead of the GPU one, and ``tl.device_assert``
is made to fire. Nothing here changes what a GPU runs.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

# ``triton`` itself is imported inside the functions below, never at the top: the environment
# variable it reads must be set first.

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
    if "triton" not in sys.modules:
        # Triton's own @jit helpers (tl.cdiv, ...) pick their mode when triton.language is
        # imported, so the variable must be set before the first `import triton`.
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    import triton

    triton.knobs.runtime.interpret = interpret
    if interpret:
        _patch_interpreter()
    _STATE["interpret"] = interpret
    return interpret


def interpreting() -> bool:
    """True when Triton kernels execute on the CPU interpreter."""
    return configure()


def kernel_device() -> str:
    """The torch device kernels run on in this process: 'cuda' or 'cpu' (interpreter)."""
    return "cpu" if configure() else "cuda"


def _cpu_bench(fn, quantiles=None, **_kw):
    """Autotuner timing on CPU: the default bench needs a GPU driver ("0 active drivers")."""
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


def _patch_interpreter() -> None:
    import triton.language as tl
    from triton.runtime import interpreter as ti
    from triton.runtime.autotuner import Autotuner

    if getattr(ti, "_proteus_patched", False):
        return
    ti._proteus_patched = True
    Autotuner.do_bench = property(lambda self: _cpu_bench)
    ti.interpreter_builder.options = ti.InterpreterOptions(debug=True)

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


# The documented import-time side effect of the kernel modules (see proteus.kernels).
configure()
