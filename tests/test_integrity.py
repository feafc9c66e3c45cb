"""A bpb that is a pure function of (model, tokens, evaluation config): the same number to the
last bit for 1 and 2 processes and for different batch sizes, for plain windows, the sliding
window, the n-gram cache and score-first TTT (+ the cache). ``docs/integrity.md`` has the
whole table (batch sizes x 1/2/3/8 processes)."""

from __future__ import annotations

import threading

import pytest
import torch
from _eval_worker import numbers  # tests/ is on the path (pytest prepends it)
from _torchrun import torchrun

from proteus.checkpoint import save_checkpoint
from proteus.device import cpu_threads, map_one_thread, one_thread
from proteus.kernels import interpreting
from proteus.model import build_model, runs_interpreted_kernels
from proteus.options import build_config

BPB = ("plain", "plain loss", "sliding", "cache", "ttt", "ttt + cache", "tokens", "bytes")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = build_config("smoke", {"eval.ttt_lr": 0.01, "eval.ttt_params": "lora"}, environ={})
    path = tmp_path_factory.mktemp("integrity") / "model.ckpt"
    torch.manual_seed(0)
    save_checkpoint(path, build_model(cfg, "ref"), cfg)
    return str(path)


def torchrun_numbers(nproc: int, out: str, ckpt: str, batch: int, tokens: int = 1024,
                     stride: int = 32, chunk: int = 256) -> list[dict]:
    """Every rank's numbers from ``tests/_eval_worker.py`` under ``nproc`` gloo processes."""
    return torchrun("_eval_worker.py", nproc, [ckpt, out, batch, tokens, stride, chunk], out)


def test_one_and_two_processes_and_any_batch_size_give_the_same_bits(ckpt, tmp_path):
    # one process here (batches of 3 windows, torch's threads), two under torchrun (batches of
    # 8, one thread each)
    one = numbers(ckpt, 3, 1024, 32, 256)
    two = torchrun_numbers(2, str(tmp_path / "two"), ckpt, batch=8)
    assert two[0]["world"] == 2
    for key in BPB:
        assert one[key] == two[0][key] == two[1][key], key  # every bit, every rank
    assert one["ttt"] < one["plain"]  # the training did something


@pytest.mark.parametrize("threads", [2, 3])
def test_any_number_of_cpu_threads_gives_the_same_bits(ckpt, threads):
    # one process, torch.set_num_threads(1) against 2 and 3: a weight gradient's long inner
    # dimension, a full sum and an elementwise op whose split lands inside a vector each round
    # by the thread count unless the work runs one thread per batch / group / blend
    # (proteus.device.map_one_thread); TTT's steps are the most exposed
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = numbers(ckpt, 3, 1024, 32, 256)
        torch.set_num_threads(threads)
        many = numbers(ckpt, 3, 1024, 32, 256)
        assert torch.get_num_threads() == threads  # the evaluation gave its threads back
    finally:
        torch.set_num_threads(before)
    for key in BPB:
        assert one[key] == many[key], (key, one[key], many[key])


def test_map_one_thread_runs_each_piece_on_one_thread_in_order_and_gives_threads_back():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        a, b = torch.randn(4096, 64), torch.randn(4096, 96)
        pieces = [(a[i:], b[i:]) for i in range(5)]  # weight gradients: a long inner dimension

        def piece(ab):
            assert torch.get_num_threads() == 1 and not torch.is_grad_enabled()
            return ab[1].t() @ ab[0]

        with torch.no_grad():
            got = map_one_thread(piece, pieces)
        assert torch.get_num_threads() == 3
        with one_thread():
            assert cpu_threads() == 3 and torch.get_num_threads() == 1
            alone = [ab[1].t() @ ab[0] for ab in pieces]
        assert all(torch.equal(x, y) for x, y in zip(got, alone, strict=True))  # order and bits

        def fail(i):
            raise ValueError(f"piece {i}")

        with pytest.raises(ValueError, match="piece"):
            map_one_thread(fail, range(4))
        assert torch.get_num_threads() == 3  # given back after an error too
    finally:
        torch.set_num_threads(before)


def test_interpreted_kernels_run_in_turn():
    # Triton's interpreter keeps a launch's grid in globals: two forwards with its kernels side
    # by side broke `proteus eval --kernels triton` (y >= grid_dim[1]); they run in turn, each
    # still on one thread
    cfg = build_config("smoke", environ={})
    assert not runs_interpreted_kernels(build_model(cfg, "ref"))
    if interpreting():
        assert runs_interpreted_kernels(build_model(cfg, "triton"))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = map_one_thread(lambda _: (threading.get_ident(), torch.get_num_threads()),
                              range(4), side_by_side=False)
    finally:
        torch.set_num_threads(before)
    assert seen == [(threading.get_ident(), 1)] * 4
