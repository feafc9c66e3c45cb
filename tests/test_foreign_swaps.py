"""Proof on a model we did not design (tests/foreign_gpt.py): the MLP and int6-linear swaps.

Each swap is one line of user code (``swap_mlp`` and ``swap_int6`` below are exactly what a
user writes). After it, the model computes the same function as before: the same loss and
gradients as the unswapped model, and ``torch.compile(fullgraph=True)`` with inductor compiles
forward and backward with no graph break, in fp32 and under bf16 autocast.

Tolerance (the flash-attention rule, applied to the whole model): for the logits, the loss and
every parameter's gradient, ``max|swapped − fp64| ≤ 2 · max|unswapped − fp64| + floor``, where
fp64 is the unswapped model run in float64: the swapped model is at most twice as far from the
exact function as PyTorch's own computation. The floor covers what a max-error ratio cannot
(PyTorch exact by luck; a gradient that is exactly zero in exact arithmetic, like a key bias'):
one rounding of the largest value, ``u · max|fp64|``, for the logits (``u`` = 2⁻²⁴ in fp32, 2⁻⁸
under bf16 autocast) and for gradients (the largest gradient of the model); ``16 · 2⁻²⁴ · loss``
for the loss, a mean of cross-entropies the model computes in fp32. For the int6 swap the
unswapped model holds the dequantised weights (the function the int6 model computes), and
the int6 weights themselves are frozen (no gradient).
"""

from __future__ import annotations

import copy

import pytest
import torch
from foreign_gpt import GPT, GPTConfig

from proteus.kernels import FusedLeakyReLU2MLP, Int6Linear, dequantize_int6, replace_linear_int6
from proteus.kernels._testing import assert_within_2x_torch_error

pytestmark = pytest.mark.interpret


def swap_mlp(model: GPT) -> None:
    for b in model.blocks:  # the swap is the one line below
        b.mlp = FusedLeakyReLU2MLP.from_linears(b.mlp.c_fc, b.mlp.c_proj, slope=b.mlp.slope)


def swap_int6(model: GPT, only: str = "") -> None:
    replace_linear_int6(model.blocks, filter=lambda name, linear: only in name)


def _model(device, bias=True) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(bias=bias)).to(device)


def _batch(device, b=2, t=32):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (b, t + 1), generator=g)
    return idx[:, :-1].contiguous().to(device), idx[:, 1:].contiguous().to(device)


def _run(model, idx, targets, amp=None, call=None):
    """Logits, loss and the gradient of every parameter that gets one (by name); ``call``
    (a compiled ``model``) runs the forward when given."""
    call = model if call is None else call
    model.zero_grad(set_to_none=True)
    with torch.autocast(idx.device.type, amp or torch.bfloat16, enabled=amp is not None):
        logits = call(idx)
        loss = call(idx, targets)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), loss.detach(), grads


def _unswapped_names(name: str) -> str:
    return name.replace(".mlp.fc.", ".mlp.c_fc.").replace(".mlp.proj.", ".mlp.c_proj.")


def _dequantised_copy(model: GPT, swapped: GPT) -> GPT:
    """``model`` with each weight that ``swapped`` holds in int6 replaced by its dequantised
    values: the function the int6 model computes, in ordinary Linears."""
    out = copy.deepcopy(model)
    layers = dict(out.named_modules())
    for name, mod in swapped.named_modules():
        if isinstance(mod, Int6Linear):
            w = dequantize_int6(mod.packed, mod.scale)
            layers[name].weight.data.copy_(w.to(layers[name].weight.dtype))
    return out


def _compare(ours, ref, ref64, amp, rename=lambda n: n):
    u = 2.0**-8 if amp is not None else 2.0**-24
    assert_within_2x_torch_error("logits", ours[0].cpu(), ref[0].cpu(), ref64[0].cpu(),
                                 u * ref64[0].abs().max().item())
    assert_within_2x_torch_error("loss", ours[1].cpu(), ref[1].cpu(), ref64[1].cpu(),
                                 16 * 2.0**-24 * ref64[1].abs().item())
    names = {rename(n) for n in ours[2]}
    assert names == set(ref[2]), f"parameters with gradients differ: {names ^ set(ref[2])}"
    g_floor = u * max(g.abs().max().item() for g in ref64[2].values())
    for name, g in ours[2].items():
        n = rename(name)
        assert g.dtype == ref[2][n].dtype == torch.float32, name
        assert_within_2x_torch_error(f"grad {n}", g.cpu(), ref[2][n].cpu(), ref64[2][n].cpu(),
                                     g_floor)


def _fp64(model, idx, targets):
    return _run(copy.deepcopy(model).double(), idx, targets)


AMP = pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
BIAS = pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])


def _model_and_swapped(device, bias, swap):
    model = _model(device, bias)
    swapped = copy.deepcopy(model)
    swap(swapped)
    return model, swapped


