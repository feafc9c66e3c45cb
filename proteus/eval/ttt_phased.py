"""Phased, score-first, per-document LoRA test-time training (``--ttt --ttt-mode phased``).

The record entries' evaluation, on our layers and audits. The stream splits into documents at
BOS: document d is the input tokens ``[s_d, s_{d+1})`` and the targets ``s_d + 1 .. s_{d+1}``
(its last target is the next document's BOS), so the documents' targets are the stream's, each
once. Per document, a fresh rank-r adapter ``W + (α/r) B A`` (A from a fixed seed, the same
for every document; B = 0, so a document's first chunk is scored by the base weights) sits on
each chosen projection (``ttt_lora_targets``: q, k, v, o, up, down, head). The document's
targets are taken in chunks of ``ttt_doc_chunk`` (C); chunk c holds prediction indices
``cC .. (c+1)C - 1`` and is scored by one forward over the document's tokens from
``max(0, (c+1)C - seq)`` to the chunk's end (its own tokens only; the start does not depend on
where the document ends)::

    for chunk c of the document:
        forward the window; record log p of chunk c's targets       (the scores are final)
        unless c is the document's last chunk: ``ttt_steps`` AdamW steps on the mean loss of
        chunk c's targets (the first from that same forward's graph)

AdamW: ``ttt_lr``, betas (``ttt_beta1``, ``ttt_beta2``), eps 1e-10, weight decay ``ttt_wd``,
fresh state per document. ``ttt_docs`` documents run at once: each adapter tensor is stacked
along a batch dimension (A (n, r, in), B (n, out, r): ``y_d = base(x_d) + (α/r)(x_d A_dᵀ)B_dᵀ``,
two ``bmm``), so one forward and one backward serve the batch, a document's adapter seeing only
its own rows; the base layer is the artifact's own (an ``Int6Linear``: our int6 matmul forward,
its dgrad kernel backward), so a first chunk is scored as the artifact scores it.

Global phases (``ttt_phases`` = cumulative document counts ``b_1 < b_2 < ...``, the entry's
833,1666,2500): documents are taken in stream order, in segments ``[0, b_1), [b_1, b_2), ...``,
batches never crossing a boundary. Once the documents before ``b_i`` are all scored, the base
weights are adapted on them, as the entry's global phase does: the prefix stream (tokens
``s_0 .. s_{b_i}``, every earlier phase's documents again: the phases are cumulative) is cut
into chunks of ``ttt_global_chunk`` targets, chunk k into whole rows of ``seq`` tokens (a short
remainder dropped), and chunk k takes one SGD step (momentum 0.9, no weight decay, the gradient
norm clipped to 1.0) on its rows' mean loss with learning rate ``ttt_global_lr · ½(1 + cos(π k
/ (K-1)))``; the last chunk, whose rate is 0, is skipped, as in the entry. Every parameter of
the model trains: the int6 layers become their exact float matrices (``Q·s``, plus LQER's
correction where the artifact has one) at the first phase, so the adapters of later documents
sit on float layers. The documents of segment i+1 are then scored with the adapted weights.

So a target's score depends on the artifact, its document's earlier tokens, and documents that
end before it (through the phases): never on itself or a later token, which ``audit_phased``
checks by editing the stream. Differences from the entry (docs/ttt.md lists them): documents in
stream order (the entry sorts them by length, longest first, across a work-stealing queue, so
a phase's prefix is the longest documents and a score depends on later ones); A reset with B
(the entry keeps A across documents of a batch slot, so a score depends on its batch-mates);
adapters on each projection's own input (the entry's o and MLP adapters read the block input);
the model's own attention masking in a phase (the entry restricts attention to documents).

Determinism: the batches are fixed groups of ``ttt_docs`` consecutive documents of a segment,
and ranks take whole batches (contiguous runs), so the work of a document is the same for any
world size; a document's adapter, optimiser state and gradient are its own slice, so its
scores do not depend on its batch-mates either (tested bit for bit here:
``tests/test_ttt_phased.py``). Every rank runs each phase on the whole prefix (the same
arithmetic on every rank, nothing reduced). The bpb sums the per-token records with
``exact_sum``, in any order the same.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from proteus import data as D
from proteus.config import EvalConfig, check_phased
from proteus.data import ByteLUT
from proteus.dist import gather_ordered, rank_world
from proteus.errors import ConfigError
from proteus.eval.cache_audit import edit_after, yes_no
from proteus.eval.scoring import TokenScores, format_bpb, row_sum_tolerance, token_scores
from proteus.kernels import dequantize_int6
from proteus.model import GPT, Linear
from proteus.quant import Int6Linear

log = logging.getLogger(__name__)

# the projections an adapter can sit on: option name -> the block's module
PROJECTIONS = {"q": "attn.c_q", "k": "attn.c_k", "v": "attn.c_v", "o": "attn.proj",
               "up": "mlp.fc", "down": "mlp.proj"}
TARGETS = (*PROJECTIONS, "head")
LORA_ALPHA = 144.0  # the adapter's output is scaled by alpha / rank (the entry's 144)
ADAM_EPS = 1e-10
GLOBAL_MOMENTUM = 0.9
GLOBAL_CLIP = 1.0


def parse_phases(ec: EvalConfig) -> list[int]:
    """The global phases' boundaries (``ttt_phases``, checked: ``ConfigError``)."""
    check_phased(ec)
    return [int(p) for p in ec.ttt_phases.split(",") if p.strip()]


