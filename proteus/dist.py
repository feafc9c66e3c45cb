"""Distributed helpers: rank and world from torchrun's environment, the process group's life,
and the few collectives the run uses (gradient average, float sums, ordered gather).

Every function works without a process group (one process): collectives become identities.
gloo on CPU, nccl on CUDA.

No hang: the group is created with a timeout (the run's own time cap, see
:func:`collective_timeout`), and a collective that fails — a peer that stalled past the timeout,
or one that died and closed its connection — raises :class:`PeerError` on every surviving rank:
one line naming this rank, what it was doing, and which peers were elsewhere (each rank leaves
a heartbeat, "step 12", "evaluation", in the group's key-value store).
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from proteus.errors import ConfigError, RunFailed

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; used when a run has no time cap
_HEARTBEAT = "proteus/at/"
_state = {"where": "setting up", "broken": False, "done": 0}


class PeerError(RunFailed):
    """A collective failed: a peer stalled past the timeout or died. Every rank stops."""


def _env_int(name: str, default: int, lowest: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < lowest:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer >= {lowest} "
                          "(torchrun sets it; unset it for one process)")
    return value


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def env_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun)."""
    return _env_int("RANK", 0, 0)


def env_world() -> int:
    """The number of processes torchrun started (1 when not launched by torchrun); the rest of
    torchrun's environment is checked with it (RANK, LOCAL_RANK, and with several processes
    MASTER_ADDR and MASTER_PORT), so a bad launch is one line before any work."""
    world = _env_int("WORLD_SIZE", 1, 1)
    rank = env_rank()
    local_rank()
    if rank >= world:
        raise ConfigError(f"environment variable RANK={rank} is not below WORLD_SIZE={world}")
    if world > 1:
        missing = [n for n in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not set: start the "
                              "processes with torchrun (or unset WORLD_SIZE for one process)")
        _env_int("MASTER_PORT", 0, 1)
    return world


def local_rank() -> int:
    """This process's rank on its machine as torchrun set it (picks the CUDA device)."""
    return _env_int("LOCAL_RANK", 0, 0)


def collective_timeout(tc) -> float:
    """Seconds a collective waits for its peers: ``dist_timeout_s`` if set, else the run's time
    cap (``max_wallclock_s``) clamped to [120, 1800] — no wait can outlast the run it belongs
    to by much, and compile warm-ups and rank 0's file writes fit — or 1800 with no cap."""
    if tc.dist_timeout_s > 0:
        return float(tc.dist_timeout_s)
    if tc.max_wallclock_s > 0:
        return float(min(DEFAULT_TIMEOUT_S, max(120.0, tc.max_wallclock_s)))
    return DEFAULT_TIMEOUT_S


def _init_group(backend: str, timeout_s: float) -> None:
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _state.update(where="setting up", broken=False, done=0, timeout=timeout_s)
    heartbeat("setting up")


def setup_dist(timeout_s: float = DEFAULT_TIMEOUT_S, device_kind: str | None = None
               ) -> tuple[int, int]:
    """Join the process group torchrun describes (if ``WORLD_SIZE`` > 1 and none exists yet);
    return (rank, world). nccl for ``device_kind`` "cuda" (default: when a GPU is visible),
    gloo otherwise."""
    world = env_world()
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() if device_kind is None else device_kind == "cuda"
        _init_group("nccl" if cuda else "gloo", timeout_s)
    return env_rank(), world


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def heartbeat(where: str) -> None:
    """Record what this rank is doing ("step 12", "evaluation"): a failed collective names the
    peers that did not reach it, and where they were."""
    _state["where"] = where
    _publish()


