"""Helpers shared by every kernel module: input validation and autocast rules for custom ops.

Errors name the op, the argument, what it got and what it expected, e.g.
``leaky_relu2: x must be float16/bfloat16/float32, got torch.int64``. User input is
never checked with ``assert`` and never reaches Triton unvalidated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

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


def check_slope(op: str, slope: object) -> float:
    """A LeakyReLU slope: a finite real number (no default anywhere: 0.5 and 0.9 both occur)."""
    if isinstance(slope, bool) or not isinstance(slope, (int, float)):
        raise TypeError(f"{op}: slope must be a float, got {type(slope).__name__}")
    if not math.isfinite(slope):
        raise ValueError(f"{op}: slope must be finite, got {slope}")
    return float(slope)


def check_same_dtype(op: str, **tensors: torch.Tensor) -> torch.dtype:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: {name} is {t.dtype} but {first_name} is {first.dtype}; they must match"
            )
    return first.dtype


# ---------------------------------------------------------------------------------------------
# Autocast rules for custom ops
#
# A custom op has no autocast behaviour of its own: under torch.autocast the dispatcher passes
# it the caller's dtypes unchanged, and anything autocast-sensitive inside its implementation
# (a matmul) is autocast there, where the fake implementation cannot see it (eager and compiled
# outputs then disagree). Each op therefore gets an Autocast kernel that does what the PyTorch
# ops it replaces do under autocast, then runs the op with autocast off for that device: its real
# and fake implementations see no autocast at all and agree by construction.

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_LIB = torch.library.Library("proteus", "IMPL")  # module-level: registrations live as long as it

AutocastRule = Callable[[str, torch.dtype, list], list]


def autocast_cast(t: object, device_type: str, dtype: torch.dtype) -> object:
    """What autocast does to an input of a lower-precision op (matmul, linear, SDPA): a
    float16/bfloat16/float32 tensor on ``device_type`` becomes ``dtype``; anything else (float64,
    integers, another device, None) passes through."""
    if isinstance(t, torch.Tensor) and t.device.type == device_type and t.dtype in FLOAT_DTYPES:
        return t.to(dtype)
    return t


def cast_inputs(*names: str) -> Callable[[Sequence[str]], AutocastRule]:
    """The rule of a lower-precision op: the named arguments are cast to the autocast dtype."""

    def bind(arg_names: Sequence[str]) -> AutocastRule:
        unknown = set(names) - set(arg_names)
        if unknown:
            raise ValueError(f"cast_inputs: {sorted(unknown)} are not arguments of {arg_names}")
        idx = {arg_names.index(n) for n in names}

        def rule(device_type: str, dtype: torch.dtype, args: list) -> list:
            return [autocast_cast(a, device_type, dtype) if i in idx else a
                    for i, a in enumerate(args)]

        return rule

    return bind


def register_autocast(
    qualname: str,
    rules: dict[str, Callable[[Sequence[str]], AutocastRule]],
) -> None:
    """Give the custom op ``qualname`` ("proteus::name") an Autocast kernel per device type.

    ``rules[device_type](arg_names)`` returns ``rule(device_type, autocast_dtype, args) -> args``:
    the arguments the op is then called with (all of them, defaults filled in), with autocast
    disabled for that device. The autocast dtype is read when the op is called (``torch.autocast``
    picks it: float16 or bfloat16), so one registration serves both.
    """
    ns, name = qualname.split("::")
    op = getattr(getattr(torch.ops, ns), name).default
    params = op._schema.arguments
    arg_names = [p.name for p in params]
    for device_type, make_rule in rules.items():
        key = _AUTOCAST_KEYS[device_type]
        rule = make_rule(arg_names)
        off = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _dev=device_type, _rule=rule, _off=off, **kwargs):
            # the dispatcher hands over only the arguments the caller gave
            full = list(args) + [kwargs[p.name] if p.name in kwargs else p.default_value
                                 for p in params[len(args):]]
            full = _rule(_dev, torch.get_autocast_dtype(_dev), full)
            with torch._C._ExcludeDispatchKeyGuard(_off):
                return op(*full)

        _LIB.impl(name, kernel, key, with_keyset=True)