def parse_targets(ec: EvalConfig) -> list[str]:
    """The projections that get adapters (``ttt_lora_targets``, checked: ``ConfigError``)."""
    check_phased(ec)
    return [p.strip() for p in ec.ttt_lora_targets.split(",") if p.strip()]


def documents(tokens: torch.Tensor) -> list[tuple[int, int]]:
    """(s, e) per document: input tokens ``[s, e)``, targets ``s + 1 .. e`` (e: the next BOS, or
    the last target). The first document starts at token 0 whatever it is."""
    n = tokens.numel() - 1
    starts = [0] + [int(i) for i in torch.nonzero(tokens[1:n] == D.BOS_ID)[:, 0] + 1]
    ends = starts[1:] + [n]
    return [(s, e) for s, e in zip(starts, ends, strict=True) if e > s]


def segments(n_docs: int, phases: list[int]) -> list[tuple[int, int]]:
    """The document ranges [lo, hi) scored between the global phases (a phase follows every
    range but the last)."""
    cuts = [0] + [b for b in phases if b < n_docs] + [n_docs]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def batches(lo: int, hi: int, per_batch: int) -> list[tuple[int, int]]:
    """Fixed groups [a, b) of ``per_batch`` consecutive documents of the range [lo, hi)."""
    return [(a, min(a + per_batch, hi)) for a in range(lo, hi, per_batch)]


# ---------------------------------------------------------------------------------------------
# The batched adapter


