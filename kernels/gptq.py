"""GPTQ per-row quantisation and LQER low-rank error factors (plain torch, any device).

GPTQ (Frantar et al., 2022). A linear layer's output error from a weight error ``E = W - Ŵ``,
over the calibration inputs ``X`` (n, K), is ``||X Eᵀ||² = tr(E H Eᵀ)`` with ``H = XᵀX``.
GPTQ quantises the columns of ``W`` one at a time. After column ``j`` it moves that column's
rounding error onto the columns not yet quantised: it subtracts ``err_j · U[j, j:] / U[j, j]``,
where ``U`` is the upper Cholesky factor of ``H⁻¹``. That is the least-squares compensation
under ``H``. Rows are independent, so each step is one (rows,) column for every row at once.

The loop works in blocks of ``block`` columns. Inside a block the update is a rank-1 update
of the block only. When the block is done, its errors reach the rest of the matrix in one
matmul ``W[:, b:] -= Err @ U[blk, b:]`` (the "lazy batch" update). The column loop itself is
inherently sequential: column j+1's rounding depends on column j's compensation.

Conditioning. ``H`` gets ``damp · mean(diag H)`` added to its diagonal. Columns with no
signal (``H_jj = 0``) are zeroed and given ``H_jj = 1``. Columns are processed in order of
decreasing ``H_jj`` ("act order"): the ones carrying most of the signal are rounded first,
while the most columns remain to absorb their error.

Scale. Per row, symmetric: ``s = clip / qmax`` in fp16, with ``clip = k · std(w_row)``, and
``|q| <= qmax``. A caller may pass its own ``scale`` instead (``Int6Linear.from_linear`` passes
the RTN quantiser's clip, the percentile of |w| with the least MSE, when asked). The scales
are fixed before the loop starts.

LQER (Zhang et al., 2024). The remaining error ``E = W - Q·s`` is approximated by its best
rank-r factors ``A B``: ``A = U_r Σ_r`` (out, r) and ``B = V_rᵀ`` (r, in), from the SVD. The
layer then computes ``x (Q·s)ᵀ + (x Bᵀ) Aᵀ``. The factors are stored quantised (int8 per row,
``quantize_factor``); a reader multiplies the dequantised factors.
"""

from __future__ import annotations

import torch
from torch import nn


def _check(w: torch.Tensor, h: torch.Tensor, qmax: int) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"gptq_quantize: w must be a 2-D float tensor, got "
                         f"{getattr(w, 'shape', type(w).__name__)}")
    k = w.shape[1]
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != (k, k):
        raise ValueError(f"gptq_quantize: hessian must be ({k}, {k}) for w of shape "
                         f"{tuple(w.shape)}, got {getattr(h, 'shape', type(h).__name__)}")
    if not bool(torch.isfinite(h).all()):
        raise ValueError("gptq_quantize: hessian has non-finite entries")
    if not 1 <= qmax <= 127:
        raise ValueError(f"gptq_quantize: qmax must be in [1, 127], got {qmax}")


def sigma_scale(w: torch.Tensor, qmax: int, clip_sigmas: float) -> torch.Tensor:
    """fp16 per-row scale for a clip of ``clip_sigmas`` standard deviations of each row."""
    std = w.float().std(dim=1, correction=0)
    return (clip_sigmas * std / qmax).clamp_min(2**-24).half()


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``; λ grows tenfold until H + λI factors."""
    mean_diag = h.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        lam = damp * (10**attempt) * mean_diag
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return u
    raise ValueError("gptq_quantize: the hessian is not positive definite even with damping")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, qmax: int = 31,
                  clip_sigmas: float | None = 12.85, block: int = 128, damp: float = 0.01,
                  scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ-quantise ``w`` (out, in) under ``hessian`` (in, in) = Σ xᵀx of its inputs.

    Returns (q int8 in [-qmax, qmax], s fp16 (out,)) on w's device: ``w ≈ q · s[:, None]``.
    ``scale``: use these per-row scales instead of choosing them (``clip_sigmas``)."""
    _check(w, hessian, qmax)
    if block < 1:
        raise ValueError(f"gptq_quantize: block must be >= 1, got {block}")
    work = w.detach().float().clone()
    h = hessian.detach().to(work.device, torch.float64).clone()
    if scale is None:
        if clip_sigmas is None or clip_sigmas <= 0:
            raise ValueError(f"gptq_quantize: pass clip_sigmas > 0 or scale, got "
                             f"clip_sigmas={clip_sigmas}")
        scale = sigma_scale(work, qmax, clip_sigmas)
    s = scale.float().to(work.device).clamp_min(2**-24)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    work[:, dead] = 0.0
    perm = torch.argsort(h.diagonal(), descending=True)
    # the loop walks columns: hold them as contiguous rows of the transpose (cols, rows)
    wt = work[:, perm].t().contiguous()
    u = _inverse_cholesky(h[perm][:, perm], damp).float()
    cols, rows = wt.shape
    qt = torch.empty_like(wt)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        ub = u[b0:b1, b0:b1]
        err = torch.empty(b1 - b0, rows, device=work.device)
        for j in range(b1 - b0):
            col = wt[b0 + j]
            qc = torch.round(col / s).clamp_(-qmax, qmax)
            qt[b0 + j] = qc
            e = (col - qc * s) / ub[j, j]
            err[j] = e
            wt[b0 + j + 1 : b1].addr_(ub[j, j + 1 :], e, alpha=-1.0)
        if b1 < cols:
            wt[b1:].addmm_(u[b0:b1, b1:].t(), err, alpha=-1.0)
    out = torch.empty(rows, cols, device=work.device)
    out[:, perm] = qt.t()
    return out.to(torch.int8), scale.half().to(w.device)


def quantize_factor(f: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 per row with an fp16 absmax scale: (q, s) with ``f ≈ q · s[:, None]``."""
    f = f.float()
    s = (f.abs().amax(dim=1) / qmax).clamp_min(2**-24).half()
    q = torch.round(f / s.float()[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q, s


@torch.no_grad()
def lqer_factors(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (A (out, r), B (r, in)) of ``error`` (the SVD's), with the
    singular values on A."""
    if rank < 1:
        raise ValueError(f"lqer_factors: rank must be >= 1, got {rank}")
    u, sv, vh = torch.linalg.svd(error.float(), full_matrices=False)
    r = min(rank, sv.numel())
    return (u[:, :r] * sv[:r]).contiguous(), vh[:r].contiguous()


def input_hessians(module: nn.Module, batches, names: set[str]) -> dict[str, torch.Tensor]:
    """Σ xᵀx (fp32) of the inputs of every ``nn.Linear`` of ``module`` named in ``names``,
    over ``module(*batch)`` for each batch of ``batches`` (forward pre-hooks, no grad). A
    Linear whose forward never runs (its owner reads ``.weight`` directly) gets none."""
    out: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(mod, inputs):
            x = inputs[0].detach().float().reshape(-1, mod.in_features)
            h = out.setdefault(name, torch.zeros(mod.in_features, mod.in_features,
                                                 device=x.device))
            h.addmm_(x.T, x)
        return fn

    for name, mod in module.named_modules():
        if isinstance(mod, nn.Linear) and name in names:
            hooks.append(mod.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            for batch in batches:
                module(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
    finally:
        for h in hooks:
            h.remove()
    return out