@AMP
@BIAS
def test_mlp_swap_matches_the_unswapped_model(device, bias, amp):
    model, swapped = _model_and_swapped(device, bias, swap_mlp)
    assert all(isinstance(b.mlp, FusedLeakyReLU2MLP) and b.mlp.slope == 0.5
               for b in swapped.blocks)
    idx, targets = _batch(device)
    _compare(_run(swapped, idx, targets, amp), _run(model, idx, targets, amp),
             _fp64(model, idx, targets), amp, _unswapped_names)


@AMP
@BIAS
def test_int6_swap_matches_the_dequantised_model(device, bias, amp):
    model, swapped = _model_and_swapped(device, bias, swap_int6)
    n_int6 = sum(isinstance(m, Int6Linear) for m in swapped.modules())
    assert n_int6 == 6 * len(swapped.blocks)  # q, k, v, proj, fc, proj per block
    reference = _dequantised_copy(model, swapped)
    idx, targets = _batch(device)
    ours = _run(swapped, idx, targets, amp)
    # the quantised weights are buffers: gradients reach everything else (embeddings, norms,
    # biases) through the int6 layers' dgrad, as LoRA / test-time training need
    ref = _run(reference, idx, targets, amp)
    ref = (ref[0], ref[1], {n: g for n, g in ref[2].items() if n in ours[2]})
    ref64 = _fp64(reference, idx, targets)
    _compare(ours, ref, ref64, amp)
    assert "wte.weight" in ours[2] and "blocks.0.ln_1.weight" in ours[2]


COMPILE_CASES = [
    pytest.param(amp, backend, id=f"{backend}-{name}", marks=[pytest.mark.slow] * (backend ==
                                                                                  "inductor"))
    for backend in ("aot_eager", "inductor")
    for amp, name in ((None, "fp32"), (torch.bfloat16, "bf16-autocast"))
]


@pytest.mark.parametrize("amp, backend", COMPILE_CASES)
def test_swapped_model_compiles_fullgraph(device, amp, backend):
    # both swaps in one model (int6 on the attention's linears, the fused MLP after them), so
    # one compile covers every op; fullgraph=True raises on any graph break. aot_eager (dynamo
    # and AOTAutograd: the graph capture and the fake implementations) runs by default; inductor
    # (30-90 s per compile on 2 CPU cores, cold cache the slower) under -m slow
    model = _model(device, bias=True)
    swap_int6(model, only="attn")
    swap_mlp(model)
    idx, targets = _batch(device)
    eager = _run(model, idx, targets, amp)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = _run(model, idx, targets, amp, call=compiled)
    tol = dict(rtol=2e-2, atol=2e-2) if amp is not None else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0], eager[0], **tol)
    torch.testing.assert_close(got[1], eager[1], **tol)
    assert set(got[2]) == set(eager[2])
    for name, g in got[2].items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, eager[2][name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("order", ["mlp-then-int6", "int6-then-mlp"])
@AMP
def test_both_swaps_compose_in_either_order(device, order, amp):
    # issue 23: from_linears then replace_linear_int6 used to be accepted and then crash in the
    # forward (the fused MLP read fc.weight, which an Int6Linear has not); the reverse order
    # was refused. Both orders now give the same model: int6 fc/proj inside the fused MLP,
    # computing the dequantised model's function within the flash-attention rule.
    torch.manual_seed(0)
    model = GPT(GPTConfig(bias=True, n_layer=1)).to(device)
    swapped = copy.deepcopy(model)
    if order == "mlp-then-int6":
        swap_mlp(swapped)
        swap_int6(swapped)
    else:
        swap_int6(swapped)
        swap_mlp(swapped)
    for b in swapped.blocks:
        assert isinstance(b.mlp, FusedLeakyReLU2MLP)
        assert isinstance(b.mlp.fc, Int6Linear) and isinstance(b.mlp.proj, Int6Linear)
    assert sum(isinstance(m, Int6Linear) for m in swapped.modules()) == 6 * len(swapped.blocks)
    named = {_unswapped_names(n + ".")[:-1]: m for n, m in swapped.named_modules()}
    reference = copy.deepcopy(model)
    for name, mod in reference.named_modules():
        if isinstance(named.get(name), Int6Linear):
            w = dequantize_int6(named[name].packed, named[name].scale)
            mod.weight.data.copy_(w.to(mod.weight.dtype))
    idx, targets = _batch(device, b=1, t=16)
    ours = _run(swapped, idx, targets, amp)
    ref = _run(reference, idx, targets, amp)
    ref = (ref[0], ref[1], {n: g for n, g in ref[2].items()
                            if n in {_unswapped_names(k) for k in ours[2]}})
    _compare(ours, ref, _fp64(reference, idx, targets), amp, _unswapped_names)