def _publish() -> None:
    """This rank's place and count of completed collectives, in the group's store."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    store = _store()
    if store is not None:
        try:
            store.set(f"{_HEARTBEAT}{dist.get_rank()}",
                      f"{_state['done']}|{socket.gethostname()}|{os.getpid()}|{_state['where']}")
        except Exception:  # noqa: BLE001 - a heartbeat must never be the thing that fails
            pass


def _peers(rank: int, world: int) -> str:
    """Where each peer last was, marking those that had completed fewer collectives than this
    rank (they never joined the one that failed). The store lives with a peer that may be
    gone, so this gives up quietly."""
    store = _store()
    if store is None:
        return ""
    out = []
    try:
        store.set_timeout(datetime.timedelta(seconds=2))
        for r in range(world):
            key = f"{_HEARTBEAT}{r}"
            if r != rank and store.check([key]):
                done, host, pid, at = store.get(key).decode().split("|", 3)
                behind = " and never joined it" if int(done) < _state["done"] else ""
                gone = (f" (its process {pid} has exited: the lost peer)"
                        if host == socket.gethostname() and not _pid_alive(int(pid)) else "")
                out.append(f"rank {r} was last at {at}{behind}{gone}")
    except Exception:  # noqa: BLE001
        return ""
    return "; " + ", ".join(out) if out else ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def signal_note() -> str:
    """What a SIGTERM means under a process group: torchrun ends the surviving ranks with it
    when one rank exits; names the peers and where they were ('' without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ""
    rank, world = rank_world()
    return (f" (rank {rank} of {world}: torchrun stops the other ranks this way when one "
            f"exits{_peers(rank, world)})")


def _guarded(op: str, fn: Callable[[], T]) -> T:
    """Run a collective; its failure becomes one PeerError line."""
    try:
        out = fn()
    except RuntimeError as e:
        rank, world = rank_world()
        _state["broken"] = True
        text = str(e)
        if "Timed out" in text or "timed out" in text:
            why = f"no answer from a peer within the {_state.get('timeout', 0):.0f} s timeout"
        elif "closed by peer" in text or "reset by peer" in text or "Broken pipe" in text:
            why = "a peer closed its connection (it exited, crashed or was killed)"
        else:
            why = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
        raise PeerError(f"rank {rank} of {world}: {op} failed at {_state['where']}: {why}"
                        f"{_peers(rank, world)}; every rank stops") from None
    _state["done"] += 1
    _publish()
    return out


def all_reduce_flat(tensors: list[torch.Tensor], divisor: int = 1) -> None:
    """Sum ``tensors`` over ranks in place (then divide by ``divisor``), in one flat
    all-reduce; a lost peer is one PeerError line."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _guarded("gradient all-reduce", lambda: dist.all_reduce(flat))
    if divisor != 1:
        flat /= divisor
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class Dist:
    """Rank/world from torchrun's environment; gloo on CPU, nccl on CUDA. A group this object
    creates is this object's to close; one the caller created is the caller's."""

    def __init__(self, device_kind: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.world = env_world()
        self.rank = env_rank()
        self.local_rank = local_rank()
        self.enabled = self.world > 1
        self.owns_group = self.enabled and not dist.is_initialized()
        if self.owns_group:
            _init_group("nccl" if device_kind == "cuda" else "gloo", timeout_s)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients over ranks in one flat all-reduce."""
        if self.enabled:
            all_reduce_flat([p.grad for p in params if p.grad is not None], self.world)

    def mean_and_any(self, value: float, flag: bool) -> tuple[float, bool]:
        """(mean of ``value`` over ranks, whether any rank's ``flag`` is set), in one
        all-reduce: ranks decide together, so none waits for a peer that already stopped."""
        if not self.enabled:
            return value, flag
        t = torch.tensor([value, float(flag)], dtype=torch.float64, device=comm_device())
        _guarded("all-reduce", lambda: dist.all_reduce(t))
        return t[0].item() / self.world, t[1].item() > 0

    def barrier(self) -> None:
        if self.enabled:
            _guarded("barrier", dist.barrier)

    def close(self, failed: bool = False) -> None:
        if self.owns_group:
            close_process_group(failed)


def close_process_group(failed: bool = False) -> None:
    """Tear down the default process group (if any) once every rank is done with it, then
    collect garbage while the interpreter is still whole: left to interpreter shutdown, the
    cyclic garbage of a gloo run aborted 5 of ~31 two-process runs on exit here ("terminate
    called without an active exception", after all output was written); with the collection,
    0 of 56. After a failure (``failed``, or a collective that already failed) no rank waits
    for the others: a peer may be gone or still inside another collective."""
    if dist.is_available() and dist.is_initialized():
        if not (failed or _state["broken"]):
            heartbeat("closing")
            _guarded("final barrier", dist.barrier)  # no rank tears down while a peer uses it
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - after a failure the group may already be unusable
            if not (failed or _state["broken"]):
                raise
    gc.collect()


def comm_device() -> torch.device:
    """Where the default group's collectives take their tensors: the current CUDA device under
    nccl (which refuses CPU tensors), the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_sum(*values: float) -> list[float]:
    """Element-wise sums over ranks, in float64 (the values themselves without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    _guarded("all-reduce", lambda: dist.all_reduce(t))
    return t.tolist()


def gather_ordered(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's 1-D tensor in rank order (ranks own consecutive ranges), on
    ``t``'s device; the collectives run on the backend's (``comm_device``)."""
    world, dev = dist.get_world_size(), comm_device()
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    mine = torch.tensor([t.numel()], dtype=torch.int64, device=dev)
    _guarded("all-gather", lambda: dist.all_gather(sizes, mine))
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(counts), dtype=t.dtype, device=dev)
    padded[: t.numel()] = t.reshape(-1).to(dev)
    parts = [torch.zeros(max(counts), dtype=t.dtype, device=dev) for _ in range(world)]
    _guarded("all-gather", lambda: dist.all_gather(parts, padded))
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(t.device)


def broadcast_text(text: str, src: int = 0) -> str:
    """Rank ``src``'s ``text`` on every rank (``text`` itself without a group); UTF-8 bytes in
    a tensor, nothing pickled."""
    if not (dist.is_available() and dist.is_initialized()):
        return text
    raw = text.encode() if dist.get_rank() == src else b""
    dev = comm_device()
    n = torch.tensor([len(raw)], dtype=torch.int64, device=dev)
    _guarded("broadcast", lambda: dist.broadcast(n, src=src))
    buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=dev)
    if raw:
        buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    _guarded("broadcast", lambda: dist.broadcast(buf, src=src))
    return bytes(buf.cpu().tolist()).decode()
