"""Softcapped cross-entropy kernel against float64 (interpreter on CPU, compiled on a GPU), its
three surfaces, autocast, torch.compile, and the model's training loss on it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from _autocast import AUTOCAST_CASES, autocast_device

from proteus.config import build_config
from proteus.kernels import (
    SoftcappedCrossEntropy,
    softcapped_ce,
    softcapped_ce_op,
    softcapped_ce_ref,
)
from proteus.kernels._testing import assert_within_2x_torch_error
from proteus.model import GPT
from proteus.ops import get_ops

pytestmark = pytest.mark.interpret
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CAP = 30.0


def _case(n, v, dtype, device, seed=0, scale=8.0, ignore=-100):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * scale).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[1::4] = ignore  # every fourth row from the second on is ignored
    return z.to(device), y.to(device)


def _grad_out(reduction, n, device):
    if reduction == "none":
        return torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
    return torch.tensor(1.7, device=device)


def _loss_and_grad(fn, z, y, dy, **kw):
    z = z.detach().clone().requires_grad_()
    loss = fn(z, y, CAP, **kw)
    (dz,) = torch.autograd.grad(loss, z, dy.to(loss.dtype))
    return loss.detach().cpu(), dz.cpu()


def check_bound(z, y, reduction="mean", ignore_index=-100, softcap=CAP):
    """The docstring's bound: loss and dz within 2x torch's error vs float64 + the floors."""
    n, v = z.shape
    kw = dict(reduction=reduction, ignore_index=ignore_index)
    dy = _grad_out(reduction, n, z.device)
    ours = _loss_and_grad(softcapped_ce, z, y, dy, **kw)
    torch_same = _loss_and_grad(softcapped_ce_ref, z, y, dy, **kw)
    ref64 = _loss_and_grad(softcapped_ce_ref, z.cpu().double(), y.cpu(), dy.cpu().double(),
                           **kw)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ref64[0].shape
    assert ours[1].dtype == z.dtype and ours[1].shape == z.shape
    loss_floor = 2**-22 * (softcap + math.log(v)) * (n if reduction == "sum" else 1)
    grad_floor = 2**-22 * ref64[1].abs().max().item()
    what = f"{z.dtype} {tuple(z.shape)} {reduction}"
    assert_within_2x_torch_error(f"loss {what}", ours[0], torch_same[0], ref64[0], loss_floor)
    assert_within_2x_torch_error(f"dz {what}", ours[1], torch_same[1], ref64[1], grad_floor)
    return ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vocab_1024_within_bound(dtype, reduction, device):
    z, y = _case(37, 1024, dtype, device)
    loss, dz = check_bound(z, y, reduction)
    ignored = (y == -100).cpu()
    assert torch.equal(dz[ignored], torch.zeros_like(dz[ignored]))
    if reduction == "none":
        assert torch.equal(loss[ignored], torch.zeros(int(ignored.sum())))


@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_8192_within_bound(dtype, device):
    z, y = _case(24, 8192, dtype, device, seed=2)
    check_bound(z, y, "mean")


@pytest.mark.parametrize("n, v", [(1, 1), (1, 7), (5, 1000), (3, 20001)])
def test_odd_shapes_and_several_vocabulary_blocks(n, v, device):
    # 20001 columns: three blocks of 8192, so the running max and sum are rescaled twice
    g = torch.Generator().manual_seed(n + v)
    z = (torch.randn(n, v, generator=g) * 20).to(device)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    loss, dz = check_bound(z, y, "sum")
    if v == 1:  # one class: the loss is 0 whatever the logit, and so is its gradient
        assert loss.item() == 0.0 and dz.abs().max().item() == 0.0


def test_extreme_logits(device):
    z = torch.randn(6, 300) * 4
    z[0, :5] = torch.tensor([float("inf"), float("-inf"), 1e30, -1e30, 3e4])
    z[1] = 5.0  # all equal: loss log V, gradient (1/V - onehot) * (1 - tanh²)
    z[2, 7] = 1e4  # the target far beyond the cap
    y = torch.tensor([0, 3, 7, 1, 299, 150])
    check_bound(z.to(device), y.to(device), "none")
    loss = softcapped_ce(z.to(device), y.to(device), CAP, reduction="none")
    assert loss[1].item() == pytest.approx(math.log(300), abs=1e-5)
    zn = z.clone()
    zn[4, 10] = float("nan")
    loss = softcapped_ce(zn.to(device), y.to(device), CAP, reduction="none").cpu()
    assert loss[4].isnan() and loss[[0, 1, 2, 3, 5]].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ignore_index_any_value_and_int32_targets(dtype, device):
    z, y = _case(29, 1024, dtype, device, seed=3, ignore=5)
    check_bound(z, y, "mean", ignore_index=5)
    a = softcapped_ce(z, y, CAP, ignore_index=5)
    b = softcapped_ce(z, y.int(), CAP, ignore_index=5)
    assert torch.equal(a, b)


def test_every_row_ignored_gives_nan_mean_zero_sum_and_zero_gradient(device):
    z = torch.randn(4, 64, device=device, requires_grad=True)
    y = torch.full((4,), -100, device=device)
    mean = softcapped_ce(z, y, CAP)
    ref = F.cross_entropy(CAP * torch.tanh(z.detach() / CAP), y)
    assert mean.isnan().item() and ref.isnan().item()
    total = softcapped_ce(z, y, CAP, reduction="sum")
    assert total.item() == 0.0
    (dz,) = torch.autograd.grad(total, z)
    assert torch.equal(dz, torch.zeros_like(dz))


def test_out_of_range_target_gives_nan_for_its_row_only(device):
    z = torch.randn(3, 16, device=device)
    loss = softcapped_ce(z, torch.tensor([16, 3, -2], device=device), CAP, reduction="none")
    assert loss[0].isnan() and loss[2].isnan() and loss[1].isfinite()


def test_strided_rows_and_transposed_logits(device):
    big = torch.randn(9, 1500, device=device) * 6
    y = torch.randint(0, 1000, (9,), device=device)
    rows = big[:, 200:1200]  # row stride 1500: read in place
    assert rows.stride() == (1500, 1)
    a = softcapped_ce(rows, y, CAP, reduction="none")
    assert torch.equal(a, softcapped_ce(rows.contiguous(), y, CAP, reduction="none"))
    cols = torch.randn(1000, 9, device=device).t()  # column stride 9: copied first
    b = softcapped_ce(cols, y, CAP, reduction="none")
    assert torch.equal(b, softcapped_ce(cols.contiguous(), y, CAP, reduction="none"))
    rows = rows.clone().requires_grad_()
    softcapped_ce(rows[::2], y[::2], CAP).backward()  # a strided view, through autograd
    assert rows.grad[1::2].abs().max().item() == 0.0 and rows.grad[::2].abs().max() > 0


def test_softcap_values(device):
    z, y = _case(11, 256, torch.float32, device, seed=4)
    for cap in (1.0, 5, 300.0):
        check_bound(z, y, "mean", softcap=cap)


# --- the three surfaces ---------------------------------------------------------------------


def test_module_op_and_function_agree(device):
    z, y = _case(10, 128, torch.float32, device)
    f = softcapped_ce(z, y, CAP, reduction="none")
    loss, lse = softcapped_ce_op(z, y, CAP)
    assert torch.equal(f, loss)
    assert torch.equal(torch.ops.proteus.softcapped_ce(z, y, CAP)[0], loss)
    lse64 = torch.logsumexp(CAP * torch.tanh(z.double() / CAP), dim=1)
    assert lse.shape == (10, 2)
    torch.testing.assert_close(lse.double().sum(1), lse64, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse[:, 0], (CAP * torch.tanh(z / CAP)).max(1).values)
    mod = SoftcappedCrossEntropy(CAP, reduction="sum")
    assert torch.equal(mod(z, y), loss.sum())
    assert "softcap=30.0, ignore_index=-100, reduction='sum'" in repr(mod)
    with pytest.raises(TypeError, match="softcap"):
        SoftcappedCrossEntropy()  # no silent default


def test_backward_saves_the_callers_logits_and_no_other_row_by_vocabulary_tensor(device):
    z = torch.randn(8, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 16, (8,), device=device)

    def saved_by(fn):
        big = []

        def pack(t):
            if t.dim() == 2 and t.shape[1] == 16:
                big.append((t.dtype, t.data_ptr() == z.data_ptr()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(z, y, CAP)
        return big

    assert saved_by(softcapped_ce) == [(torch.bfloat16, True)]  # the logits themselves
    assert saved_by(softcapped_ce_ref) == [(torch.float32, False)] * 3


def test_lse_is_not_differentiable(device):
    z = torch.randn(3, 8, device=device, requires_grad=True)
    loss, lse = softcapped_ce_op(z, torch.tensor([1, 2, 3], device=device), CAP)
    assert loss.requires_grad and not lse.requires_grad


def test_bad_inputs_are_clear_errors(device):
    z = torch.randn(4, 8, device=device)
    y = torch.tensor([1, 2, 3, 0], device=device)
    cases = [
        (TypeError, r"softcapped_ce: logits must be float16/bfloat16/float32, got torch.int64",
         (z.long(), y, CAP), {}),
        (TypeError, r"softcapped_ce: target must be int64/int32, got torch.float32",
         (z, y.float(), CAP), {}),
        (TypeError, r"logits must be a torch.Tensor", ([[1.0]], y, CAP), {}),
        (ValueError, r"logits must have 2 dimensions, got shape \(2, 2, 8\)",
         (z.view(2, 2, 8), y, CAP), {}),
        (ValueError, r"target has 3 entries but logits has 4 rows", (z, y[:3], CAP), {}),
        (ValueError, r"at least one class", (z[:, :0], y, CAP), {}),
        (ValueError, r"softcap must be a finite number > 0, got 0.0", (z, y, 0.0), {}),
        (ValueError, r"softcap must be a finite number > 0, got inf", (z, y, math.inf), {}),
        (TypeError, r"softcap must be a float, got Tensor", (z, y, torch.tensor(30.0)), {}),
        (ValueError, r"reduction must be one of mean, sum, none, got 'avg'", (z, y, CAP),
         dict(reduction="avg")),
        (TypeError, r"ignore_index must be an int, got float", (z, y, CAP),
         dict(ignore_index=-100.0)),
        (ValueError, r"on meta but logits is on", (z, y.to("meta"), CAP), {}),
    ]
    for exc, msg, args, kw in cases:
        with pytest.raises(exc, match=msg):
            softcapped_ce(*args, **kw)


# --- autocast and torch.compile -------------------------------------------------------------


AUTOCAST_CASES_COMPILED = [
    pytest.param(torch.float32, False, id="z32-eager"),
    pytest.param(torch.bfloat16, False, id="z16-eager"),
    pytest.param(torch.bfloat16, True, id="z16-compiled"),
]


@pytest.mark.parametrize("z_dtype, compiled", AUTOCAST_CASES_COMPILED)
@pytest.mark.parametrize("device_type, amp", AUTOCAST_CASES)
def test_under_autocast_matches_its_reference(device_type, amp, z_dtype, compiled):
    # cross-entropy runs in fp32 under autocast; ours passes the logits through uncast: the
    # same bits as without autocast, float32 like the reference, within the bound of it
    device = autocast_device(device_type)
    z, y = _case(19, 512, z_dtype, device, seed=5)
    z.requires_grad_()
    torch._dynamo.reset()
    fn = (torch.compile(softcapped_ce, fullgraph=True, backend="aot_eager") if compiled
          else softcapped_ce)
    with torch.autocast(device_type, amp):
        loss, ref, mod = fn(z, y, CAP), softcapped_ce_ref(z, y, CAP), SoftcappedCrossEntropy(
            CAP)(z, y)
    assert loss.dtype == ref.dtype == mod.dtype == torch.float32
    plain = softcapped_ce(z, y, CAP)
    assert torch.equal(loss, plain) and torch.equal(mod, plain)
    (dz,) = torch.autograd.grad(loss, z)
    (dz_plain,) = torch.autograd.grad(plain, z)
    (dz_ref,) = torch.autograd.grad(ref, z)
    assert dz.dtype == dz_ref.dtype == z_dtype and torch.equal(dz, dz_plain)
    z64 = z.detach().double().requires_grad_()
    ref64 = softcapped_ce_ref(z64, y, CAP)
    (dz64,) = torch.autograd.grad(ref64, z64)
    assert_within_2x_torch_error("loss", loss, ref, ref64, 2**-22 * (CAP + math.log(512)))
    assert_within_2x_torch_error("dz", dz, dz_ref, dz64, 2**-22 * dz64.abs().max().item())


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    z, y = _case(33, 256, torch.float32, device, seed=6)
    z.requires_grad_()

    def f(z, y):
        return softcapped_ce(z, y, CAP) + softcapped_ce(z, y, 5.0, reduction="none").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(z, y)
    (g,) = torch.autograd.grad(out, z)
    out_eager = f(z, y)
    (g_eager,) = torch.autograd.grad(out_eager, z)
    assert torch.equal(out, out_eager) and torch.equal(g, g_eager)


def test_opcheck(device):
    z, y = _case(8, 64, torch.float32, device)
    torch.library.opcheck(softcapped_ce_op, (z.requires_grad_(), y, CAP))
    y30 = y.clamp(min=0)  # class 30 (row 0) ignored instead; no -100 left (it would be NaN)
    torch.library.opcheck(softcapped_ce_op, (z.detach().bfloat16(), y30.int(), 2.0, 30))


# --- the model's training loss with --kernels triton ----------------------------------------


def _model_loss_and_grads(model, ops, idx, autocast):
    model.ops = ops
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_training_loss_on_the_kernel_within_bound_of_the_reference_head(autocast):
    # --kernels triton routes the loss through the kernel; the reference head (chunked, fp32
    # softcap and log-sum-exp) is the other path. Only the head differs here (ref MLP and
    # attention in both), so the loss and every parameter's gradient must meet the op's bound
    # against the float64 model.
    cfg = dataclasses.replace(build_config("smoke", environ={}).model, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(cfg, "ref")
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised projections: give every path signal
            p.add_(0.02 * torch.randn_like(p))
    assert get_ops("triton").softcapped_ce is softcapped_ce
    kernel_head = dataclasses.replace(get_ops("ref"), softcapped_ce=softcapped_ce)
    idx = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ours = _model_loss_and_grads(model, kernel_head, idx, autocast)
    ref = _model_loss_and_grads(model, get_ops("ref"), idx, autocast)
    model64 = GPT(cfg, "ref").double()
    model64.load_state_dict(model.state_dict())
    ref64 = _model_loss_and_grads(model64, get_ops("ref"), idx, False)
    assert ours[0].dtype == ref[0].dtype == torch.float32
    floor = 2**-22 * (cfg.logit_softcap + math.log(cfg.vocab_size))
    assert_within_2x_torch_error("loss", ours[0], ref[0], ref64[0], floor)
    names = [n for n, _ in model.named_parameters()]
    for name, a, b, r in zip(names, ours[1], ref[1], ref64[1], strict=True):
        assert_within_2x_torch_error(name, a, b, r, 2**-22 * r.abs().max().item())


def test_triton_model_uses_the_kernel_and_its_loss_matches_ref():
    # the whole --kernels triton model (every kernel) against --kernels ref, one step
    cfg = build_config("smoke", environ={}).model
    torch.manual_seed(0)
    model = GPT(cfg, "triton")
    calls = []
    kernel = get_ops("triton").softcapped_ce
    model.ops = dataclasses.replace(get_ops("triton"),
                                    softcapped_ce=lambda *a: calls.append(1) or kernel(*a))
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    loss = model(idx, idx)
    model.set_kernels("ref")
    assert calls and loss.item() == pytest.approx(model(idx, idx).item(), rel=1e-5)
    capless = GPT(dataclasses.replace(cfg, logit_softcap=0.0), "triton")
    assert capless(idx, idx).isfinite()  # no cap: the reference head, whatever the kernels


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("v", [1024, 8192, 50257])
def test_sweep_within_bound(v, dtype, reduction, device):
    z, y = _case(300, v, dtype, device, seed=v)
    check_bound(z, y, reduction)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_production_shape_on_gpu(dtype, reduction):
    z, y = _case(16384, 8192, dtype, "cuda", seed=7)
    check_bound(z, y, reduction)
