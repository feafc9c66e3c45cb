"""Autocast cases shared by the kernel tests: CPU bf16/fp16 here, CUDA fp16/bf16 on a GPU.

Kernels take tensors of one device type per process (CPU for the interpreter, CUDA when
compiled), so a case for the other device type is skipped; the CUDA cases also carry the
``cuda`` marker, which skips them (never fails them) on a machine without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from proteus.kernels import kernel_device

AUTOCAST_CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.cuda),
]


def autocast_device(device_type: str) -> str:
    """The device of an autocast case, or skip when kernels run on the other device type."""
    if device_type != kernel_device():
        pytest.skip(f"kernels run on {kernel_device()} in this process, not {device_type}")
    return device_type
