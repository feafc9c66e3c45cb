"""Checkpoints: sealed files that load without running code, a run's resumable training
states, and a model from either a checkpoint (``model.ckpt``) or an int6 artifact.

A checkpoint is ``torch.save`` of tensors and plain data only, so it loads with
``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and containers. It is
*sealed*: the zip archive's comment holds ``proteus-sha256:`` and the SHA-256 of every byte
before the digest, so a flipped bit, a truncation or an edit anywhere is refused on load with
one line naming the file (the file stays a valid zip: ``torch.load`` still reads it). Weights
are checked finite before a file is written and again when it is loaded. Files are written
atomically (``proteus.files``).

A run directory holds ``model.ckpt`` (the final weights) and, under ``checkpoints/``, the
newest ``keep_checkpoints`` training states ``step-NNNNNNNNN.ckpt`` that ``proteus train
--resume`` continues from (what is in them: ``proteus.train``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from proteus.artifact import read_artifact
from proteus.config import RunConfig
from proteus.device import require_memory
from proteus.errors import ConfigError, ProteusError, RunFailed
from proteus.files import (
    InputError,
    OutputError,
    atomic_write,
    check_file,
    read_bounded,
    remove_stale_temps,
)
from proteus.model import GPT, build_model
from proteus.quant import QuantizedState, apply_int6

CHECKPOINT_FORMAT = "proteus-checkpoint-2"
TRAIN_STATE_FORMAT = "proteus-train-state-1"
STATE_DIR = "checkpoints"
_SEAL = b"proteus-sha256:"
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record: 22 bytes + its comment
_DIGEST_HEX = 64
MAX_CHECKPOINT_BYTES = 1 << 36  # read whole to check its seal; memory is checked first


class CheckpointError(ProteusError):
    """A missing, damaged, foreign or mismatched checkpoint; the message names the file."""


class JsonLog:
    """A run's ``log.jsonl``: one JSON record per line, line-buffered (``None``: discard)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.f = self._open() if path else None

    def _open(self):
        try:
            return open(self.path, "a", buffering=1)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from None

    def drop_after(self, step: int) -> int:
        """Drop the records a resumed run writes again: those of steps after ``step`` (the
        training state it resumes from), a killed evaluation's ``final``, and a line torn by
        the kill. The file is rewritten atomically; returns how many lines went."""
        if not self.f:
            return 0
        self.close()
        try:
            with open(self.path) as f:
                lines = f.readlines()
        except OSError as e:
            raise OutputError(f"cannot read {self.path}: {e.strerror or e}") from None
        kept = [line for line in lines if not _stale(line, step)]
        if len(kept) < len(lines):
            atomic_write(self.path, "".join(kept).encode())
        self.f = self._open()
        return len(lines) - len(kept)

    def write(self, **record) -> None:
        if self.f:
            try:
                self.f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        if self.f:
            try:
                self.f.close()
            except OSError:
                pass  # a full disk was reported by the write that hit it


def _stale(line: str, step: int) -> bool:
    """A ``log.jsonl`` line a run resumed at ``step`` must not keep (see ``drop_after``)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return True
    if not isinstance(rec, dict) or not line.endswith("\n"):
        return True  # torn
    s = rec.get("step")
    return rec.get("event") == "final" or (isinstance(s, int) and s > step)


# ---------------------------------------------------------------------------------------------
# Sealed files


def seal(zip_bytes: bytes) -> bytes:
    """``torch.save`` output with the SHA-256 of every byte before the digest as its zip
    comment (the archive stays readable by any zip reader and by ``torch.load``)."""
    eocd = len(zip_bytes) - 22
    if zip_bytes[eocd : eocd + 4] != _EOCD or zip_bytes[-2:] != b"\0\0":
        raise ValueError("seal: expected a zip archive without a comment (torch.save output)")
    body = zip_bytes[:-2] + struct.pack("<H", len(_SEAL) + _DIGEST_HEX) + _SEAL
    return body + hashlib.sha256(body).hexdigest().encode()


def verify_seal(raw: bytes, path: str) -> None:
    """Refuse (one line naming ``path``) a file whose every byte is not as it was written."""
    n = len(_SEAL) + _DIGEST_HEX
    tail = raw[-n:]
    if len(raw) < 22 + n or not tail.startswith(_SEAL) or raw[-n - 22 : -n - 18] != _EOCD:
        if raw[:4] == b"PK\x03\x04" and len(raw) >= 22 and raw[-22:-18] == _EOCD:
            raise CheckpointError(
                f"checkpoint {path} has no integrity seal (written by an older proteus, or "
                "not by proteus); it is not loaded")
        raise CheckpointError(
            f"checkpoint {path} is damaged or truncated: its integrity seal is missing")
    if hashlib.sha256(raw[:-_DIGEST_HEX]).hexdigest().encode() != tail[len(_SEAL):]:
        raise CheckpointError(
            f"checkpoint {path} failed its integrity check (SHA-256 mismatch): the file is "
            "damaged; it is not loaded")


def write_sealed(path: Path, obj: dict) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, seal(buf.getvalue()))


def read_sealed(path: str | os.PathLike, fmt: str, what: str) -> dict:
    """The dict a sealed file holds, after checking every byte and its format tag."""
    path = str(path)
    try:
        size = check_file(path, what, MAX_CHECKPOINT_BYTES)
        require_memory(2 * size, torch.device("cpu"), f"{what} {path}")
        raw = read_bounded(path, what, MAX_CHECKPOINT_BYTES)
    except InputError as e:
        raise CheckpointError(str(e)) from None
    verify_seal(raw, path)
    try:
        blob = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # the seal matched: a proteus-written file torch cannot read
        raise CheckpointError(f"{what} {path} is unreadable ({type(e).__name__}); pass a "
                              "file written by `proteus train`") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        tag = blob.get("format") if isinstance(blob, dict) else None
        raise CheckpointError(f"{what} {path} is not a {fmt} file (format {tag!r})")
    return blob


# ---------------------------------------------------------------------------------------------
# Weights


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first floating tensor holding a NaN or an infinity, as "name (nan)", or None."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            if not bool(torch.isfinite(t).all()):
                kind = "nan" if bool(torch.isnan(t).any()) else "inf"
                return f"{name} ({kind})"
    return None


def _tensor_dict(obj, path: str, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise CheckpointError(f"{what} {path}: its weights are not a name -> tensor mapping")
    return obj


def save_checkpoint(path: Path, model: GPT, cfg: RunConfig, extra: dict | None = None) -> None:
    """The final weights, sealed; refused (nothing written) if any weight is non-finite."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = first_nonfinite(state)
    if bad:
        raise RunFailed(f"not writing {path}: weight {bad} is not finite")
    write_sealed(Path(path), {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(),
                              "model": state, "extra": extra or {}})


