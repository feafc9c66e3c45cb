"""CaseOps: the lossless case transform in front of the SP8192 tokenizer, and exact byte counts.

The record entries' SP8192 tokenizer never sees an upper-case ASCII letter. Before tokenising,
each maximal run of ASCII letters is lower-cased and its case is written as operator characters
from Unicode's private use area, each a token of its own:

=========  ========  =================================================================
operator   char      meaning
=========  ========  =================================================================
TITLE      U+E001    the run's first letter is upper case
ALLCAPS    U+E002    every letter of the run (two or more) is upper case
CAPNEXT    U+E003    the next letter is upper case (inside a mixed-case run)
ESC        U+E004    the next character is a literal U+E001..U+E004 from the text
=========  ========  =================================================================

A run is written as the first matching rule: all lower case, as it is; two or more letters all
upper case, ALLCAPS + lower; an upper-case letter followed by lower-case ones (or alone), TITLE
+ lower; anything else (``iPhone``, ``McDonald``), TITLE when the first letter is upper, then
each further upper-case letter preceded by CAPNEXT. ``decode_caseops(encode_caseops(s)) == s``
for every string.

Bytes. bpb divides by the bytes of the *original* text, so every token is charged the original
UTF-8 bytes it stands for: operators and ESC stand for none, a letter for one byte whatever its
case, an escaped literal for its three bytes. The tokenizer also normalises whitespace (runs of
spaces and newlines become one "▁"), so the characters it drops are charged to the piece whose
span holds them, a document's leading ones to its first piece and its trailing ones to its last:
the byte counts of a document's tokens add up to ``len(text.encode("utf-8"))`` exactly.
"""

from __future__ import annotations

import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
_RUN = re.compile(r"[A-Za-z]+|[\ue001-\ue004]")


class CaseOpsError(ValueError):
    """A string that no text encodes to (a misplaced operator)."""


def _encode_run(m: re.Match) -> str:
    run = m.group()
    if run in OPERATORS:
        return ESC + run
    if run.islower():
        return run
    low = run.lower()
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + low
    if run[0].isupper() and (len(run) == 1 or run[1:].islower()):
        return TITLE + low
    out = [TITLE if run[0].isupper() else "", low[0]]
    for ch, lo in zip(run[1:], low[1:], strict=True):
        out.append(CAPNEXT + lo if ch.isupper() else lo)
    return "".join(out)


def encode_caseops(text: str) -> str:
    """The CaseOps transform of ``text`` (see the module docstring)."""
    return _RUN.sub(_encode_run, text)


def decode_caseops(text: str) -> str:
    """The inverse of :func:`encode_caseops`; raises :class:`CaseOpsError` on a malformed string."""
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch == ESC:
            if i + 1 >= n or text[i + 1] not in OPERATORS:
                raise CaseOpsError(f"caseops: ESC at {i} is not followed by an operator")
            out.append(text[i + 1])
            i += 2
            continue
        if ch not in (TITLE, ALLCAPS, CAPNEXT) and not ("a" <= ch <= "z"):
            if "A" <= ch <= "Z":
                raise CaseOpsError(f"caseops: upper-case letter {ch!r} at {i}")
            out.append(ch)
            i += 1
            continue
        j = i  # one run: an optional word operator, then lower-case letters and CAPNEXTs
        mode = ""
        if ch in (TITLE, ALLCAPS):
            mode, j = ch, j + 1
        letters, caps = [], []
        while j < n and ("a" <= text[j] <= "z" or text[j] == CAPNEXT):
            if text[j] == CAPNEXT:
                if j + 1 >= n or not ("a" <= text[j + 1] <= "z") or mode == ALLCAPS:
                    raise CaseOpsError(f"caseops: CAPNEXT at {j} is not before a letter")
                caps.append(len(letters))
                j += 1
                continue
            letters.append(text[j])
            j += 1
        if not letters or (mode == ALLCAPS and len(letters) < 2) or (caps and caps[0] == 0):
            raise CaseOpsError(f"caseops: operator at {i} does not start a word")
        if j < n and "A" <= text[j] <= "Z":
            raise CaseOpsError(f"caseops: upper-case letter at {j}")
        if mode == ALLCAPS:
            word = "".join(letters).upper()
        else:
            up = set(caps) | ({0} if mode == TITLE else set())
            word = "".join(c.upper() if k in up else c for k, c in enumerate(letters))
        if encode_caseops(word) != text[i:j]:  # the unique encoding, or not a valid string
            raise CaseOpsError(f"caseops: {text[i:j]!r} at {i} is not how {word!r} is written")
        out.append(word)
        i = j
    return "".join(out)


def _original_byte_weights(transformed: str) -> np.ndarray:
    """Per UTF-8 byte of ``transformed``: 1 where it stands for a byte of the original text."""
    raw = transformed.encode("utf-8")
    w = np.ones(len(raw), dtype=np.int64)
    off = 0
    escaped = False
    for ch in transformed:
        n = len(ch.encode("utf-8"))
        if ch in OPERATORS and not escaped:
            w[off : off + n] = 0
            escaped = ch == ESC
        else:
            escaped = False
        off += n
    return w


def token_bytes(sp, text: str) -> tuple[list[int], np.ndarray]:
    """Token ids of ``text`` (CaseOps, then the tokenizer ``sp``) and each token's original bytes.

    Uses the tokenizer's piece spans (``out_type="proto"``, which needs ``protobuf``; only the
    data build calls this). The counts add up to ``len(text.encode("utf-8"))``.
    """
    transformed = encode_caseops(text)
    proto = sp.encode(transformed, out_type="proto")
    pieces = list(proto.pieces)
    weights = _original_byte_weights(transformed)
    cum = np.concatenate([[0], np.cumsum(weights)])
    ids = [p.id for p in pieces]
    if not pieces:
        return ids, np.zeros(0, dtype=np.int64)
    # a partition of the transformed bytes: each piece from its own start to the next piece's
    # start, the first from 0 and the last to the end (dropped whitespace included)
    starts = [0] + [p.begin for p in pieces[1:]] + [len(weights)]
    if any(b < a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError("caseops: the tokenizer's piece spans are not in order")
    counts = np.array([cum[b] - cum[a] for a, b in zip(starts, starts[1:], strict=False)],
                      dtype=np.int64)
    return ids, counts
