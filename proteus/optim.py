"""Muon for the block matrices, AdamW for embeddings and scalars (the record's optimiser).

Muon step for a matrix parameter W with gradient G (momentum mu, Nesterov)::

    B <- mu * B + G                     (momentum buffer)
    U <- G + mu * B                     (Nesterov look-ahead)
    O <- NewtonSchulz5(U)               (approximate orthogonalisation, ~ U V^T of the SVD)
    W <- (1 - lr * wd) * W - lr * sqrt(max(1, rows / cols)) * O

Newton–Schulz uses the quintic X <- aX + (bA + cA^2)X, A = XX^T, after scaling X to unit
Frobenius norm: ``classic`` takes (a, b, c) = (3.4445, -4.7750, 2.0315) every iteration;
``polar-express`` takes iteration k's own minimax tuple (Amsel et al., "The Polar Express",
2025; the tuples the pg-record entry uses), its last tuple for iterations beyond the table.
With ``row_norm`` each row of U is first scaled to unit L2 norm (rows of W as stored, so
(out, in)), which evens out the update across output units before the orthogonalisation.
Matrices of one shape (up to transposition) are stacked and orthogonalised in one batched
call, which on a CPU saves hundreds of small kernel launches per step. Every rank computes the
same update from the same all-reduced gradients, so data-parallel ranks stay bit-identical.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from proteus.device import native_bf16
from proteus.errors import ConfigError
from proteus.model import GPT, Linear

NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express, 5 iterations, for singular values in about [1e-3, 1] after the Frobenius
# scaling (the numbers published with the method, as the pg-record entry uses them)
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def ns_coeffs(name: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of ``steps`` Newton–Schulz iterations."""
    if name == "classic":
        return [NS_COEFFS] * steps
    if name == "polar-express":
        table = POLAR_EXPRESS_COEFFS
        return [table[min(k, len(table) - 1)] for k in range(steps)]
    raise ValueError(f"muon_ns_coeffs must be classic or polar-express, got {name!r}")


def ns_torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """The Newton–Schulz precision: ``auto`` is bf16 where bf16 is native (CUDA, as in the
    record; CPUs with AMX/AVX512-BF16, ~2x faster there), fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def newton_schulz5(g: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None,
                   coeffs: str = "classic") -> torch.Tensor:
    """Approximately orthogonalise the last two dims of ``g`` (batched), computing in ``dtype``
    (default: ``ns_torch_dtype("auto", g.device)``) with the ``coeffs`` iteration."""
    x = g.to(dtype or ns_torch_dtype("auto", g.device))
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    batched = x.dim() == 3
    if not batched:
        x = x.unsqueeze(0)
    for a, b, c in ns_coeffs(coeffs, steps):
        s = torch.bmm(x, x.mT)
        poly = torch.baddbmm(s, s, s, beta=b, alpha=c)  # b*s + c*s@s in one call
        x = torch.baddbmm(x, poly, x, beta=a)  # a*x + poly@x
    if not batched:
        x = x.squeeze(0)
    if tall:
        x = x.mT
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(
        self, params, lr: float, momentum: float, ns_steps: int = 5, weight_decay: float = 0.0,
        ns_dtype: str = "auto", ns_coeffs: str = "classic", row_norm: bool = False,
    ):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps, weight_decay=weight_decay,
                         ns_dtype=ns_dtype, ns_coeffs=ns_coeffs, row_norm=row_norm)
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            # Matrices are grouped by their wide orientation (rows <= cols): a tall W is
            # orthogonalised as W^T anyway, so (384, 128) and (128, 384) share one batched call.
            by_shape: dict[tuple, list[nn.Parameter]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[tuple(sorted(p.shape))].append(p)
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for ps in by_shape.values():
                grads = torch.stack([_wide(p.grad) for p in ps])
                state = self.state[ps[0]]
                buf = state.get("momentum_buffer")
                if buf is None or buf.shape != grads.shape:
                    buf = state["momentum_buffer"] = torch.zeros_like(grads)
                buf.mul_(mu).add_(grads)
                u = grads.add(buf, alpha=mu)
                if group.get("row_norm"):
                    u = _row_normalise(u, [p.size(0) > p.size(1) for p in ps])
                update = newton_schulz5(u, group["ns_steps"],
                                        ns_torch_dtype(group["ns_dtype"], grads.device),
                                        group.get("ns_coeffs", "classic"))
                for p, u in zip(ps, update, strict=True):
                    if wd:
                        p.mul_(1.0 - lr * wd)
                    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                    p.add_((u.mT if p.size(0) > p.size(1) else u).to(p.dtype), alpha=-lr * scale)


def _row_normalise(u: torch.Tensor, tall: list[bool]) -> torch.Tensor:
    """Each stored row of each matrix in the stack ``u`` (wide orientation) at unit L2 norm: a
    tall parameter's rows are the columns of its slice here. The norm is taken in fp32 and
    floored at 1e-7."""
    out = torch.empty_like(u)
    for i, t in enumerate(tall):
        n = u[i].float().norm(dim=0 if t else 1, keepdim=True).clamp_min(1e-7)
        out[i] = u[i] / n.to(u.dtype)
    return out


def _wide(g: torch.Tensor) -> torch.Tensor:
    return g.mT if g.size(0) > g.size(1) else g


def split_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameter groups: 'matrix' (Muon), 'embed' and 'scalar' (AdamW).

    Matrices are the weights of the model's bias-free ``Linear`` layers (attention, MLP and the
    BigramHash/value-embedding projections); embeddings are ``nn.Embedding`` tables (the tied
    output head included); everything else (gains, gates, mixes, skip weights) is 'scalar'.
    """
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "embed": [], "scalar": []}
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, nn.Embedding):
                groups["embed"].append(p)
            elif (
                isinstance(module, Linear)
                and p.dim() == 2
                and module is not getattr(model, "lm_head", None)
            ):
                groups["matrix"].append(p)
            elif module is getattr(model, "lm_head", None):
                groups["embed"].append(p)
            else:
                groups["scalar"].append(p)
    return groups


