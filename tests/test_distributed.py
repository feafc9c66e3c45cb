"""Two CPU processes with gloo (torchrun) against one process on the same global batch.

The n-gram cache bpb of the two runs must agree to 10 decimals.

Tolerance (derived in tests/_precision.py), in fp32 and under bf16 autocast, forced either way
so that an AVX2 machine and an AMX one run the same checks: the only difference between the runs
is the order of float sums (two half-batch means averaged and gradients summed by all-reduce,
instead of one full-batch mean). Step 0 sees identical weights: its loss agrees to a reordered
sum over the 512 tokens of the global batch, ``reordered_sum_rtol(precision, 512)``; the later
steps' losses and the final bpb follow the training-curve envelope ``TRAJECTORY_RTOL``.

The collectives of ``proteus.dist`` hand their tensors to the backend on its device (nccl
refuses CPU tensors): checked under gloo here, under nccl on a GPU (``cuda``).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _precision import PRECISIONS, TRAJECTORY_RTOL, reordered_sum_rtol
from _torchrun import torchrun

import proteus.dist as P
from proteus import data as D


def _run(nproc: int, out: str, precision: str = "fp32") -> list[dict]:
    return torchrun("_dist_worker.py", nproc, [out, PRECISIONS[precision]], out, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one = _run(1, str(tmp_path_factory.mktemp("one")))
    two = _run(2, str(tmp_path_factory.mktemp("two")))
    return one, two


@pytest.fixture(scope="module")
def runs_bf16(tmp_path_factory):
    one = _run(1, str(tmp_path_factory.mktemp("one_bf16")), "bf16")
    two = _run(2, str(tmp_path_factory.mktemp("two_bf16")), "bf16")
    return one, two


def test_two_ranks_stay_bit_identical(runs):
    _, two = runs
    assert two[0]["world"] == 2
    assert two[0]["digest"] == two[1]["digest"]
    assert two[0]["losses"] == two[1]["losses"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_ranks_match_one_process(precision, request):
    one, two = request.getfixturevalue("runs" if precision == "fp32" else "runs_bf16")
    assert len(one[0]["losses"]) == len(two[0]["losses"]) == 5
    assert two[0]["losses"][0] == pytest.approx(one[0]["losses"][0],
                                                rel=reordered_sum_rtol(precision, 512))
    for a, b in zip(one[0]["losses"], two[0]["losses"], strict=True):
        assert b == pytest.approx(a, rel=TRAJECTORY_RTOL)
    assert two[0]["bpb"] == pytest.approx(one[0]["bpb"], rel=TRAJECTORY_RTOL)


def test_artifact_is_written_once_and_evaluated_by_every_rank(runs):
    one, two = runs
    # the quantised model's evaluation is a collective: both ranks get the same number (a rank
    # evaluating alone used to leave its peer waiting at the final barrier forever)
    assert two[0]["int6_bpb"] == two[1]["int6_bpb"]
    assert two[0]["int6_bpb"] == pytest.approx(one[0]["int6_bpb"], rel=1e-3)


def test_cache_bpb_is_the_same_on_one_and_two_processes(runs):
    one, two = runs
    # each rank counts every token before its shard: identical per-token scores; only the
    # final float64 sum of two partial sums differs in rounding
    assert two[0]["cache_bytes"] == two[1]["cache_bytes"] == one[0]["cache_bytes"]
    # and the bytes are those of the 20,000 targets, counted here without the evaluator (an
    # error both runs shared would pass the comparison above)
    tokens = D.load_tokens(D.bundled_val_glob(), "val", limit=20001)
    lut = D.build_byte_lut(D.load_tokenizer(), 1024)
    assert one[0]["cache_bytes"] == int(lut.target_bytes(tokens[:-1], tokens[1:]).sum())
    bpb1 = one[0]["cache_nll"] / one[0]["cache_bytes"]
    bpb2 = two[0]["cache_nll"] / two[0]["cache_bytes"]
    assert f"{bpb1:.10f}" == f"{bpb2:.10f}"


# ---------------------------------------------------------------------------------------------
# Collectives on the backend's device: nccl refuses CPU tensors


def test_collectives_run_on_the_backends_device(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert P.comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert P.comm_device() == torch.device("cpu")


def _one_rank_group(backend: str, store: str, body) -> None:
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        body()
    finally:
        dist.destroy_process_group()


def _collectives(device: str) -> None:
    for t in (torch.arange(5, dtype=torch.float64), torch.tensor([7], dtype=torch.int64)):
        got = P.gather_ordered(t.to(device))
        assert got.device == torch.device(device) and torch.equal(got.cpu(), t)
    assert P.reduce_sum(1.5, 2.0) == [1.5, 2.0]
    assert P.broadcast_text("héllo") == "héllo"


def test_collectives_under_gloo(tmp_path):
    _one_rank_group("gloo", str(tmp_path / "store"), lambda: _collectives("cpu"))


@pytest.mark.cuda
def test_collectives_under_nccl(tmp_path):
    # CPU tensors in, CPU tensors out; the collectives themselves on the GPU
    torch.cuda.set_device(0)
    _one_rank_group("nccl", str(tmp_path / "store"),
                    lambda: (_collectives("cpu"), _collectives("cuda")))