def load_checkpoint(path: str) -> tuple[RunConfig, dict[str, torch.Tensor], dict]:
    """(config, weights, extra) of a sealed ``model.ckpt``; damaged, foreign, malformed or
    non-finite ones are refused with one line."""
    blob = read_sealed(path, CHECKPOINT_FORMAT, "checkpoint")
    cfg = RunConfig.from_dict(blob.get("config"), where=f"checkpoint {path}")
    state = _tensor_dict(blob.get("model"), path, "checkpoint")
    bad = first_nonfinite(state)
    if bad:
        raise CheckpointError(f"checkpoint {path}: weight {bad} is not finite (the run "
                              "diverged); it is not evaluated")
    extra = blob.get("extra", {})
    return cfg, state, extra if isinstance(extra, dict) else {}


# ---------------------------------------------------------------------------------------------
# Resumable training states


def state_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / STATE_DIR


def state_paths(run_dir: str | os.PathLike) -> list[Path]:
    """The run's training states, oldest first (temporary files of killed writes skipped)."""
    folder = state_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if re.fullmatch(r"step-\d{9}\.ckpt", p.name))


def save_train_state(run_dir: str | os.PathLike, step: int, state: dict, keep: int) -> Path:
    """Write ``checkpoints/step-N.ckpt`` (sealed; refused if a weight is non-finite), then
    delete all but the newest ``keep``. Returns its path."""
    folder = state_dir(run_dir)
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {folder}: {e.strerror or e}") from None
    path = folder / f"step-{step:09d}.ckpt"
    bad = first_nonfinite(state["model"])
    if bad:
        raise RunFailed(f"not writing {path}: weight {bad} is not finite")
    write_sealed(path, {"format": TRAIN_STATE_FORMAT, **state})
    for old in state_paths(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_train_state(path: str | os.PathLike) -> dict:
    """A training state :func:`save_train_state` wrote (every byte checked)."""
    blob = read_sealed(path, TRAIN_STATE_FORMAT, "training state")
    blob["config"] = RunConfig.from_dict(blob.get("config"), where=f"training state {path}")
    _tensor_dict(blob.get("model"), str(path), "training state")
    blob["path"] = str(path)
    return blob


def newest_intact_state(run_dir: str | os.PathLike) -> tuple[dict | None, list[str]]:
    """The newest training state of a run that loads (every byte checked), and one line per
    newer state that was damaged and skipped; (None, []) for a run with no state. Every state
    damaged: CheckpointError naming the newest and how many there were."""
    skipped: list[str] = []
    paths = state_paths(run_dir)
    for path in reversed(paths):
        try:
            return load_train_state(path), skipped
        except CheckpointError as e:
            skipped.append(str(e))
    if paths:
        raise CheckpointError(f"{skipped[0]}; and no older training state of the run is intact "
                              f"({len(paths)} checked)")
    return None, []


_RUN_FILE = re.compile(r"(config\.json|summary\.json|model\.ckpt|model\.int6|cache_params\.json)")
_STATE_FILE = re.compile(r"step-\d{9}\.ckpt")


def clean_run_dir(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writes of the run's own files left in a run
    directory (``.model.ckpt.tmp123``); anything else, a user's ``notes.tmp123`` included, is
    left alone."""
    return (remove_stale_temps(run_dir, lambda n: bool(_RUN_FILE.fullmatch(n)))
            + remove_stale_temps(state_dir(run_dir), lambda n: bool(_STATE_FILE.fullmatch(n))))


# ---------------------------------------------------------------------------------------------
# A model from a checkpoint or an artifact


def int6_model(cfg: RunConfig, qstate: QuantizedState, kernels: str | None = None) -> GPT:
    """The model of ``cfg`` running on quantised weights (packed int6 linears, the rest
    dequantised), through the int6 kernel with ``--kernels triton``."""
    kind = kernels or cfg.train.kernels
    return apply_int6(build_model(cfg, kind), qstate, use_kernel=(kind == "triton"))


def _is_artifact(path: str) -> bool:
    """A checkpoint is a zip (torch.save); anything else is handed to the artifact reader."""
    with open(path, "rb") as f:
        return f.read(4) != b"PK\x03\x04"


def expected_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """Every weight's shape for ``cfg``, from a model on the meta device (nothing allocated)."""
    return dict(_shapes(cfg.model))


@functools.lru_cache(maxsize=16)
def _shapes(mc) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = GPT(mc)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def load_model(path: str, kernels: str | None) -> tuple[GPT, RunConfig, dict]:
    """A model from ``model.ckpt`` or from an int6 artifact (through Int6Linear layers).

    Refused with one line: a missing path or a folder, a damaged or foreign file, a config
    that does not validate, weights that do not match it, a model too big for this machine's
    memory, and non-finite weights."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} not found; pass a run's model.ckpt or its artifact")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a file; pass a run's model.ckpt or its artifact")
    try:
        artifact = os.path.getsize(path) < 8 or _is_artifact(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if artifact:
        qstate, meta = read_artifact(path, lambda m: _artifact_shapes(m, path))
        cfg = RunConfig.from_dict(meta.get("run_config"), where=f"artifact {path}")
        model = int6_model(cfg, qstate, kernels)
        bad = first_nonfinite(model.state_dict())
        if bad:
            raise CheckpointError(f"{path}: weight {bad} is not finite; it is not evaluated")
        bpb = meta.get("float_bpb")
        info = dict(source="artifact", float_bpb=bpb if isinstance(bpb, float) else None)
    else:
        cfg, state, extra = load_checkpoint(path)  # refuses non-finite weights
        shapes = expected_shapes(cfg)
        require_memory(4 * sum(_numel(s) for s in shapes.values()), torch.device("cpu"),
                       f"the model of {path}")
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != shapes:  # before building a model for it
            diff = sorted(set(got.items()) ^ set(shapes.items()))[:3]
            raise CheckpointError(f"checkpoint {path} does not match its config: weights "
                                  f"{[k for k, _ in diff]} differ in name or shape")
        model = build_model(cfg, kernels)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"checkpoint {path} does not match its config: {e}") from None
        info = dict(source="checkpoint", **extra)
    return model, cfg, info


def train_memory_bytes(cfg: RunConfig, seqs_per_rank: int, micro: int) -> dict[str, int]:
    """A lower bound of one rank's peak memory for training and evaluating ``cfg``, in bytes,
    by part, from the config alone (nothing allocated): the weights with their gradients,
    optimiser moments, EMA, SWA and warm-up copies (6 fp32 copies); a step's tokens (int64
    inputs and targets); the activations a micro-batch keeps for backward (per block and
    token: 4 x model_dim + 2 x MLP hidden values at 2 bytes, bf16 at best; the logits in fp32,
    twice); and an evaluation batch's logits. Attention scores, temporaries and the allocator's
    slack come on top, so a run refused by it could never fit; one that passes may still not."""
    mc, tc, ec = cfg.model, cfg.train, cfg.eval
    params = sum(_numel(s) for s in expected_shapes(cfg).values())
    step_tokens = seqs_per_rank * tc.seq_len
    micro_tokens = micro * tc.seq_len
    per_token = mc.num_layers * (4 * mc.model_dim + 2 * mc.mlp_hidden) * 2
    eval_tokens = ec.eval_batch_seqs * (ec.eval_seq_len or tc.seq_len)
    return {"weights and optimiser state": 24 * params, "the step's tokens": 16 * step_tokens,
            "activations": micro_tokens * (per_token + 8 * mc.vocab_size),
            "evaluation logits": eval_tokens * 8 * mc.vocab_size}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _artifact_shapes(meta: dict, path: str) -> dict[str, tuple[int, ...]]:
    """The weight shapes an artifact's config implies, checked against this machine's memory
    before anything is decoded (the artifact reader refuses a table that disagrees)."""
    cfg = RunConfig.from_dict(meta.get("run_config"), where=f"artifact {path}")
    shapes = expected_shapes(cfg)
    require_memory(4 * sum(_numel(s) for s in shapes.values()), torch.device("cpu"),
                   f"the model of {path}")
    return shapes
