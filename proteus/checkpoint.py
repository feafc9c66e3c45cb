"""Checkpoints and files: atomic writes, save and load a checkpoint, and a model from either a
checkpoint (``model.ckpt``) or an int6 artifact.

A checkpoint is ``torch.save`` of tensors and plain data only, so it loads with
``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and containers. Every
file is written to a temporary name in the same folder and renamed, so a reader never sees a
half-written file.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from proteus.artifact import read_artifact
from proteus.config import ConfigError, RunConfig
from proteus.model import GPT, build_model
from proteus.quant import QuantizedState, apply_int6

CHECKPOINT_FORMAT = "proteus-checkpoint-1"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


class JsonLog:
    """A run's ``log.jsonl``: one JSON record per line, line-buffered (``None``: discard)."""

    def __init__(self, path: Path | None):
        self.f = open(path, "a", buffering=1) if path else None

    def write(self, **record) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.f:
            self.f.close()


def save_checkpoint(path: Path, model: GPT, cfg: RunConfig, extra: dict | None = None) -> None:
    """Tensors and plain data only, so it loads with ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": state,
                "extra": extra or {}}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str) -> tuple[RunConfig, dict[str, torch.Tensor], dict]:
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint {path} not found; pass the model.ckpt of a run directory")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(
            f"checkpoint {path} is unreadable ({type(e).__name__}); pass a model.ckpt written "
            "by `proteus train`"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"checkpoint {path} is not a proteus checkpoint (format tag missing)")
    return RunConfig.from_dict(blob["config"]), blob["model"], blob.get("extra", {})


def int6_model(cfg: RunConfig, qstate: QuantizedState, kernels: str | None = None) -> GPT:
    """The model of ``cfg`` running on quantised weights (packed int6 linears, the rest
    dequantised), through the int6 kernel with ``--kernels triton``."""
    kind = kernels or cfg.train.kernels
    return apply_int6(build_model(cfg, kind), qstate, use_kernel=(kind == "triton"))


def _is_artifact(path: str) -> bool:
    """A checkpoint is a zip (torch.save); anything else is handed to the artifact reader."""
    with open(path, "rb") as f:
        return f.read(4) != b"PK\x03\x04"


def load_model(path: str, kernels: str | None) -> tuple[GPT, RunConfig, dict]:
    """A model from ``model.ckpt`` or from an int6 artifact (through Int6Linear layers)."""
    if not os.path.exists(path):
        raise ConfigError(f"{path} not found; pass a run's model.ckpt or its artifact")
    if os.path.getsize(path) >= 8 and _is_artifact(path):
        qstate, meta = read_artifact(path)
        cfg = RunConfig.from_dict(meta["run_config"])
        model = int6_model(cfg, qstate, kernels)
        return model, cfg, dict(source="artifact", float_bpb=meta.get("float_bpb"))
    cfg, state, extra = load_checkpoint(path)
    model = build_model(cfg, kernels)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"checkpoint {path} does not match its config: {e}") from None
    return model, cfg, dict(source="checkpoint", **extra)
