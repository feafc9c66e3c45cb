"""Test set-up: kernels run on Triton's interpreter on CPU, compiled on a GPU when present.

``kernels`` is imported first so its backend choice (see kernels/_backend.py) is made
before any test module imports a kernel. Tests take the ``device`` fixture; tests marked
``cuda`` are skipped (never failed) without a GPU.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

import proteus.kernels  # noqa: F401  (selects compiled vs interpreter before kernel modules load)
from proteus.kernels import kernel_device


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: 'cuda' on a GPU, 'cpu' for the interpreter."""
    return kernel_device()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No PROTEUS_* or torchrun variables from the caller's shell; the test's tmp_path."""
    for k in list(os.environ):
        if k.startswith("PROTEUS_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(k)
    return tmp_path


@pytest.fixture(autouse=True)
def _proteus_logs_reach_caplog():
    """``proteus.cli.setup_logging`` (any test that runs ``main``) stops the ``proteus`` logger
    propagating to the root, where a later test's ``caplog`` listens: give it back."""
    yield
    logging.getLogger("proteus").propagate = True
