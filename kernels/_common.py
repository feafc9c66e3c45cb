"""Input validation shared by every kernel's public function.

Errors name the op, the argument, what it got and what it expected, e.g.
``leaky_relu2: x must be float16/bfloat16/float32, got torch.int64``. User input is
never checked with ``assert`` and never reaches Triton unvalidated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from ._backend import kernel_device

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int32: "int32",
    torch.int64: "int64",
}


def dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(_DTYPE_NAMES.get(d, str(d)) for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | Iterable[int] | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Validate one tensor argument; return it unchanged."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{op}: {name} must be {dtype_names(dtypes)}, got {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(
                f"{op}: {name} must have {want} dimensions, got shape {tuple(t.shape)}"
            )
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; call .contiguous() first")
    return t


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and that device usable by the kernels in this process."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(
                f"{op}: {name} is on {dev} but {first_name} is on {first}; "
                "move all inputs to one device"
            )
    want = kernel_device()
    if first.type != want:
        hint = (
            "no CUDA GPU here, so kernels run on Triton's interpreter with CPU tensors"
            if want == "cpu"
            else "kernels are compiled for CUDA in this process; move inputs to a CUDA device"
        )
        raise ValueError(f"{op}: inputs are on {first.type}, expected {want} ({hint})")
    return first


def check_same_dtype(op: str, **tensors: torch.Tensor) -> torch.dtype:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: {name} is {t.dtype} but {first_name} is {first.dtype}; they must match"
            )
    return first.dtype


@dataclasses.dataclass
class AotSpec:
    """One production launch of one kernel, as the report compiles it."""

    kernel: str  # report row, e.g. "leaky_relu2.mlp_up_fwd"
    shape: str  # the production shape in words, e.g. "M=16384 K=512 N=1536 bf16"
    fn: Any  # the @triton.jit kernel (or its @autotune/@heuristics wrapper)
    args: tuple  # positional launch arguments, CPU tensors standing in for device ones
    kwargs: dict  # constexpr keyword arguments (BLOCK sizes ...)
    num_warps: int = 4
    num_stages: int = 3
    matrix: bool = False  # the hot path is a matrix product: wgmma is expected on sm_90
