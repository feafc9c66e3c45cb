"""The error rule of the kernel tests: the flash-attention rule against a float64 reference."""

from __future__ import annotations

import torch


def max_abs_err(x: torch.Tensor, ref64: torch.Tensor) -> float:
    return (x.double() - ref64).abs().max().item() if x.numel() else 0.0


def assert_within_2x_torch_error(
    name: str, ours: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor,
    floor: float = 0.0,
) -> None:
    """The flash-attention rule: err(ours vs fp64) <= 2 * err(torch in same dtype vs fp64) + floor.

    ``floor`` absorbs the case where torch happens to be (near-)exact, e.g. fp32 on small sums;
    callers state it in the kernel docstring.
    """
    e_ours = max_abs_err(ours, ref64)
    e_ref = max_abs_err(torch_same_dtype, ref64)
    assert e_ours <= 2 * e_ref + floor, (
        f"{name}: max |ours - fp64| = {e_ours:.3e} > 2 x max |torch - fp64| = {2 * e_ref:.3e}"
        f" (+ floor {floor:.1e})"
    )
