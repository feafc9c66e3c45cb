"""Quantisation rules for a state dict (int6/int8 per row) and loading a quantised model.

The per-row quantiser (:func:`quantize_rows`) and the int6 layer (``Int6Linear``) are the
kernel module's (``proteus.kernels.int6_matmul``): one quantiser and one layer for the model,
the artifact and users' own models.

Rules (``tensor_kind``): every 2-D ``*.weight`` under ``blocks.`` (attention and MLP matrices)
-> int6 in [-31, 31] with a per-row fp16 scale whose clip is chosen per row from a few
percentiles of |w| by minimum reconstruction MSE; other float tensors with at least
``INT8_MIN_NUMEL`` elements (embeddings) -> int8 per row with an fp16 scale (or int7, in
[-63, 63], with ``embed_bits=7``); everything else -> fp16 if 2-D, fp32 if 1-D/scalar (gains,
gates, mixes: control tensors). GPTQ and LQER (``proteus.gptq``) replace the int6 values and
add low-rank factors (``QTensor.lqer``: int8 A (out, r) and B (r, in)) to the same state.

The file these values are stored in (rANS-coded, checksummed, no pickle) is
``proteus.artifact``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from proteus.config import ProteusError, RunFailed
from proteus.kernels.int6_matmul import CLIP_PERCENTILES, QMAX, Int6Linear, quantize_rows

__all__ = ["CLIP_PERCENTILES", "INT8_MIN_NUMEL", "INT_QMAX", "ArtifactError", "Int6Linear",
           "QTensor", "QuantizedState", "apply_int6", "dequantize_state", "quantize_rows",
           "quantize_state_dict", "sqnr_db", "tensor_kind"]

INT8_MIN_NUMEL = 65536
INT_QMAX = {"int6": QMAX, "int7": 63, "int8": 127}  # the integer kinds and their ranges


class ArtifactError(ProteusError):
    """A missing, damaged, foreign or mismatched artifact; the message names file and problem."""


# ---------------------------------------------------------------------------------------------
# Quantisers


def tensor_kind(name: str, t: torch.Tensor) -> str:
    if not t.is_floating_point():
        return "raw"
    if t.dim() == 2 and name.startswith("blocks.") and name.endswith(".weight"):
        return "int6"
    if t.numel() >= INT8_MIN_NUMEL:
        return "int8"
    return "fp16" if t.dim() == 2 else "fp32"


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    noise = (w.float() - w_hat.float()).pow(2).sum().item()
    signal = w.float().pow(2).sum().item()
    if noise == 0:
        return float("inf")
    if not (math.isfinite(noise) and math.isfinite(signal)):
        return float("nan")
    return 10 * math.log10(max(signal, 1e-30) / noise)


@dataclass
class QTensor:
    kind: str  # int6 | int7 | int8 | fp16 | fp32 | raw
    shape: tuple
    q: torch.Tensor | None = None  # int8 values (int6/int7/int8)
    scale: torch.Tensor | None = None  # fp16 per row (int6/int7/int8)
    data: torch.Tensor | None = None  # fp16/fp32/raw payload
    sqnr: float = float("inf")
    lqer: tuple[QTensor, QTensor] | None = None  # int8 factors A (out, r), B (r, in)

    def lqer_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The dequantised LQER factors (A, B), or None."""
        return None if self.lqer is None else (self.lqer[0].dequantize(),
                                                self.lqer[1].dequantize())

    def dequantize(self) -> torch.Tensor:
        if self.kind in INT_QMAX:
            w = self.q.float() * self.scale.float()[:, None]
            if self.lqer is not None:
                a, b = self.lqer_factors()
                w = w + a @ b
            return w.reshape(self.shape)
        return self.data.float().reshape(self.shape) if self.kind != "raw" else self.data


@dataclass
class QuantizedState:
    tensors: dict[str, QTensor] = field(default_factory=dict)

    def report(self) -> str:
        lines = [f"{'tensor':40s} {'kind':5s} {'shape':>16s} {'SQNR dB':>8s}"]
        for name, t in self.tensors.items():
            lines.append(f"{name:40s} {t.kind:5s} {str(tuple(t.shape)):>16s} {t.sqnr:8.2f}")
        return "\n".join(lines)


def quantize_state_dict(sd: dict[str, torch.Tensor], embed_bits: int = 8) -> QuantizedState:
    """Round-to-nearest quantisation of every tensor by its kind; ``embed_bits`` 7 stores the
    int8 tensors (embeddings) as int7."""
    if embed_bits not in (7, 8):
        raise ValueError(f"quantize_state_dict: embed_bits must be 7 or 8, got {embed_bits!r}")
    out = QuantizedState()
    for name, t in sd.items():
        t = t.detach().cpu()
        kind = tensor_kind(name, t)
        if kind == "int8" and embed_bits == 7:
            kind = "int7"
        if kind in INT_QMAX:
            w2 = t.float().reshape(t.shape[0], -1)
            q, s = quantize_rows(w2, INT_QMAX[kind])
            qt = QTensor(kind, tuple(t.shape), q=q, scale=s)
            qt.sqnr = sqnr_db(w2, qt.dequantize().reshape(w2.shape))
        elif kind == "fp16":
            qt = QTensor(kind, tuple(t.shape), data=t.half())
            qt.sqnr = sqnr_db(t, qt.data)
        elif kind == "fp32":
            qt = QTensor(kind, tuple(t.shape), data=t.float())
        else:
            qt = QTensor(kind, tuple(t.shape), data=t)
        bad = [x for x in (qt.scale, qt.data) if x is not None and x.is_floating_point()
               and not bool(torch.isfinite(x).all())]
        if bad:  # a finite fp32 weight beyond fp16's range (65504) would be stored as inf/nan
            amax = t.float().abs().max().item()
            what = "scales" if qt.scale is not None else "values"
            raise RunFailed(f"weight {name} cannot be stored in the artifact: |w| up to "
                            f"{amax:.3g} overflows its fp16 {what} (the run diverged); "
                            "nothing was written")
        out.tensors[name] = qt
    return out


def dequantize_state(qs: QuantizedState) -> dict[str, torch.Tensor]:
    return {name: t.dequantize() for name, t in qs.tensors.items()}


# ---------------------------------------------------------------------------------------------
# Evaluating a quantised model through packed int6 weights


def apply_int6(model: torch.nn.Module, qstate: QuantizedState, use_kernel: bool):
    """Swap every int6 linear of ``model`` for an Int6Linear; load the rest dequantised."""
    rest = {}
    modules = dict(model.named_modules())
    for name, t in qstate.tensors.items():
        mod_name = name.rsplit(".", 1)[0]
        if t.kind == "int6" and name.endswith(".weight") and mod_name in modules:
            parent_name, _, child = mod_name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, child, Int6Linear.from_quantized(t.q, t.scale, use_kernel=use_kernel,
                                                             lqer=t.lqer_factors()))
        else:
            rest[name] = t.dequantize()
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [m for m in missing if not m.endswith(("packed", "scale", "lqer_a", "lqer_b"))]
    if missing or unexpected:
        raise ArtifactError(f"artifact does not match the model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    return model