class BatchedLoRA(nn.Module):
    """A projection with one adapter per document of a batch: ``y_d = base(x_d) + (α/r) (x_d
    A_dᵀ) B_dᵀ`` for x (n, T, in), A (n, r, in), B (n, out, r), set by ``attach`` (no adapter:
    ``base(x)`` alone). ``base`` is the model's layer (an ``Int6Linear``, whose int6 forward
    and dgrad kernels run here, or a float layer)."""

    quantized = True  # the model routes by this layer's output, not its weight

    def __init__(self, base: nn.Module, in_features: int, out_features: int):
        super().__init__()
        self.base, self.in_features, self.out_features = base, in_features, out_features
        self.a = self.b = None
        self.scale = 1.0

    def attach(self, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        self.a, self.b, self.scale = a, b, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.a is None:
            return y
        low = torch.bmm(x, self.a.transpose(1, 2).to(x.dtype))
        return y + torch.bmm(low, self.b.transpose(1, 2).to(x.dtype)) * self.scale


class TiedHead(nn.Module):
    """The tied output head as a layer: ``x Eᵀ`` with the embedding's weight (the model's own
    tied computation, bit for bit)."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.emb = emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.emb.weight.to(x.dtype))


def wrap_model(model: GPT) -> dict[str, BatchedLoRA]:
    """Put a ``BatchedLoRA`` around every block projection and the head of ``model`` (in place;
    a tied head becomes a ``TiedHead`` first); returns them by name (``"0.q"``, ``"head"``)."""
    out = {}
    for i, block in enumerate(model.blocks):
        for name, path in PROJECTIONS.items():
            parent_name, _, child = path.rpartition(".")
            parent = block.get_submodule(parent_name)
            mod = getattr(parent, child)
            out[f"{i}.{name}"] = BatchedLoRA(mod, mod.in_features, mod.out_features)
            setattr(parent, child, out[f"{i}.{name}"])
    head = model.lm_head if model.lm_head is not None else TiedHead(model.tok_emb)
    dim, vocab = model.cfg.model_dim, model.cfg.vocab_size
    model.lm_head = out["head"] = BatchedLoRA(head, dim, vocab)
    return out


def float_layers(model: nn.Module) -> int:
    """Replace every ``Int6Linear`` of ``model`` by a float layer of its exact weights (``Q·s``
    plus the LQER correction where it has one), so a global phase can train them; returns how
    many."""
    swaps = [(n, m) for n, m in model.named_modules() if isinstance(m, Int6Linear)]
    for name, mod in swaps:
        parent_name, _, child = name.rpartition(".")
        w = dequantize_int6(mod.packed, mod.scale).float()
        if mod.lqer_a is not None:
            w = w + mod.lqer_a.float() @ mod.lqer_b.float()
        lin = (nn.Linear(mod.in_features, mod.out_features) if mod.bias is not None
               else Linear(mod.in_features, mod.out_features)).to(w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
    return len(swaps)


def initial_a(layers: dict[str, BatchedLoRA], rank: int) -> dict[str, torch.Tensor]:
    """Each layer's A at a document's start: uniform in ±1/sqrt(in), from a seed per layer."""
    out = {}
    for j, (name, lay) in enumerate(layers.items()):
        g = torch.Generator().manual_seed(7919 + j)
        bound = 1.0 / math.sqrt(lay.in_features)
        out[name] = (torch.rand(rank, lay.in_features, generator=g) * 2 - 1) * bound
    return out


# ---------------------------------------------------------------------------------------------
# One batch of documents


class _DocBatch:
    """Documents ``docs`` (their (s, e)) scored chunk by chunk, each with its own adapters."""

    def __init__(self, model: GPT, layers: dict[str, BatchedLoRA], a0: dict[str, torch.Tensor],
                 tokens: torch.Tensor, docs: list[tuple[int, int]], ec: EvalConfig, seq: int,
                 device, autocast: bool, capture: dict | None):
        self.model, self.layers, self.tokens, self.docs = model, layers, tokens, docs
        self.ec, self.seq, self.device, self.autocast, self.capture = (
            ec, seq, device, autocast, capture)
        n, r = len(docs), ec.ttt_rank
        self.params = []
        self.adapters = {}
        for name in parse_targets(ec):
            for key in ([name] if name == "head" else [f"{i}.{name}"
                                                       for i in range(len(model.blocks))]):
                lay = layers[key]
                a = a0[key].to(device).expand(n, -1, -1).clone().requires_grad_(True)
                b = torch.zeros(n, lay.out_features, r, device=device, requires_grad=True)
                self.adapters[key] = (a, b)
                self.params += [a, b]
        self.opt = torch.optim.AdamW(self.params, lr=ec.ttt_lr, eps=ADAM_EPS,
                                     betas=(ec.ttt_beta1, ec.ttt_beta2),
                                     weight_decay=ec.ttt_wd)
        c = ec.ttt_doc_chunk
        self.lengths = [e - s for s, e in docs]
        self.n_chunks = [-(-n_t // c) for n_t in self.lengths]
        self.logp = [torch.empty(n_t, dtype=torch.float64) for n_t in self.lengths]
        self.loss = None

    def _window(self, d: int, ci: int) -> tuple[int, int, int]:
        """(first input token, window length, offset of chunk ci's first target) of doc d. The
        window starts ``seq`` before where a full chunk ci would end, whether or not the
        document ends earlier, so no context depends on where the document ends."""
        c = self.ec.ttt_doc_chunk
        start = max(0, (ci + 1) * c - self.seq)
        end = min((ci + 1) * c, self.lengths[d])
        return self.docs[d][0] + start, end - start, ci * c - start

    def _forward(self, ci: int, rows: list[int]) -> torch.Tensor:
        """log-probabilities (len(rows), T, V) of chunk ci's windows of documents ``rows``,
        through their adapters (with the autograd graph). The shapes depend on ci only (every
        window padded at the end to the longest a chunk ci can have; one blank row more when
        a single document is left: PyTorch's bmm of one matrix sums differently), so a
        document's numbers do not depend on its batch-mates."""
        wins = [self._window(d, ci) for d in rows]
        t = min((ci + 1) * self.ec.ttt_doc_chunk, self.seq)
        n = max(len(rows), 2)
        x = torch.zeros(n, t, dtype=torch.int64)
        y = torch.zeros(n, t, dtype=torch.int64)
        for i, (p0, w, _) in enumerate(wins):  # causal: the padding never reaches a target
            x[i, :w] = self.tokens[p0 : p0 + w]
            y[i, :w] = self.tokens[p0 + 1 : p0 + w + 1]
        idx = torch.tensor(rows, device=self.device)
        for key, lay in self.layers.items():
            a, b = self.adapters.get(key, (None, None))
            if a is not None:
                a, b = a[idx], b[idx]
                if n > len(rows):
                    a = torch.cat([a, torch.zeros_like(a[:1])])
                    b = torch.cat([b, torch.zeros_like(b[:1])])
            lay.attach(a, b, LORA_ALPHA / self.ec.ttt_rank)
        dev = torch.device(self.device).type
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=self.autocast):
            z = self.model.logits(x.to(self.device))
        for lay in self.layers.values():
            lay.attach(None, None, 1.0)
        self._y = y.to(self.device)
        return F.log_softmax(z.float(), dim=-1)

    def score(self, ci: int) -> None:
        """Score chunk ci of every document that has it (final), keeping the loss of those
        that will train on it."""
        c = self.ec.ttt_doc_chunk
        rows = [d for d in range(len(self.docs)) if ci < self.n_chunks[d]]
        logp_all = self._forward(ci, rows)
        lp = logp_all.gather(-1, self._y.unsqueeze(-1)).squeeze(-1)
        losses = []
        for i, d in enumerate(rows):
            p0, w, off = self._window(d, ci)
            self.logp[d][ci * c : ci * c + w - off] = lp[i, off:w].detach().double().cpu()
            if self.capture:
                for j in range(p0 + 1 + off, p0 + w + 1):
                    if j in self.capture:
                        self.capture[j] = logp_all[i, j - p0 - 1].detach().double().cpu()
            if ci + 1 < self.n_chunks[d]:
                losses.append(-lp[i, off:w].mean())
        self.loss = torch.stack(losses).sum() if losses else None

    def step(self, ci: int) -> None:
        """``ttt_steps`` AdamW steps on chunk ci's targets of the documents with a later chunk
        (the first from the scoring forward's graph)."""
        for k in range(self.ec.ttt_steps):
            if k:
                rows = [d for d in range(len(self.docs)) if ci + 1 < self.n_chunks[d]]
                lp = self._forward(ci, rows).gather(-1, self._y.unsqueeze(-1)).squeeze(-1)
                offs = [self._window(d, ci) for d in rows]
                self.loss = torch.stack([-lp[i, off:w].mean()
                                         for i, (_, w, off) in enumerate(offs)]).sum()
            if self.loss is None:
                return
            self.opt.zero_grad(set_to_none=True)
            self.loss.backward()
            self.opt.step()
        self.loss = None

    def run(self) -> torch.Tensor:
        """Every target of the batch's documents, in stream order (float64)."""
        was_training = self.model.training
        self.model.eval()
        for ci in range(max(self.n_chunks)):
            self.score(ci)
            self.step(ci)
        self.model.train(was_training)
        return torch.cat(self.logp)


# ---------------------------------------------------------------------------------------------
# The global phase


def global_phase(model: GPT, tokens: torch.Tensor, end: int, ec: EvalConfig, seq: int,
                 device, autocast: bool) -> int:
    """Adapt every parameter of ``model`` on the prefix stream ``tokens[: end + 1]`` (targets
    1 .. end, all scored): chunks of ``ttt_global_chunk`` targets, one clipped SGD step each
    on the chunk's whole rows of ``seq``, cosine learning rate, the last chunk skipped (module
    docstring). Returns the steps taken."""
    g = ec.ttt_global_chunk
    k_chunks = -(-end // g)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=ec.ttt_global_lr, momentum=GLOBAL_MOMENTUM)
    was_training = model.training
    model.train()
    steps = 0
    for k in range(k_chunks - 1):  # the last chunk's rate is 0: skipped
        lo, hi = k * g, min((k + 1) * g, end)
        rows = (hi - lo) // seq
        if not rows:
            continue
        span = tokens[lo : lo + rows * seq + 1].to(device)
        x, y = span[:-1].view(rows, seq), span[1:].view(rows, seq)
        for group in opt.param_groups:
            group["lr"] = ec.ttt_global_lr * 0.5 * (1 + math.cos(math.pi * k / (k_chunks - 1)))
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=autocast):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GLOBAL_CLIP)
        opt.step()
        steps += 1
    for p in params:
        p.requires_grad_(False)
    model.train(was_training)
    return steps


# ---------------------------------------------------------------------------------------------
# The pass


@dataclass
class PhasedResult:
    scores: TokenScores  # every target, on every rank
    docs: int
    chunks: int  # document chunks scored
    phases: list[int]  # the boundaries where a global phase ran
    global_steps: int
    score_seconds: float  # the batches: forwards, scores, adapter steps
    global_seconds: float  # the global phases
    adapter_params: int  # values of one document's adapters


def phased_score(model: GPT, tokens: torch.Tensor, lut: ByteLUT, seq: int, ec: EvalConfig,
                 device="cpu", autocast: bool = False,
                 capture: dict[int, torch.Tensor | None] | None = None,
                 progress: bool = False) -> PhasedResult:
    """Score every target of ``tokens`` with phased per-document TTT (module docstring).
    ``model`` is not changed (the pass works on a copy). ``capture`` (target -> None) receives
    the full log-probability row of each of its targets, from the forward that scored it (on
    the rank that scored it)."""
    phases = parse_phases(ec)
    parse_targets(ec)
    if tokens.numel() < 2:
        raise ConfigError("phased TTT needs at least one target")
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = wrap_model(model)
    a0 = initial_a(layers, ec.ttt_rank)
    rank, world = rank_world()
    docs = documents(tokens)
    segs = segments(len(docs), phases)
    parts, done_phases, steps = [], [], 0
    score_s = global_s = 0.0
    last = time.perf_counter()
    for i, (lo, hi) in enumerate(segs):
        t0 = time.perf_counter()
        bs = batches(lo, hi, ec.ttt_docs)
        mine = bs[len(bs) * rank // world : len(bs) * (rank + 1) // world]
        lp = [_DocBatch(model, layers, a0, tokens, docs[a:b], ec, seq, device, autocast,
                        capture).run() for a, b in mine]
        lp = torch.cat(lp) if lp else torch.zeros(0, dtype=torch.float64)
        parts.append(gather_ordered(lp) if world > 1 else lp)
        score_s += time.perf_counter() - t0
        if i + 1 < len(segs):  # a phase on the documents before hi, all scored
            t1 = time.perf_counter()
            if not done_phases:
                float_layers(model)
            steps += global_phase(model, tokens, docs[hi - 1][1], ec, seq, device, autocast)
            done_phases.append(hi)
            global_s += time.perf_counter() - t1
        if progress and rank == 0 and (time.perf_counter() - last > 10.0 or i + 1 == len(segs)):
            last = time.perf_counter()
            sofar = torch.cat(parts)
            log.info(f"  phased ttt: documents 0..{hi} of {len(docs)} scored, bpb so far "
                     f"{format_bpb(token_scores(1, sofar, tokens, lut).bpb())}")
    c = ec.ttt_doc_chunk
    n_adapter = sum(ec.ttt_rank * (lay.in_features + lay.out_features) for key, lay in
                    layers.items() if key.split(".")[-1] in parse_targets(ec))
    return PhasedResult(token_scores(1, torch.cat(parts), tokens, lut), len(docs),
                        sum(-(-(e - s) // c) for s, e in docs), done_phases, steps, score_s,
                        global_s, n_adapter)


def phased_report(model: GPT, ec: EvalConfig, tokens: torch.Tensor, lut: ByteLUT, seq: int,
                  device="cpu", autocast: bool = False, progress: bool = False,
                  quiet: bool = False) -> tuple[dict, TokenScores]:
    """bpb with phased TTT, its settings and seconds, and its per-token scores."""
    r = phased_score(model, tokens, lut, seq, ec, device, autocast, progress=progress)
    out = dict(bpb=r.scores.bpb(), mode="phased", docs=r.docs, chunks=r.chunks,
               doc_chunk=ec.ttt_doc_chunk, phases=r.phases, global_steps=r.global_steps,
               rank=ec.ttt_rank, lr=ec.ttt_lr, steps=ec.ttt_steps, betas=[ec.ttt_beta1,
               ec.ttt_beta2], wd=ec.ttt_wd, docs_per_batch=ec.ttt_docs,
               targets=ec.ttt_lora_targets, global_lr=ec.ttt_global_lr,
               global_chunk=ec.ttt_global_chunk, adapter_params=r.adapter_params,
               score_seconds=r.score_seconds, train_seconds=r.global_seconds)
    if not quiet:
        log.info(f"  val bpb {format_bpb(out['bpb'])} with phased TTT ({r.docs} documents, "
                 f"chunks of {ec.ttt_doc_chunk}, rank {ec.ttt_rank} on {ec.ttt_lora_targets}, "
                 f"global phases after {r.phases or 'none'}; scoring and adapting "
                 f"{r.score_seconds:.1f} s, phases {r.global_seconds:.1f} s)")
    return out, r.scores


# ---------------------------------------------------------------------------------------------
# The audit


@dataclass
class PhasedAuditReport:
    passed: bool
    docs: int
    phases: list[int]
    edits: list[int]  # edit points: every token from each on was replaced, one rerun each
    edits_ok: bool  # every score before each edit point stayed bit-identical
    rows_ok: bool  # and the full distribution at the edit point too
    changed: bool  # each edit changed a later score (the check is not vacuous)
    positions: int  # where the full distribution was captured
    max_sum_error: float  # of the model's distribution there
    consistent: bool  # the captured distribution holds the scored value, bit for bit

    def __str__(self) -> str:
        return (f"{'PASS' if self.passed else 'FAIL'} (phased TTT, {self.docs} documents, "
                f"global phases after {self.phases or 'none'}, edits from targets "
                f"{', '.join(f'{e:,}' for e in self.edits)}): every earlier score "
                f"bit-identical={yes_no(self.edits_ok)}, the distribution at the edit point "
                f"unchanged={yes_no(self.rows_ok)}, later scores changed={yes_no(self.changed)}; "
                f"at {self.positions} positions max |sum p - 1| = {self.max_sum_error:.1e}, "
                f"scores match the distribution={yes_no(self.consistent)}")


def audit_phased(model: GPT, tokens: torch.Tensor, lut: ByteLUT, seq: int, ec: EvalConfig,
                 device="cpu", autocast: bool = False, max_edits: int = 6, tol: float | None = None,
                 seed: int = 0) -> PhasedAuditReport:
    """Audit phased TTT on the documents up to two past its first global phase (all of them
    with no phase, at most 4): rerun the pass with every token from an edit point t on
    replaced, at a document's chunk edges and inside a chunk, at a document start, inside the
    last document before the phase and just after it; every score before t must stay
    bit-identical, the distribution at t (captured from the forward that scored it) too, and a
    later score must change. At the edit points, BOS targets and random positions the captured
    distribution must sum to 1 and hold the scored value. Every rank takes part; each compares
    the rows it scored."""
    phases = parse_phases(ec)
    docs = documents(tokens)
    n_docs = min(len(docs), phases[0] + 2 if phases else 4)
    tokens = tokens[: docs[n_docs - 1][1] + 1]
    docs = docs[:n_docs]
    n, c = tokens.numel(), ec.ttt_doc_chunk
    s, _ = max(docs, key=lambda d: d[1] - d[0])  # the longest: the most chunk edges
    b = phases[0] if phases and phases[0] < len(docs) else 0
    points = [s + c + 1]  # most telling first: a chunk edge, around the phase, inside a chunk
    points += [docs[b][0] + 1, docs[b - 1][0] + 1] if b else []
    points += [s + c // 2 + 1] + ([docs[1][0]] if len(docs) > 1 else []) + [s + 2 * c + 1]
    points = sorted(list(dict.fromkeys(t for t in points if 1 <= t < n))[:max_edits])
    g = torch.Generator().manual_seed(seed)
    bos = (torch.nonzero(tokens[1:] == D.BOS_ID)[:, 0] + 1).tolist()[:3]
    rand = torch.randint(1, n, (4,), generator=g).tolist()
    positions = sorted({*points, *bos, *rand})
    capture: dict[int, torch.Tensor | None] = dict.fromkeys(positions)
    base = phased_score(model, tokens, lut, seq, ec, device, autocast, capture).scores.logp
    edits_ok = rows_ok = changed = True
    for t in points:
        other = edit_after(tokens, t, g, lut.vocab_size)
        cap2: dict[int, torch.Tensor | None] = {t: None}
        got = phased_score(model, other, lut, seq, ec, device, autocast, cap2).scores.logp
        edits_ok = edits_ok and torch.equal(got[: t - 1], base[: t - 1])
        changed = changed and not torch.equal(got[t - 1 :], base[t - 1 :])
        if capture[t] is not None:
            rows_ok = rows_ok and torch.equal(capture[t], cap2[t])
    sum_err, consistent = 0.0, True
    for t in positions:
        row = capture[t]
        if row is not None:  # this rank scored t
            sum_err = max(sum_err, abs(row.exp().sum().item() - 1.0))
            consistent = consistent and row[int(tokens[t])].item() == base[t - 1].item()
    if tol is None:
        tol = row_sum_tolerance(model.cfg.logit_softcap, lut.vocab_size)
    passed = edits_ok and rows_ok and changed and sum_err <= tol and consistent
    return PhasedAuditReport(passed, len(docs), [b for b in phases if b < len(docs)], points,
                             edits_ok, rows_ok, changed, len(positions), sum_err, consistent)
