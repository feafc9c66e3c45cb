"""The benchmark harness's own pieces on CPU: peers compute the reference's function (or say in
one line why they cannot run here), the sort-based table counts like the dictionary, the
memory probe sees an allocation, and percentiles interpolate like numpy."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the benchmarks/ package

from benchmarks import peers  # noqa: E402
from benchmarks.conftest import (  # noqa: E402
    MEM_KIND,
    MemoryPeak,
    _quantile,
    estimate_s,
    pytest_collection_modifyitems,
)
from proteus.kernels.leaky_relu2 import leaky_relu2_mlp_ref, leaky_relu2_ref  # noqa: E402
from proteus.kernels.ngram_table import NgramTableRef  # noqa: E402
from proteus.kernels.softcapped_ce import softcapped_ce_ref  # noqa: E402
from proteus.kernels.xsa_attention import xsa_attention_ref  # noqa: E402


def _qkv(b=1, h=4, kv=2, t=32, d=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, n, t, d, generator=g, dtype=torch.float64) for n in (h, kv, kv)]


def test_missing_package_is_unavailable_with_a_one_line_reason():
    with pytest.raises(peers.Unavailable) as e:
        peers._import("no_such_peer_package_xyz", "NoSuchPeer")
    msg = str(e.value)
    assert "NoSuchPeer is not installed" in msg and "\n" not in msg


def test_sdpa_math_peer_is_the_reference_and_cpu_lacks_the_cuda_backends():
    q, k, v = _qkv()
    peer = peers.attention_peer("sdpa-math", q, k, v)
    assert peer.layout == "bhtd"
    torch.testing.assert_close(peer.fn(q, k, v), xsa_attention_ref(q, k, v, xsa=True),
                               rtol=0, atol=1e-12)
    if not torch.cuda.is_available():
        for name in ("sdpa-efficient", "sdpa-cudnn"):
            with pytest.raises(peers.Unavailable, match="backend has no kernel here"):
                peers.attention_peer(name, q.float(), k.float(), v.float())


def test_flash_layout_post_op_equals_the_reference_projection():
    q, k, v = _qkv(b=2, h=6, kv=3)
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         enable_gqa=True)
    got = peers.xsa_post_op_bthd(a.transpose(1, 2).contiguous(),
                                 v.transpose(1, 2).contiguous()).transpose(1, 2)
    torch.testing.assert_close(got, xsa_attention_ref(q, k, v, xsa=True), rtol=0, atol=1e-12)
    bthd = peers.AttentionPeer(lambda *a: None, "bthd")
    assert bthd.native(q).shape == (2, 32, 6, 16) and torch.equal(bthd.bhtd(bthd.native(q)), q)


def test_flash_attn_peers_skip_with_a_reason_where_they_cannot_run():
    q, k, v = _qkv()
    for name in ("flash-attn", "fa3"):
        try:
            peers.attention_peer(name, q, k, v)
        except peers.Unavailable as e:
            assert str(e) and "\n" not in str(e)
        else:
            assert torch.cuda.is_available(), f"{name} claimed to run without a GPU"


def test_liger_relu_squared_is_our_op_at_slope_0_or_unavailable():
    try:
        act = peers.liger_relu_squared()
    except peers.Unavailable as e:
        assert "Liger-Kernel" in str(e)
        return
    x = torch.randn(8, 64)
    w_up, w_dn = torch.randn(96, 64), torch.randn(64, 96)
    assert torch.equal(act(x), leaky_relu2_ref(x, 0.0))
    torch.testing.assert_close(torch.nn.functional.linear(act(x @ w_up.t()), w_dn),
                               leaky_relu2_mlp_ref(x, w_up, w_dn, 0.0))


def test_liger_fused_linear_ce_is_our_head_or_unavailable():
    try:
        fused = peers.liger_fused_linear_softcapped_ce()
    except peers.Unavailable as e:
        assert "Liger-Kernel" in str(e) and "\n" not in str(e)
        return
    if not torch.cuda.is_available():
        return  # Liger's kernels need a GPU; the benchmark records that skip itself
    x, w = torch.randn(64, 32, device="cuda"), torch.randn(128, 32, device="cuda")
    y = torch.randint(0, 128, (64,), device="cuda")
    torch.testing.assert_close(fused(x, w, y, 30.0),
                               softcapped_ce_ref(torch.nn.functional.linear(x, w), y, 30.0))


def test_torchao_int8_is_close_or_unavailable():
    w = torch.randn(96, 128)
    try:
        lin = peers.torchao_linear("torchao-int8", w)
    except peers.Unavailable as e:
        assert "torchao" in str(e) and "\n" not in str(e)
        return
    x = torch.randn(4, 128)
    ref = x @ w.t()
    assert ((lin(x) - ref).norm() / ref.norm()).item() < 2e-2


def test_sorted_counts_table_counts_like_the_dictionary():
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 1 << 40, (3000,), generator=g)
    keys = torch.cat([keys, keys[:500], keys[:7]])  # repeats accumulate
    ours, ref = peers.SortedCountsTable(), NgramTableRef()
    probe = torch.cat([keys[:100], torch.randint(1 << 41, 1 << 42, (50,), generator=g)])
    assert torch.equal(ours.lookup(probe), torch.zeros(150, dtype=torch.int32))  # empty table
    for chunk in keys.split(700):
        ours.insert(chunk)
        ref.insert(chunk)
        assert torch.equal(ours.lookup(probe), ref.lookup(probe))
    assert ours.lookup(keys[:7]).tolist() == [3] * 7 and ours.keys.size == len(ref)


def test_quantiles_interpolate_like_numpy():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 9.0]
    for q in (0.2, 0.5, 0.8):
        assert _quantile(xs, q) == pytest.approx(np.quantile(xs, q))
    assert _quantile([7.0], 0.8) == 7.0


@pytest.mark.skipif(torch.cuda.is_available() or not MEM_KIND,
                    reason="the CPU RSS probe (Linux /proc) is what this test checks")
def test_memory_probe_sees_an_allocation():
    mem = MemoryPeak()
    with mem:
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        x += 1
        del x
    assert mem.peak >= 60 << 20


class _Item:
    def __init__(self, test: str, provider: str | None):
        self.originalname = test
        self.nodeid = f"benchmarks/test_bench_x.py::{test}[{provider}]"
        self.callspec = type("Spec", (), {"params": {"provider": provider}})() if provider \
            else None


class _Config:
    def __init__(self, quick: bool, providers: str = ""):
        self.opts = {"--quick": quick, "--providers": providers}
        self.dropped: list = []
        self.hook = type("Hook", (), {"pytest_deselected": lambda _s, items: self.dropped.extend(
            items)})()

    def getoption(self, name):
        return self.opts[name]


def _selected(quick: bool, providers: str = "") -> list[str]:
    items = [_Item("test_bench_forward", p) for p in ("triton", "ref", "ref-compile")]
    items += [_Item("test_bench_cache_scoring", "numpy"),
              _Item("test_bench_train_step", "proteus-compile")]
    config = _Config(quick, providers)
    pytest_collection_modifyitems(config, items)
    assert len(items) + len(config.dropped) == 5
    return [it.nodeid.split("::")[1] for it in items]


def test_the_quick_subset_leaves_out_compiles_and_the_cache_scoring_pass():
    assert _selected(quick=False) == [
        "test_bench_forward[triton]", "test_bench_forward[ref]", "test_bench_forward[ref-compile]",
        "test_bench_cache_scoring[numpy]", "test_bench_train_step[proteus-compile]"]
    assert _selected(quick=True) == ["test_bench_forward[triton]", "test_bench_forward[ref]"]
    # a provider asked for by name runs, quick or not
    assert _selected(quick=True, providers="ref-compile,numpy") == [
        "test_bench_forward[ref-compile]", "test_bench_cache_scoring[numpy]"]
    # the estimates behind the printed duration: a compile costs more than a kernel call
    assert estimate_s(_Item("test_bench_forward", "ref-compile")) > estimate_s(
        _Item("test_bench_forward", "triton")) > 0
