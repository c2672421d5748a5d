#!/usr/bin/env python3
"""Train the shipped byte-level BPE tokenizer (``data/tokenizer/``) on the default corpus.

Development-time tool, run once; its outputs are committed. Training uses the Hugging Face
``tokenizers`` package, which megatron-mhc also reads ``tokenizer.json`` with.

What it writes (all describe one tokenizer, the same ids everywhere):

* ``vocab.json`` + ``merges.txt``: GPT-2 format. Ids 0..255 are the 256 single bytes in byte
  order (byte ``b`` is id ``b``), ids 256.. are the merges in rank order, and the last id is
  ``<|endoftext|>`` (GPT-2's convention), so ``eod = vocab_size - 1``.
* ``tokenizer.json`` + ``tokenizer_config.json``: the same tokenizer for Hugging Face: what
  ``megatron_mhc.data.tokenizer`` and ``tools/preprocess_data.py`` read, and what
  ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizer`` reads.
* ``golden.json``: a few tricky strings with their ids, and the sha256 of the default corpus'
  dataset (``.bin``/``.idx``) built with this tokenizer, so the tests can check that the ids
  of the whole corpus stay the same.

It then reads ``tokenizer.json`` back as the preprocessing does and fails unless every document
decodes back to its text.

Training is deterministic: rerunning it on the same corpus reproduces the same files.

Usage::

    python tools/train_tokenizer.py [--corpus data/corpus/kjv.jsonl.gz] [--vocab-size 8192]
                                    [--output-dir data/tokenizer]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

EOD = "<|endoftext|>"

GOLDEN_STRINGS = [
    "In the beginning God created the heaven and the earth.",
    "Genesis 1\n\nAnd God said, Let there be light: and there was light.\n",
    "It's 3:30pm -- they'll say we've 12,345.67 dollars; I'd rather not!!",
    "  leading spaces,\ttabs\t\tand trailing spaces   \n\n\n  ",
    "caf\u00e9 na\u00efve \u00c5ngstr\u00f6m \u00e6on \u2014 \u201cquoted\u201d \u2018single\u2019",
    "\u0417\u0434\u0440\u0430\u0432\u0441\u0442\u0432\u0443\u0439 \u043c\u0438\u0440 "
    "\u4f60\u597d\u4e16\u754c \u3053\u3093\u306b\u3061\u306f \ud55c\uad6d\uc5b4",
    "emoji \U0001f600\U0001f44d\U0001f3fd and symbols \u00bd \u2167 x\u00b2 \u0661\u0662\u0663",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\r\n",
    "\u00a0non\u2009breaking\u3000spaces\u2028line\u0085next",
]


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_docs(path: str) -> list[str]:
    from megatron_mhc.data.jsonl import iter_jsonl

    return [text for _, text, _ in iter_jsonl(path, "text")]


def train(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return merges


def bytes_to_unicode() -> dict:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters (the
    characters of byte-level BPE tokens)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def canonical_vocab(merges: list[tuple]) -> dict:
    """Bytes 0..255 in byte order, then merges in rank order, then <|endoftext|>."""
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    for a, b in merges:
        token = a + b
        if token in vocab:
            raise RuntimeError(f"merge {a!r} {b!r} produces an existing token")
        vocab[token] = len(vocab)
    vocab[EOD] = len(vocab)
    return vocab


def build_hf_tokenizer(vocab: dict, merges: list[tuple]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOD, special=True)])
    return tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=os.path.join(REPO, "data", "corpus", "kjv.jsonl.gz"))
    ap.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        help="total ids, <|endoftext|> included (default 8192)",
    )
    ap.add_argument("--output-dir", default=os.path.join(REPO, "data", "tokenizer"))
    args = ap.parse_args(argv)

    docs = read_docs(args.corpus)
    t0 = time.time()
    merges = train(docs, args.vocab_size)
    vocab = canonical_vocab(merges)
    print(
        f"trained on {len(docs)} documents in {time.time() - t0:.1f} s: "
        f"{len(merges)} merges, vocab {len(vocab)} (eod id {vocab[EOD]})"
    )

    os.makedirs(args.output_dir, exist_ok=True)
    out = lambda name: os.path.join(args.output_dir, name)  # noqa: E731
    with open(out("vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(out("merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    hf = build_hf_tokenizer(vocab, merges)
    hf.save(out("tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOD,
        "eos_token": EOD,
        "unk_token": EOD,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
    }
    with open(out("tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    # Read back as the preprocessing reads it: every document decodes to its text.
    from megatron_mhc.data.preprocess import preprocess_jsonl
    from megatron_mhc.data.tokenizer import DocumentTokenizer

    tokenizer = DocumentTokenizer(out("tokenizer.json"))
    assert tokenizer.eod == len(vocab) - 1 and tokenizer.vocab_size == len(vocab)
    for i, text in enumerate(docs + GOLDEN_STRINGS):
        if tokenizer.decode(tokenizer.encode(text)) != text:
            raise SystemExit(f"decode round trip failed on document {i}: {text[:80]!r}")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "corpus")
        stats = preprocess_jsonl(
            args.corpus, prefix, out("tokenizer.json"), append_eod=True, log=lambda m: None
        )
        dataset = {
            "documents": stats.documents,
            "tokens": stats.tokens,
            **{f"{ext}_sha256": sha256_of(f"{prefix}.{ext}") for ext in ("bin", "idx")},
        }

    golden = [{"text": s, "ids": tokenizer.encode(s)} for s in GOLDEN_STRINGS]
    with open(out("golden.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "note": "ids from the Hugging Face tokenizers package (tokenizer.json), and the "
                "default corpus' dataset built with them (EOD appended); written by "
                "tools/train_tokenizer.py",
                "cases": golden,
                "default_corpus_dataset": dataset,
            },
            f,
            ensure_ascii=False,
            indent=1,
        )
        f.write("\n")
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    n_doc_tok = stats.tokens - stats.documents
    print(
        f"verified: decoding gives back all {len(docs)} documents and {len(GOLDEN_STRINGS)} "
        f"golden strings; corpus = {n_doc_tok} tokens ({n_bytes / n_doc_tok:.2f} bytes/token)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
