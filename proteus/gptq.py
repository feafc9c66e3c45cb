"""The model's quantiser choices: round-to-nearest or GPTQ for the int6 matrices, int7 or int8
embeddings, and LQER factors on the matrices with the largest error.

GPTQ needs, for each int6 matrix, the Hessian ``H = Σ xᵀx`` of its inputs. We get them by
running the float model on calibration batches of *training* tokens with every int6 Linear
swapped for a recorder. The recorder is a Linear that adds ``xᵀx`` to its Hessian and then
computes ``x Wᵀ``. It says it is ``quantized``, so the model calls it through its module
instead of fusing its weight (the q/k/v concatenation and the fused MLP). The calibration
tokens are checked by content first (``proteus.fingerprint``). A stream that overlaps the
validation tokens is refused, whatever its file name.

Unlike ``tune-cache``, GPTQ may calibrate on tokens the checkpoint trained on, as the
challenge's records do. The quantiser only learns which input directions matter; it fits
nothing that is scored.

The per-matrix quantiser itself (``gptq_quantize``, ``lqer_factors``) lives in
``proteus.kernels.gptq``, next to ``Int6Linear`` which uses it too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from proteus import data as D
from proteus.fingerprint import files_fingerprint, refuse_overlaps
from proteus.kernels.gptq import gptq_quantize, lqer_factors, quantize_factor
from proteus.quant import INT_QMAX, QTensor, QuantizedState, quantize_state_dict, sqnr_db

METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantChoices:
    """What ``proteus quantize`` and ``train --quant-*`` choose (validated here)."""

    method: str = "rtn"
    clip_sigmas: float = 0.0  # GPTQ clip in row standard deviations; 0 = RTN's clip search
    lqer_rank: int = 0
    lqer_top_k: int = 3
    embed_bits: int = 8
    calib_batches: int = 16
    calib_seqs: int = 8  # sequences per calibration batch

    def validate(self) -> None:
        bad = []
        if self.method not in METHODS:
            bad.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (self.clip_sigmas == 0 or 0.5 <= self.clip_sigmas <= 64):
            bad.append(f"clip sigmas must be 0 (RTN's clip) or in [0.5, 64], got "
                       f"{self.clip_sigmas}")
        if not 0 <= self.lqer_rank <= 64:
            bad.append(f"lqer rank must be in [0, 64], got {self.lqer_rank}")
        if not 1 <= self.lqer_top_k <= 4096:
            bad.append(f"lqer top-k must be in [1, 4096], got {self.lqer_top_k}")
        if self.embed_bits not in (7, 8):
            bad.append(f"embed bits must be 7 or 8, got {self.embed_bits}")
        if not 1 <= self.calib_batches <= 4096 or not 1 <= self.calib_seqs <= 4096:
            bad.append(f"calibration batches and sequences must be in [1, 4096], got "
                       f"{self.calib_batches} x {self.calib_seqs}")
        if bad:
            raise ValueError("; ".join(bad))


class _Recorder(nn.Module):
    """Stands in for an int6 Linear during calibration: accumulates ``xᵀx``, returns x Wᵀ."""

    quantized = True  # the model then calls the module instead of reading its weight

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        n = linear.in_features
        self.hessian = torch.zeros(n, n, dtype=torch.float32, device=linear.weight.device)
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.detach().float().reshape(-1, self.hessian.shape[0])
        self.hessian.addmm_(x2.T, x2)
        self.rows += x2.shape[0]
        return F.linear(x, self.linear.weight.to(x.dtype), None if self.linear.bias is None
                        else self.linear.bias.to(x.dtype))


def int6_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Module name -> Linear of every matrix the artifact stores as int6."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("blocks.")}


def collect_hessians(model: nn.Module, batches: list[torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": Σ xᵀx / rows}`` over ``model(batch)`` for each batch of token ids
    (the model's own forward, no gradients). The model is restored afterwards."""
    linears = int6_linears(model)
    modules = dict(model.named_modules())
    swapped = []
    for name, lin in linears.items():
        parent, _, child = name.rpartition(".")
        rec = _Recorder(lin)
        setattr(modules[parent], child, rec)
        swapped.append((modules[parent], child, lin, rec, name))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for idx in batches:
                model(idx)
    finally:
        for parent, child, lin, _rec, _ in swapped:
            setattr(parent, child, lin)
        model.train(was_training)
    return {f"{name}.weight": rec.hessian / max(rec.rows, 1)
            for _, _, _, rec, name in swapped}


