"""Training step of the cpu-tiny shape (4 layers, dim 128, 4/2 heads, batch 8x256): tokens/s.

Two groups: ``bf16`` runs every provider under bf16 autocast, as the cpu-tiny preset trains
(``autocast_bf16=on``); ``fp32`` runs them without autocast. Providers, side by side in one
run (forward + backward + optimiser step, ``--kernels ref``):
``plain-eager`` — the original challenge design (benchmarks/plain_gpt.py) with AdamW;
``proteus-eager`` — the PROTEUS model with Muon + AdamW; ``proteus-compile`` — the same under
``torch.compile`` (what the cpu-tiny preset trains with); ``proteus-eager-plain-features`` —
the PROTEUS model code with the plain design's features only (no XSA, BigramHash, value
embeddings, SmearGate or layer-norm scale; full RoPE; ReLU²) and the plain design's AdamW: the
like-for-like comparison of the two code bases, separating the cost of the reference model's
extra features and of Muon from the cost of the package. Each provider first checks that a
step is finite and lowers the loss over a few steps on a fixed batch, then is timed.
Read the ratio column of ``proteus bench``: tokens/s = batch / median time.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from proteus.data import TokenStream, bundled_train_glob
from proteus.model import GPT
from proteus.optim import build_optimizers
from proteus.options import build_config

from .conftest import Case, run_timed
from .plain_gpt import PlainGPT

BATCH, SEQ = 8, 256


def _make(provider: str, autocast: bool = False):
    torch.manual_seed(0)
    cfg = build_config("cpu-tiny", environ={})
    if provider == "plain-eager":
        model = PlainGPT()
        opts = [torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), fused=False)]
        fwd = model
    elif provider == "proteus-eager-plain-features":
        m = cfg.model
        m = dataclasses.replace(m, xsa_last_n=0, bigram_buckets=0, value_embed_layers="",
                                smear_gate=False, ln_scale=False,
                                rope_dims=m.model_dim // m.num_heads, mlp_slope=0.0)
        model = GPT(m, "ref")
        opts = [torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), fused=False)]
        fwd = model
    else:
        model = GPT(cfg.model, "ref")
        opts = build_optimizers(model, cfg.train)
        fwd = torch.compile(model, dynamic=False) if provider == "proteus-compile" else model
    x, y = TokenStream(bundled_train_glob()).next_batch(BATCH * SEQ, SEQ)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fwd(x, y)
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("provider", ["plain-eager", "proteus-eager-plain-features",
                                      "proteus-eager", "proteus-compile"])
def test_bench_train_step(benchmark, provider, precision):
    step = _make(provider, autocast=precision == "bf16")
    first = step()
    for _ in range(4):
        last = step()
    assert torch.isfinite(first) and last < first, (first, last)  # check, then time
    run_timed(benchmark, step, case=Case(f"train-step {precision}", f"cpu-tiny {BATCH}x{SEQ}"),
              provider=provider, tokens=BATCH * SEQ, baseline=provider == "plain-eager",
              rounds=10, warmup=2)