def build_optimizers(model: nn.Module, tc) -> list[torch.optim.Optimizer]:
    """Muon + AdamW from a :class:`~proteus.config.TrainConfig`; groups remember their base LR."""
    g = split_params(model)
    betas = (tc.adam_beta1, tc.adam_beta2)
    muon = Muon(
        g["matrix"],
        lr=tc.matrix_lr,
        momentum=tc.muon_momentum_start,
        ns_steps=tc.muon_ns_steps,
        weight_decay=tc.muon_wd,
        ns_dtype=tc.muon_ns_dtype,
        ns_coeffs=tc.muon_ns_coeffs,
        row_norm=tc.muon_row_norm,
    )
    adam = torch.optim.AdamW(
        [
            dict(params=g["embed"], lr=tc.embed_lr, weight_decay=tc.adam_wd),
            dict(params=g["scalar"], lr=tc.scalar_lr, weight_decay=tc.scalar_wd),
        ],
        betas=betas,
        eps=tc.adam_eps,
        foreach=True,
    )
    for opt in (muon, adam):
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return [muon, adam]


# ---------------------------------------------------------------------------------------------
# Schedules and weight averaging


def train_frac(step: int, tc, elapsed_ms: float) -> float:
    """How far training is, in [0, 1]: the larger of the step fraction and, with a wall-clock
    cap, the fraction of the cap spent."""
    frac = step / tc.iterations
    if tc.max_wallclock_s > 0:
        frac = max(frac, elapsed_ms / (tc.max_wallclock_s * 1000.0))
    return min(1.0, frac)


def lr_scale(step: int, tc, step_ms: float, elapsed_ms: float) -> float:
    """LR multiplier: linear ramp-up, then linear warm-down to ``min_lr`` at the step or time
    budget — over the last ``warmdown_frac`` of :func:`train_frac` when that is set, else over
    the last ``warmdown_steps`` (steps left estimated from the smoothed step time)."""
    ramp = min(1.0, (step + 1) / tc.lr_warmup_steps) if tc.lr_warmup_steps else 1.0
    if tc.warmdown_frac > 0:
        left = 1.0 - train_frac(step, tc, elapsed_ms)
        return ramp * max(tc.min_lr, min(1.0, left / tc.warmdown_frac))
    if tc.warmdown_steps <= 0:
        return ramp
    steps_left = tc.iterations - step
    if tc.max_wallclock_s > 0 and step_ms > 0:
        time_left_ms = max(0.0, tc.max_wallclock_s * 1000.0 - elapsed_ms)
        steps_left = min(steps_left, time_left_ms / step_ms)
    return ramp * max(tc.min_lr, min(1.0, steps_left / tc.warmdown_steps))


def muon_momentum(step: int, tc) -> float:
    if tc.muon_momentum_warmup <= 0:
        return tc.muon_momentum
    frac = min(1.0, step / tc.muon_momentum_warmup)
    return (1 - frac) * tc.muon_momentum_start + frac * tc.muon_momentum


class WeightAverages:
    """EMA of the weights, and an SWA mean of snapshots (of the EMA when it is on)."""

    def __init__(self, model: GPT, tc):
        self.ema_decay = tc.ema_decay
        self.ema = (
            {k: v.detach().clone().float() for k, v in model.state_dict().items()}
            if tc.ema_decay > 0 else None
        )
        self.swa: dict[str, torch.Tensor] | None = None
        self.swa_count = 0

    @torch.no_grad()
    def update_ema(self, model: GPT) -> None:
        if self.ema is None:
            return
        d = self.ema_decay
        for k, v in model.state_dict().items():
            self.ema[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    @torch.no_grad()
    def snapshot(self, model: GPT) -> None:
        src = self.ema if self.ema is not None else {
            k: v.detach().float() for k, v in model.state_dict().items()
        }
        if self.swa is None:
            self.swa = {k: v.clone() for k, v in src.items()}
        else:
            for k, v in src.items():
                self.swa[k].add_(v)
        self.swa_count += 1

    def state_dict(self) -> dict:
        return dict(ema=self.ema, swa=self.swa, swa_count=self.swa_count)

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        if (state["ema"] is None) != (self.ema is None):
            raise ConfigError("the training state's EMA does not match ema_decay")
        move = lambda d: None if d is None else {k: v.to(device) for k, v in d.items()}  # noqa: E731
        self.ema, self.swa = move(state["ema"]), move(state["swa"])
        self.swa_count = int(state["swa_count"])

    def final_state(self, model: GPT) -> tuple[dict[str, torch.Tensor], str]:
        ref = model.state_dict()
        if self.swa is not None:
            return {k: (v / self.swa_count).to(ref[k].dtype) for k, v in self.swa.items()}, (
                f"swa({self.swa_count})"
            )
        if self.ema is not None:
            return {k: v.to(ref[k].dtype) for k, v in self.ema.items()}, "ema"
        return ref, "raw"