def calibration_batches(files: list[str], choices: QuantChoices, seq_len: int, vocab_size: int,
                        val_glob: str) -> list[torch.Tensor]:
    """``calib_batches`` batches of ``calib_seqs`` consecutive windows of ``seq_len`` training
    tokens from ``files``. Refused (``DataError``, naming the file and the overlap) when a file
    overlaps the validation tokens by content."""
    val = files_fingerprint(D.resolve_files(val_glob or D.bundled_val_glob(), "val"))
    refuse_overlaps(files, [("the validation tokens", val)],
                    "GPTQ calibrates on training tokens only")
    need = choices.calib_batches * choices.calib_seqs * seq_len
    tokens = np.concatenate([D.load_shard(f, vocab_size) for f in files])
    if tokens.size < need:
        raise D.DataError(f"calibration needs {need:,} tokens ({choices.calib_batches} batches x "
                          f"{choices.calib_seqs} x {seq_len}); {', '.join(files)} hold "
                          f"{tokens.size:,}: pass fewer --calib-batches")
    t = torch.from_numpy(tokens[:need].astype(np.int64))
    return list(t.view(choices.calib_batches, choices.calib_seqs, seq_len))


def quantize_model(model: nn.Module, choices: QuantChoices,
                   hessians: dict[str, torch.Tensor] | None = None
                   ) -> tuple[QuantizedState, dict]:
    """The model's quantised state under ``choices`` and a report (seconds, the tensors that
    got LQER factors). ``hessians``: from :func:`collect_hessians` (GPTQ needs them)."""
    choices.validate()
    t0 = time.perf_counter()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    qs = quantize_state_dict(state, embed_bits=choices.embed_bits)
    if choices.method == "gptq":
        if not hessians:
            raise ValueError("quantize_model: GPTQ needs the calibration hessians")
        for name, h in hessians.items():
            t = qs.tensors[name]
            w = state[name].float()
            scale = None if choices.clip_sigmas else t.scale
            q, s = gptq_quantize(w, h, INT_QMAX[t.kind], choices.clip_sigmas or None,
                                 scale=scale)
            qs.tensors[name] = QTensor(t.kind, t.shape, q=q, scale=s)
            qs.tensors[name].sqnr = sqnr_db(w, qs.tensors[name].dequantize())
    lqer = []
    if choices.lqer_rank:
        errs = {n: state[n].float() - t.dequantize() for n, t in qs.tensors.items()
                if t.kind == "int6"}
        for name in sorted(errs, key=lambda n: -float(errs[n].norm()))[: choices.lqer_top_k]:
            a, b = lqer_factors(errs[name], choices.lqer_rank)
            fa, fb = (QTensor("int8", tuple(f.shape), *quantize_factor(f)) for f in (a, b))
            qs.tensors[name].lqer = (fa, fb)
            qs.tensors[name].sqnr = sqnr_db(state[name], qs.tensors[name].dequantize())
            lqer.append(name)
    return qs, dict(method=choices.method, seconds=time.perf_counter() - t0, lqer=lqer,
                    embed_bits=choices.embed_bits, clip_sigmas=choices.clip_sigmas,
                    lqer_rank=choices.lqer_rank)


def run_choices(train_cfg) -> QuantChoices:
    """The quantiser choices of a run's ``TrainConfig`` (``--quant-method`` etc.)."""
    return QuantChoices(method=train_cfg.quant_method, clip_sigmas=train_cfg.quant_clip_sigmas,
                        lqer_rank=train_cfg.lqer_rank, lqer_top_k=train_cfg.lqer_top_k,
                        embed_bits=train_cfg.embed_bits,
                        calib_batches=train_cfg.quant_calib_batches,
                        calib_seqs=max(1, train_cfg.batch_tokens // train_cfg.seq_len))


def quantize_with_calibration(model: nn.Module, choices: QuantChoices, calib_files: list[str],
                              seq_len: int, vocab_size: int, val_glob: str
                              ) -> tuple[QuantizedState, dict]:
    """:func:`quantize_model`, with GPTQ's Hessians collected first from ``calib_files``
    (refused when they overlap the validation tokens); the report adds the calibration's
    files, tokens and seconds."""
    choices.validate()
    if choices.method != "gptq":
        return quantize_model(model, choices)
    t0 = time.perf_counter()
    batches = calibration_batches(calib_files, choices, seq_len, vocab_size, val_glob)
    device = next(model.parameters()).device
    hessians = collect_hessians(model, [b.to(device) for b in batches])
    hessians = {k: v.cpu() for k, v in hessians.items()}
    calib_s = time.perf_counter() - t0
    qs, rep = quantize_model(model, choices, hessians)
    used, have = [], 0  # the files the batches came from (they are read in order)
    for f in calib_files:
        if have >= sum(b.numel() for b in batches):
            break
        used.append(f)
        have += D.read_shard_header(f)
    rep.update(calibration=dict(files=[os.path.basename(f) for f in used],
                                tokens=sum(b.numel() for b in batches),
                                seconds=calib_s))
    return qs, rep
