"""Document masks (per-row ids and packed cu_seqlens) and sliding windows of XSA attention,
against a float64 reference built from explicitly masked attention."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
from _kernel_checks import assert_within_2x_torch_error

from proteus.data import bundled_val_glob, load_tokens
from proteus.kernels.xsa_attention import (
    _launch_bwd,
    _launch_fwd,
    _segments_from_ids,
    attention_mask,
    doc_ids_from_bos,
    mask_tiles,
    xsa_attention,
    xsa_attention_ref,
    xsa_attention_varlen,
    xsa_attention_varlen_ref,
)

pytestmark = pytest.mark.interpret
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-6, torch.bfloat16: 1e-6}  # see kernel docstring


def explicit_ref64(q, k, v, mask, xsa, scale=None):
    """Masked attention written out in float64 (no SDPA): q (B,H,T,D), k/v (B,KV,T,D), mask
    (B or 1, T, T) bool."""
    q, k, v = q.double(), k.double(), v.double()
    h, kvh, d = q.shape[1], k.shape[1], q.shape[-1]
    kr, vr = (x.repeat_interleave(h // kvh, dim=1) for x in (k, v))
    s = torch.einsum("bhid,bhjd->bhij", q, kr) * (scale or d ** -0.5)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    a = torch.einsum("bhij,bhjd->bhid", torch.softmax(s, dim=-1), vr)
    if xsa:
        u = torch.nn.functional.normalize(vr, dim=-1, eps=1e-6)
        a = a - (a * u).sum(-1, keepdim=True) * u
    return a


def lengths_to_ids(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def _inputs(b, h, kv, t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(b, h, t, d), mk(b, kv, t, d), mk(b, kv, t, d), mk(b, h, t, d)


def _run(fn, q, k, v, do, dtype, device, **kw):
    leaves = [x.to(dtype).to(device).requires_grad_() for x in (q, k, v)]
    o = fn(*leaves, **kw)
    grads = torch.autograd.grad(o, leaves, do.to(dtype).to(device))
    return [o.detach().cpu()] + [g.cpu() for g in grads]


def _check(q, k, v, do, dtype, device, xsa, window, ids):
    """Ours and torch-in-dtype against the explicit float64 reference (2x rule)."""
    t = q.shape[2]
    mask = attention_mask(t, window, ids)
    kw = dict(xsa=xsa, window_size=(window, 0), doc_ids=None if ids is None else ids.to(device))
    ref64 = _run(lambda *a: explicit_ref64(*a, mask, xsa), q, k, v, do, torch.float64, "cpu")
    torch_same = _run(xsa_attention_ref, q, k, v, do, dtype, "cpu",
                      **{**kw, "doc_ids": ids})
    ours = _run(xsa_attention, q, k, v, do, dtype, device, **kw)
    for name, a, b_, r in zip(("o", "dq", "dk", "dv"), ours, torch_same, ref64, strict=True):
        assert a.dtype == dtype and a.shape == r.shape
        assert_within_2x_torch_error(f"{name} {dtype} xsa={xsa} window={window}", a, b_, r,
                                     FLOOR[dtype])


T0 = 150  # three 64-row tiles on the interpreter, the last one partial
DOCS = {
    "one spanning the sequence": [T0],
    "length-1 documents": [1, 1, 60, 1, 86, 1],
    "crossing tile edges": [63, 2, 64, 21],
    "many tiny ones": [1, 2, 3, 1, 5, 2, 1, 4, 3, 2, 1, 1, 6, 2, 3] * 3 + [39],
}
assert all(sum(lengths) == T0 for lengths in DOCS.values())

DEFAULT = [
    # (docs, window, xsa, kv, dtype)
    ("one spanning the sequence", -1, True, 2, torch.float32),
    ("length-1 documents", -1, True, 1, torch.float32),
    ("crossing tile edges", -1, False, 4, torch.float32),
    ("many tiny ones", -1, True, 2, torch.float32),
    (None, 0, True, 2, torch.float32),  # window 1: each query sees itself only
    (None, 170, False, 1, torch.float32),  # window >= T: plain causal
    (None, 40, True, 4, torch.float32),
    ("crossing tile edges", 30, True, 2, torch.float32),
    ("many tiny ones", 0, False, 2, torch.float32),
    ("crossing tile edges", -1, True, 2, torch.bfloat16),
    (None, 40, True, 1, torch.bfloat16),
    ("length-1 documents", 30, True, 2, torch.float16),
]


@pytest.mark.parametrize("docs, window, xsa, kv, dtype", DEFAULT)
def test_masked_forward_and_gradients_within_2x_torch_error(docs, window, xsa, kv, dtype,
                                                            device):
    q, k, v, do = _inputs(1, 4, kv, T0, 32, seed=window + 2 + len(docs or ""))
    ids = None if docs is None else lengths_to_ids(DOCS[docs])[None]
    _check(q, k, v, do, dtype, device, xsa, window, ids)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv", [1, 2, 4])
@pytest.mark.parametrize("xsa", [True, False])
@pytest.mark.parametrize("window", [-1, 0, 1, 40, 63, 64, 200])
@pytest.mark.parametrize("docs", [None, *DOCS])
def test_full_cross_product(docs, window, xsa, kv, dtype, device):
    q, k, v, do = _inputs(1, 4, kv, T0, 32, seed=7)
    ids = None if docs is None else lengths_to_ids(DOCS[docs])[None]
    _check(q, k, v, do, dtype, device, xsa, window, ids)


def test_batched_rows_with_their_own_documents(device):
    # Two rows with different documents; ids that restart and repeat (a run is a document).
    q, k, v, do = _inputs(2, 2, 1, 100, 16, seed=4)
    ids = torch.stack((lengths_to_ids([30, 1, 69]), torch.tensor([5] * 40 + [2] * 20 + [5] * 40)))
    _check(q, k, v, do, torch.float32, device, True, 25, ids)


def test_explicit_reference_agrees_with_the_sdpa_reference():
    q, k, v, _ = _inputs(2, 4, 2, 40, 16, seed=5)
    ids = torch.stack((lengths_to_ids([10, 1, 29]), lengths_to_ids([40])))
    for window in (-1, 0, 7):
        mask = attention_mask(40, window, ids)
        want = explicit_ref64(q, k, v, mask, True)
        got = xsa_attention_ref(q, k, v, xsa=True, window_size=(window, 0), doc_ids=ids)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_doc_ids_from_bos_starts_a_document_at_each_bos():
    tokens = torch.tensor([[5, 1, 7, 7, 1, 1, 9], [1, 3, 4, 5, 1, 2, 2]])
    ids = doc_ids_from_bos(tokens)
    assert ids.tolist() == [[0, 1, 1, 1, 2, 3, 3], [1, 1, 1, 1, 2, 2, 2]]
    seg = _segments_from_ids(ids)
    assert seg[0].tolist() == [[0, 1, 1, 1, 4, 5, 5], [0, 0, 0, 0, 4, 4, 4]]
    assert seg[1].tolist() == [[1, 4, 4, 4, 5, 7, 7], [4, 4, 4, 4, 7, 7, 7]]


# --- varlen (packed) ---------------------------------------------------------------------------


def _packed(lengths, h, kv, d, seed=0):
    total = sum(lengths)
    q, k, v, do = _inputs(1, h, kv, total, d, seed)
    packed = [x[0].transpose(0, 1).contiguous() for x in (q, k, v, do)]  # (total, heads, D)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return (*packed, cu, max(lengths))


@pytest.mark.parametrize("lengths, window, xsa, dtype", [
    ([1, 70, 1, 3, 90, 35], -1, True, torch.float32),
    ([64, 64, 1, 63], 20, False, torch.float32),
    ([200], 0, True, torch.bfloat16),
    ([5, 0, 40, 0, 12], -1, True, torch.float32),  # empty documents hold no tokens
])
def test_varlen_matches_explicit_reference(lengths, window, xsa, dtype, device):
    q, k, v, do, cu, maxlen = _packed(lengths, 4, 2, 32, seed=len(lengths))
    total = q.shape[0]
    ids = lengths_to_ids(lengths)[None]
    mask = attention_mask(total, window, ids)

    def as_bhtd(fn):
        def run(q_, k_, v_, **kw):
            out = fn(q_[0].transpose(0, 1), k_[0].transpose(0, 1), v_[0].transpose(0, 1), **kw)
            return out.transpose(0, 1)[None]
        return run

    kw = dict(xsa=xsa, window_size=(window, 0))
    bhtd = [x.transpose(0, 1)[None] for x in (q, k, v, do)]
    ref64 = _run(lambda *a: explicit_ref64(*a, mask, xsa), *bhtd, torch.float64, "cpu")
    torch_same = _run(as_bhtd(lambda *a, **kw_: xsa_attention_varlen_ref(*a, cu, maxlen, **kw_)),
                      *bhtd, dtype, "cpu", **kw)
    cud = cu.to(device)
    ours = _run(as_bhtd(lambda *a, **kw_: xsa_attention_varlen(*a, cud, maxlen, **kw_)),
                *bhtd, dtype, device, **kw)
    for name, a, b_, r in zip(("o", "dq", "dk", "dv"), ours, torch_same, ref64, strict=True):
        assert_within_2x_torch_error(f"varlen {name} {dtype}", a, b_, r, FLOOR[dtype])


def test_varlen_equals_batched_doc_ids_bit_for_bit(device):
    # The packed stream and the same stream as one row with document ids are the same launch.
    q, k, v, _, cu, maxlen = _packed([17, 1, 80, 30], 4, 1, 16, seed=2)
    ids = lengths_to_ids([17, 1, 80, 30])[None].to(device)
    q, k, v = (x.float().to(device) for x in (q, k, v))
    a = xsa_attention_varlen(q, k, v, cu.to(device), maxlen, xsa=True, window_size=(9, 0))
    b = xsa_attention(q[None], k[None], v[None], xsa=True, layout="bthd", window_size=(9, 0),
                      doc_ids=ids)[0]
    assert torch.equal(a, b)


# --- work proportional to what is unmasked ----------------------------------------------------


def _brute_force_tiles(mask: torch.Tensor, bm: int, bn: int) -> int:
    """Tiles holding at least one visible (query, key) pair, over all rows of ``mask``."""
    b, t, _ = mask.shape
    nq, nk = triton.cdiv(t, bm), triton.cdiv(t, bn)
    padded = torch.zeros(b, nq * bm, nk * bn, dtype=torch.bool)
    padded[:, :t, :t] = mask
    return int(padded.view(b, nq, bm, nk, bn).any(4).any(2).sum())


@pytest.mark.parametrize("docs, window, saves", [
    (None, -1, False), (None, 0, True), (None, 63, True), (None, 64, True), (None, 65, False),
    ("crossing tile edges", -1, True), ("many tiny ones", 10, True),
    ("length-1 documents", 100, False),
])
def test_kernels_visit_exactly_the_tiles_with_a_visible_pair(docs, window, saves, device):
    b, h, kv, t, d = 1, 2, 1, T0, 16
    q, k, v, do = (x.float().to(device) for x in _inputs(b, h, kv, t, d))
    ids = None if docs is None else lengths_to_ids(DOCS[docs])[None]
    seg = None if ids is None else _segments_from_ids(ids).to(device)
    bm = bn = 64  # the interpreter's blocks (kernels._blocks)
    fwd = torch.zeros(b * h * triton.cdiv(t, bm), dtype=torch.int32, device=device)
    dq = torch.zeros_like(fwd)
    dkdv = torch.zeros(b * kv * triton.cdiv(t, bn), dtype=torch.int32, device=device)
    o, lse, sx = _launch_fwd(q, k, v, seg, 0.25, True, "bhtd", window, tiles=fwd)
    _launch_bwd(q, k, v, o, lse, sx, do, seg, 0.25, True, "bhtd", window, tiles=(dkdv, dq))
    want = _brute_force_tiles(attention_mask(t, window, ids).expand(b, t, t), bm, bn)
    group = h // kv
    assert int(fwd.sum()) == h * want
    assert int(dq.sum()) == h * want
    assert int(dkdv.sum()) == kv * group * want
    pred = mask_tiles(t, window=window, doc_ids=ids, block_m=bm, block_n=bn)
    assert pred["fwd"] == pred["dkdv"] == want
    assert (want < pred["causal_fwd"]) == saves


def test_mask_tiles_at_production_blocks_against_brute_force():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 700, (40,), generator=g).tolist()
    ids = lengths_to_ids(lengths)[: 2 * 2048].view(2, 2048)
    for window in (-1, 511):
        mask = attention_mask(2048, window, ids)
        for bm, bn in ((128, 64), (64, 64)):  # the forward's and the backward's blocks
            pred = mask_tiles(2048, window=window, doc_ids=ids, block_m=bm, block_n=bn)
            assert pred["fwd"] == pred["dkdv"] == _brute_force_tiles(mask, bm, bn)
            assert pred["fwd"] < pred["causal_fwd"]


# --- properties -------------------------------------------------------------------------------


def test_masked_backward_is_deterministic(device):
    q, k, v, do = _inputs(2, 4, 2, 100, 32, seed=1)
    ids = torch.stack((lengths_to_ids([30, 1, 69]), lengths_to_ids([50, 50]))).to(device)
    kw = dict(xsa=True, window_size=(33, 0), doc_ids=ids)
    a = _run(xsa_attention, q, k, v, do, torch.float32, device, **kw)
    b = _run(xsa_attention, q, k, v, do, torch.float32, device, **kw)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_gradcheck_masked(device):
    # fp32 kernel, loosened tolerances (see test_xsa_attention.test_gradcheck_tiny).
    q, k, v, _ = _inputs(1, 2, 1, 12, 16, seed=3)
    ids = lengths_to_ids([3, 1, 8])[None].to(device)
    leaves = [x.float().to(device).requires_grad_() for x in (q, k, v)]
    fn = lambda a, b, c: xsa_attention(a, b, c, xsa=True, window_size=(4, 0),  # noqa: E731
                                       doc_ids=ids)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-3, atol=1e-2, rtol=1e-2, fast_mode=True)


def test_reference_gradcheck_float64_masked():
    q, k, v, _ = _inputs(1, 2, 1, 10, 8, seed=3)
    ids = lengths_to_ids([3, 1, 6])[None]
    leaves = [x.requires_grad_() for x in (q, k, v)]
    fn = lambda a, b, c: xsa_attention_ref(a, b, c, xsa=True, window_size=(4, 0),  # noqa: E731
                                           doc_ids=ids)
    assert torch.autograd.gradcheck(fn, leaves)


def test_no_information_crosses_a_document_boundary(device):
    q, k, v, _ = (x.float().to(device) for x in _inputs(1, 2, 1, 90, 16, seed=6))
    ids = lengths_to_ids([40, 50])[None].to(device)
    o1 = xsa_attention(q, k, v, xsa=True, doc_ids=ids)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, :40] = torch.randn_like(x[:, :, :40])
    o2 = xsa_attention(q2, k2, v2, xsa=True, doc_ids=ids)
    assert torch.equal(o1[:, :, 40:], o2[:, :, 40:])
    assert not torch.equal(o1[:, :, :40], o2[:, :, :40])


def test_torch_compile_fullgraph_with_masks(device):
    torch._dynamo.reset()
    q, k, v, *_ = _packed([20, 1, 12], 4, 2, 16)
    cu = torch.tensor([0, 20, 21, 33], dtype=torch.int32, device=device)
    leaves = [x.float().to(device).requires_grad_() for x in (q, k, v)]

    def loss(a, b, c):
        return xsa_attention_varlen(a, b, c, cu, 20, xsa=True, window_size=(5, 0)).square().sum()

    f = torch.compile(loss, fullgraph=True, backend="aot_eager")
    f(*leaves).backward()
    got = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    loss(*leaves).backward()
    for a, x in zip(got, leaves, strict=True):
        torch.testing.assert_close(a, x.grad)


# --- bad input: one line naming the op, the argument, what it got and what it expects ----------


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_bad_varlen_inputs(device):
    q, k, v, _, cu, maxlen = _packed([5, 7], 2, 1, 16)
    q, k, v = (x.float().to(device) for x in (q, k, v))
    cu = cu.to(device)
    i32 = dict(dtype=torch.int32, device=device)
    cases = [
        (torch.tensor([1, 5, 12], **i32), ValueError, "cu_seqlens must start at 0, got 1"),
        (torch.tensor([0, 7, 5, 12], **i32), ValueError,
         "cu_seqlens must be non-decreasing, got entry 2 = 5 after 7"),
        (torch.tensor([0, 5, 11], **i32), ValueError,
         r"cu_seqlens must end at total_T = 12 \(q.shape\[0\]\), got 11"),
        (cu.long(), TypeError, "cu_seqlens must be int32, got torch.int64"),
        (cu.to("meta"), ValueError, "cu_seqlens is on meta but q is on"),
        (cu[None], ValueError, "cu_seqlens must have 1 dimensions"),
        (cu[:1], ValueError, "cu_seqlens must hold num_docs \\+ 1 >= 2 entries"),
    ]
    for bad, exc, pattern in cases:
        with pytest.raises(exc, match=pattern) as e:
            xsa_attention_varlen(q, k, v, bad, maxlen)
        assert _one_line(e).startswith("xsa_attention_varlen: ")
    with pytest.raises(ValueError, match="max_seqlen = 6 is less than the longest document") as e:
        xsa_attention_varlen(q, k, v, cu, 6)
    with pytest.raises(ValueError, match=r"expects packed q \(total_T, H, D\)"):
        xsa_attention_varlen(q, k[:-1], v[:-1], cu, maxlen)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        xsa_attention_varlen(q[None], k, v, cu, maxlen)


@pytest.mark.parametrize("window_size, exc, pattern", [
    ((-2, 0), ValueError, r"window_size\[0\] must be -1 \(no window\) or >= 0"),
    ((4, 1), ValueError, r"window_size\[1\] must be 0 \(or -1\) for causal attention"),
    ((4,), TypeError, "window_size must be a pair of ints"),
    ((2.0, 0), TypeError, "window_size must be a pair of ints"),
])
def test_bad_window(window_size, exc, pattern, device):
    q = torch.randn(1, 2, 8, 16, device=device)
    with pytest.raises(exc, match=pattern) as e:
        xsa_attention(q, q, q, window_size=window_size)
    assert _one_line(e).startswith("xsa_attention: ")
    cu = torch.tensor([0, 8], dtype=torch.int32, device=device)
    with pytest.raises(exc, match=pattern):
        xsa_attention_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1),
                             cu, 8, window_size=window_size)


def test_bad_doc_ids(device):
    q = torch.randn(2, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match=r"doc_ids must be \(B, T\) = \(2, 8\)"):
        xsa_attention(q, q, q, doc_ids=torch.zeros(2, 7, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="doc_ids must be an integer tensor, got torch.float32"):
        xsa_attention(q, q, q, doc_ids=torch.zeros(2, 8, device=device))
    with pytest.raises(ValueError, match="doc_ids is on meta"):
        xsa_attention(q, q, q, doc_ids=torch.zeros(2, 8, dtype=torch.long, device="meta"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [-1, 511])
def test_production_shape_with_validation_documents_on_gpu(dtype, window):
    q, k, v, do = _inputs(8, 8, 4, 2048, 64, seed=9)
    ids = doc_ids_from_bos(load_tokens(bundled_val_glob(), "val", limit=8 * 2048).view(8, 2048))
    _check(q, k, v, do, dtype, "cuda", True, window, ids)
