"""jsonl documents -> Megatron's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), written by
``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder``; ``tools/preprocess_data.py`` is
its command line."""

import collections
import contextlib
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from megatron_mhc.data.jsonl import DEFAULT_JSON_KEY, JsonlError, iter_jsonl
from megatron_mhc.data.paths import default_tokenizer_file
from megatron_mhc.data.tokenizer import DocumentTokenizer, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class PreprocessStats:
    documents: int = 0  # documents written
    empty_skipped: int = 0  # documents with no tokens (and no EOD), not written
    tokens: int = 0  # tokens written, EOD included
    input_bytes: int = 0  # bytes of jsonl read (uncompressed)
    seconds: float = 0.0


_WORKER_TOKENIZER: DocumentTokenizer | None = None


def _worker_init(tokenizer_file: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_file)  # inherited when forked


def _worker_encode(texts: list[str]) -> list[list[int]]:
    return [_WORKER_TOKENIZER.encode(t) for t in texts]


def _batched(it: Iterator, n: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def preprocess_jsonl(
    input_path: str,
    output_prefix: str,
    tokenizer_file: str | None = None,
    json_key: str = DEFAULT_JSON_KEY,
    append_eod: bool = True,
    workers: int = 1,
    log_interval: float = 5.0,
    log: Callable[[str], None] | None = None,
) -> PreprocessStats:
    """Tokenize a jsonl file into Megatron's indexed dataset ``output_prefix.{bin,idx}``.

    One document per jsonl line (its ``json_key`` string), written as one sequence with
    ``IndexedDatasetBuilder.add_document``; with ``append_eod`` the tokenizer's end-of-document
    id is appended to each document. Documents with no tokens are skipped (counted in the
    stats); an input with no document left is an error, as a dataset without tokens cannot be
    trained on. Token dtype: uint16 when the vocabulary fits, else int32 (Megatron's
    ``DType.optimal_dtype``). ``tokenizer_file`` is a ``tokenizer.json``, by default the shipped
    one.

    The output is written to temporary files next to the prefix and renamed into place only
    when complete (``.bin`` first, then ``.idx``), so a failed or interrupted run never leaves a
    readable half-written dataset; the folders it created for the prefix are removed again.
    Progress (docs/s, MB/s) goes to ``log`` (default: the module
    logger at INFO) every ``log_interval`` seconds.

    Raises ``FileNotFoundError`` for a missing input/tokenizer file and :class:`JsonlError`
    (naming the file, and the line for a bad line) for a bad line or an input without text.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    log = log or logger.info
    tokenizer_file = str(tokenizer_file or default_tokenizer_file())
    input_path = str(input_path)
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"input file not found: {input_path}")
    tokenizer = load_tokenizer(tokenizer_file)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)

    output_prefix = os.path.abspath(str(output_prefix))
    out_dir = os.path.dirname(output_prefix)
    # The directories this call creates, deepest first: removed again if it fails.
    created = []
    missing = out_dir
    while not os.path.exists(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.basename(output_prefix)
    tmp_bin = tempfile.NamedTemporaryFile(
        dir=out_dir, prefix=f".{base}.", suffix=".bin.tmp", delete=False
    ).name
    tmp_idx = tmp_bin[: -len(".bin.tmp")] + ".idx.tmp"
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_bin, 0o666 & ~umask)  # NamedTemporaryFile creates 0600

    stats = PreprocessStats()
    start = last = time.monotonic()
    pool = None
    builder = None

    def write(batch_meta, batch_ids):
        nonlocal last
        for nbytes, ids in zip(batch_meta, batch_ids, strict=True):
            stats.input_bytes += nbytes
            if not ids:  # empty document: dropped, EOD included (as Megatron's own tool does)
                stats.empty_skipped += 1
                continue
            if append_eod:
                ids.append(tokenizer.eod)
            builder.add_document(ids, [len(ids)])
            stats.documents += 1
            stats.tokens += len(ids)
        now = time.monotonic()
        if log_interval is not None and now - last >= log_interval:
            last = now
            el = now - start
            log(
                f"{input_path}: {stats.documents} docs, {stats.tokens} tokens "
                f"({stats.documents / el:.1f} docs/s, {stats.input_bytes / el / 1e6:.2f} MB/s)"
            )

    succeeded = False
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        if workers > 1:
            # Reading and JSON checks stay in this process (errors name the exact line); the
            # workers only tokenize, a bounded number of batches in flight, results in order.
            # fork where available: a spawned worker would re-import megatron-core (~10 s).
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            pool = ctx.Pool(workers, initializer=_worker_init, initargs=(tokenizer_file,))
            pending: collections.deque = collections.deque()
            for batch in _batched(iter_jsonl(input_path, json_key), 256):
                texts = [t for _, t, _ in batch]
                job = pool.apply_async(_worker_encode, (texts,))
                pending.append(([nb for _, _, nb in batch], job))
                while len(pending) > 2 * workers:
                    batch_meta, res = pending.popleft()
                    write(batch_meta, res.get())
            while pending:
                batch_meta, res = pending.popleft()
                write(batch_meta, res.get())
            pool.close()
            pool.join()
            pool = None
        else:
            for batch in _batched(iter_jsonl(input_path, json_key), 256):
                write([nb for _, _, nb in batch], [tokenizer.encode(t) for _, t, _ in batch])
        if stats.documents == 0:
            raise JsonlError(
                input_path,
                None,
                f"no document with text under key {json_key!r} ({stats.empty_skipped} empty, "
                "blank lines ignored): nothing to train on, no dataset written",
            )
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, output_prefix + ".bin")
        os.replace(tmp_idx, output_prefix + ".idx")
        succeeded = True
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for p in (tmp_bin, tmp_idx):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        for directory in created if not succeeded else ():
            with contextlib.suppress(OSError):  # not empty: something else wrote there
                os.rmdir(directory)
    stats.seconds = time.monotonic() - start
    el = max(stats.seconds, 1e-9)
    log(
        f"done: {input_path} -> {output_prefix}.bin/.idx: {stats.documents} docs, "
        f"{stats.tokens} tokens, {stats.empty_skipped} empty skipped, {stats.seconds:.1f} s "
        f"({stats.documents / el:.1f} docs/s, {stats.input_bytes / el / 1e6:.2f} MB/s)"
    )
    return stats
