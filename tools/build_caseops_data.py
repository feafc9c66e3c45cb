"""Build the bundled SP8192 CaseOps sample from the documents behind the bundled SP1024 shards.

    python tools/build_caseops_data.py --docs-dir ../shared/data \\
        --tokenizer fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model \\
        --out proteus/data/sp8192_caseops

Reads ``fineweb_val_000000.decoded_docs.jsonl.gz`` and ``fineweb_train_00000{0,1,2}.docs.jsonl.gz``
(one ``{"text": ...}`` per document, in shard order), writes for each the same documents as an
SP8192 shard, ``[BOS] + tokens(caseops(text))`` per document (proteus.caseops), and for the
validation shard its byte sidecar ``fineweb_val_bytes_000000.bin``: the original UTF-8 bytes of
each token (0 for BOS) in the same shard format. Needs ``protobuf`` (the tokenizer's piece spans);
nothing at run time does. Deterministic: the same inputs give the same files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm

from proteus import data as D
from proteus.caseops import decode_caseops, encode_caseops, token_bytes

SOURCES = [("fineweb_val_000000.decoded_docs.jsonl.gz", "fineweb_val_000000.bin"),
           ("fineweb_train_000000.docs.jsonl.gz", "fineweb_train_000000.bin"),
           ("fineweb_train_000001.docs.jsonl.gz", "fineweb_train_000001.bin"),
           ("fineweb_train_000002.docs.jsonl.gz", "fineweb_train_000002.bin")]
TOKENIZER_NAME = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs-dir", required=True, type=Path)
    ap.add_argument("--tokenizer", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    sp = spm.SentencePieceProcessor(model_file=str(a.tokenizer))
    if sp.vocab_size() != 8192:
        print(f"build_caseops_data: {a.tokenizer} has {sp.vocab_size()} pieces, not 8192")
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(a.tokenizer, a.out / TOKENIZER_NAME)
    for src, dst in SOURCES:
        with gzip.open(a.docs_dir / src, "rt", encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for line in f if line.strip()]
        toks, nbytes, text_bytes = [], [], 0
        for text in docs:
            if decode_caseops(encode_caseops(text)) != text:
                raise SystemExit(f"caseops round trip failed in {src}")
            ids, counts = token_bytes(sp, text)
            if int(counts.sum()) != len(text.encode("utf-8")):
                raise SystemExit(f"byte counts do not add up in {src}")
            toks += [D.BOS_ID] + ids
            nbytes += [0] + counts.tolist()
            text_bytes += len(text.encode("utf-8"))
        D.write_shard(a.out / dst, np.asarray(toks, dtype=np.uint16))
        if "_val_" in dst:
            D.write_shard(a.out / dst.replace("_val_", "_val_bytes_"),
                          np.asarray(nbytes, dtype=np.uint16))
        print(f"{dst}: {len(docs)} documents, {len(toks):,} tokens, {text_bytes:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
