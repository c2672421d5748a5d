"""Pretraining data for megatron-mhc: the embedded default corpus, its tokenizer, and the
jsonl -> Megatron indexed dataset (.bin/.idx) conversion.

Everything here works offline and needs nothing beyond the Python standard library, numpy and
megatron-core (for ``IndexedDatasetBuilder``):

* ``data/corpus/kjv.jsonl.gz``: the King James Bible (public domain), one chapter per line
  (see ``data/README.md`` for provenance);
* ``data/tokenizer/``: a GPT-2 style byte-level BPE (``vocab.json`` + ``merges.txt``, 8192 ids,
  ``<|endoftext|>`` is the last id) trained once on that corpus with ``tools/train_tokenizer.py``;
  ``tokenizer.json``/``tokenizer_config.json`` describe the same tokenizer for Hugging Face;
* :class:`ByteLevelBPETokenizer`: a dependency-free encoder for those files, identical to the
  Hugging Face ``tokenizers`` encoding of ``tokenizer.json`` (checked by the tests);
* :func:`preprocess_jsonl`: jsonl(.gz/.xz/.bz2) -> ``PREFIX.bin`` + ``PREFIX.idx`` written by
  ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` (``tools/preprocess_data.py`` is
  its command line);
* :func:`prepare_default_corpus`: builds the default corpus' dataset once into a cache directory
  (atomically) and returns the prefix to pass as ``--data-path``.

With megatron.training, the data are already tokenized, so the training run only needs the vocab
size and the end-of-document id: ``--tokenizer-type NullTokenizer --vocab-size 8192`` (eod =
vocab_size - 1 = the id of ``<|endoftext|>``) needs no extra package;
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizer`` gives the same ids and
eod and also detokenizes, but needs ``transformers``. ``GPT2BPETokenizer`` is not usable offline
with megatron-core 0.19.2 (it asks the Hugging Face hub for the ``gpt2`` config even when
``--vocab-file``/``--merge-file`` are given). See :func:`default_training_args`.
"""

from __future__ import annotations

import bz2
import collections
import contextlib
import gzip
import hashlib
import json
import logging
import lzma
import multiprocessing
import os
import re
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger(__name__)

EOD_TOKEN = "<|endoftext|>"
DEFAULT_JSON_KEY = "text"
#: Bump when the layout of the cached default dataset changes (invalidates old caches).
CACHE_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Locations of the shipped files
# --------------------------------------------------------------------------------------------


def data_dir() -> Path:
    """The ``data/`` directory holding the corpus and tokenizer.

    ``$MEGATRON_MHC_DATA_DIR`` overrides it (for installs where ``data/`` is not next to the
    package); otherwise it is ``<repository>/data``.
    """
    env = os.environ.get("MEGATRON_MHC_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "data"


def default_corpus_file() -> Path:
    """The embedded corpus: gzip-compressed jsonl, one ``{"id", "text"}`` per line."""
    return data_dir() / "corpus" / "kjv.jsonl.gz"


class TokenizerFiles(NamedTuple):
    """Paths of the shipped tokenizer (same tokenizer in every form)."""

    vocab_file: str  # GPT-2 style vocab.json
    merge_file: str  # GPT-2 style merges.txt
    tokenizer_dir: str  # directory for --tokenizer-type HuggingFaceTokenizer --tokenizer-model


def default_tokenizer_files() -> TokenizerFiles:
    """Paths of the shipped byte-level BPE tokenizer (``data/tokenizer``)."""
    d = data_dir() / "tokenizer"
    return TokenizerFiles(str(d / "vocab.json"), str(d / "merges.txt"), str(d))


def default_cache_dir() -> Path:
    """``$MEGATRON_MHC_CACHE_DIR``, else ``$XDG_CACHE_HOME/megatron_mhc`` (``~/.cache/...``)."""
    env = os.environ.get("MEGATRON_MHC_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "megatron_mhc"


# --------------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2 scheme), standard library only
# --------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
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
    return dict(zip(bs, map(chr, cs)))


# Unicode White_Space property (what \s means for the Oniguruma regex in Hugging Face tokenizers;
# Python's \s would also match U+001C..U+001F).
_WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_SPLIT_RE: re.Pattern | None = None


def _char_class(codepoints: Sequence[int]) -> str:
    """Regex character-class body for a sorted list of code points, as ranges."""
    out = []
    i = 0
    while i < len(codepoints):
        j = i
        while j + 1 < len(codepoints) and codepoints[j + 1] == codepoints[j] + 1:
            j += 1
        a, b = re.escape(chr(codepoints[i])), re.escape(chr(codepoints[j]))
        out.append(a if i == j else f"{a}-{b}")
        i = j + 1
    return "".join(out)


def _split_regex() -> re.Pattern:
    """GPT-2's pre-tokenization pattern, built for the stdlib ``re`` module.

    GPT-2 writes it with ``\\p{L}``/``\\p{N}`` (third-party ``regex`` module); here the letter and
    number classes are generated from ``unicodedata`` once per process (~0.3 s), so no extra
    package is needed.
    """
    global _SPLIT_RE
    if _SPLIT_RE is None:
        letters, numbers = [], []
        category = unicodedata.category
        for cp in range(0x110000):
            c = category(chr(cp))[0]
            if c == "L":
                letters.append(cp)
            elif c == "N":
                numbers.append(cp)
        L, N = _char_class(letters), _char_class(numbers)
        S = _char_class(sorted(map(ord, _WHITE_SPACE)))
        pattern = (
            rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"
        )
        _SPLIT_RE = re.compile(pattern)
    return _SPLIT_RE


class ByteLevelBPETokenizer:
    """GPT-2 style byte-level BPE read from ``vocab.json`` + ``merges.txt``.

    Same algorithm as GPT-2's ``encoder.py`` and Hugging Face's ``ByteLevel`` + ``BPE``: split the
    text with GPT-2's pattern, map each piece's UTF-8 bytes to unicode characters, apply merges
    by rank. Special tokens in the text are NOT parsed: a literal ``<|endoftext|>`` in a
    document is encoded as ordinary text; the end-of-document id is only added by the caller.

    Attributes ``vocab_size``, ``eod`` and the methods ``tokenize``/``detokenize`` mirror the
    Megatron tokenizer interface.
    """

    def __init__(self, vocab_file: str, merge_file: str, eod_token: str = EOD_TOKEN) -> None:
        self.vocab_file, self.merge_file = str(vocab_file), str(merge_file)
        for path, what in ((self.vocab_file, "vocab file"), (self.merge_file, "merge file")):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{what} not found: {path}")
        with open(self.vocab_file, encoding="utf-8") as f:
            self.encoder: dict = json.load(f)
        if not isinstance(self.encoder, dict):
            raise ValueError(f"{self.vocab_file}: expected a JSON object token -> id")
        self.decoder = {i: t for t, i in self.encoder.items()}
        if len(self.decoder) != len(self.encoder):
            raise ValueError(f"{self.vocab_file}: ids are not unique")
        self.ranks: dict = {}
        with open(self.merge_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line or (lineno == 1 and line.startswith("#version")):
                    continue
                parts = line.split(" ")
                if len(parts) != 2:
                    raise ValueError(f"{self.merge_file}:{lineno}: expected 'left right'")
                self.ranks[(parts[0], parts[1])] = len(self.ranks)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        missing = [c for c in self.byte_encoder.values() if c not in self.encoder]
        if missing:
            raise ValueError(f"{self.vocab_file}: byte-level base tokens missing: {missing[:5]}")
        if eod_token not in self.encoder:
            raise ValueError(f"{self.vocab_file}: no end-of-document token {eod_token!r}")
        self.eod_token = eod_token
        self.eod = self.encoder[eod_token]
        self._cache: dict = {}
        self._split = _split_regex()

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, piece: str) -> tuple[int, ...]:
        parts = list(piece)
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                r = ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best_rank is None:
                break
            a, b = parts[best], parts[best + 1]
            merged, i, n = [], 0, len(parts)
            while i < n:
                if i < n - 1 and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.encoder[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-document token)."""
        ids: list[int] = []
        cache, byte_encoder = self._cache, self.byte_encoder
        for piece in self._split.findall(text):
            got = cache.get(piece)
            if got is None:
                mapped = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
                got = self._bpe(mapped)
                if len(cache) < 500_000:
                    cache[piece] = got
            ids.extend(got)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 from a cut sequence becomes U+FFFD)."""
        chars = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")

    tokenize = encode
    detokenize = decode


_TOKENIZERS: dict = {}


def load_tokenizer(vocab_file: str, merge_file: str) -> ByteLevelBPETokenizer:
    """A :class:`ByteLevelBPETokenizer`, shared per process while the files are unchanged (its
    word cache stays warm across calls)."""
    key = tuple(
        (os.path.realpath(p), os.stat(p).st_mtime_ns, os.stat(p).st_size)
        if os.path.isfile(p)
        else p
        for p in (str(vocab_file), str(merge_file))
    )
    tok = _TOKENIZERS.get(key)
    if tok is None:
        tok = _TOKENIZERS[key] = ByteLevelBPETokenizer(vocab_file, merge_file)
    return tok


# --------------------------------------------------------------------------------------------
# jsonl reading with precise errors
# --------------------------------------------------------------------------------------------


class JsonlError(ValueError):
    """A problem in an input jsonl file; the message names the file and the line number."""

    def __init__(self, path: str, lineno: int | None, message: str) -> None:
        self.path, self.lineno = str(path), lineno
        self.message = message
        where = f"{self.path}:{lineno}" if lineno is not None else self.path
        super().__init__(f"{where}: {message}")

    def __reduce__(self):
        return (type(self), (self.path, self.lineno, self.message))


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".xz") or path.endswith(".lzma"):
        return lzma.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def iter_jsonl(path: str, json_key: str = DEFAULT_JSON_KEY) -> Iterator[tuple[int, str, int]]:
    """Yield ``(line_number, text, raw_line_bytes)`` for each non-blank line of a jsonl file.

    ``.gz``, ``.xz``/``.lzma`` and ``.bz2`` files are decompressed on the fly. Raises
    :class:`JsonlError` naming the file and line for: undecodable UTF-8, invalid JSON, a line
    that is not a JSON object, a missing key, or a value that is not a string.
    """
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise JsonlError(path, None, "is a directory, expected a jsonl file")
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise JsonlError(
                        path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                    )
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise JsonlError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})")
                if not isinstance(obj, dict):
                    raise JsonlError(
                        path, lineno, f"expected a JSON object, got {type(obj).__name__}"
                    )
                if json_key not in obj:
                    keys = ", ".join(repr(k) for k in list(obj)[:10]) or "none"
                    raise JsonlError(path, lineno, f"key {json_key!r} not found (keys: {keys})")
                text = obj[json_key]
                if not isinstance(text, str):
                    raise JsonlError(
                        path,
                        lineno,
                        f"value of {json_key!r} is {type(text).__name__}, expected a string",
                    )
                yield lineno, text, len(raw)
    except (OSError, EOFError, lzma.LZMAError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise JsonlError(path, lineno + 1, f"cannot read file: {e}") from e


# --------------------------------------------------------------------------------------------
# jsonl -> indexed dataset
# --------------------------------------------------------------------------------------------


@dataclass
class PreprocessStats:
    documents: int = 0  # documents written
    empty_skipped: int = 0  # documents with no tokens (and no EOD), not written
    tokens: int = 0  # tokens written, EOD included
    input_bytes: int = 0  # bytes of jsonl read (uncompressed)
    seconds: float = 0.0


_WORKER_TOKENIZER: ByteLevelBPETokenizer | None = None


def _worker_init(vocab_file: str, merge_file: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(vocab_file, merge_file)  # warm when forked


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
    vocab_file: str | None = None,
    merge_file: str | None = None,
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
    stats). Token dtype: uint16 when the vocabulary fits, else int32 (Megatron's
    ``DType.optimal_dtype``).

    The output is written to temporary files next to the prefix and renamed into place only
    when complete (``.bin`` first, then ``.idx``), so a failed or interrupted run never leaves a
    readable half-written dataset. Progress (docs/s, MB/s) goes to ``log`` (default: the module
    logger at INFO) every ``log_interval`` seconds.

    Raises ``FileNotFoundError`` for a missing input/tokenizer file and :class:`JsonlError`
    (naming the file and line) for a bad line.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    log = log or logger.info
    files = default_tokenizer_files()
    vocab_file = str(vocab_file or files.vocab_file)
    merge_file = str(merge_file or files.merge_file)
    input_path = str(input_path)
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"input file not found: {input_path}")
    tokenizer = load_tokenizer(vocab_file, merge_file)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)

    output_prefix = os.path.abspath(str(output_prefix))
    out_dir = os.path.dirname(output_prefix)
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
        for nbytes, ids in zip(batch_meta, batch_ids):
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

    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        if workers > 1:
            # Reading and JSON checks stay in this process (errors name the exact line); the
            # workers only tokenize, a bounded number of batches in flight, results in order.
            # fork where available: a spawned worker would re-import megatron-core (~10 s).
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            pool = ctx.Pool(workers, initializer=_worker_init, initargs=(vocab_file, merge_file))
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
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, output_prefix + ".bin")
        os.replace(tmp_idx, output_prefix + ".idx")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for p in (tmp_bin, tmp_idx):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
    stats.seconds = time.monotonic() - start
    el = max(stats.seconds, 1e-9)
    log(
        f"done: {input_path} -> {output_prefix}.bin/.idx: {stats.documents} docs, "
        f"{stats.tokens} tokens, {stats.empty_skipped} empty skipped, {stats.seconds:.1f} s "
        f"({stats.documents / el:.1f} docs/s, {stats.input_bytes / el / 1e6:.2f} MB/s)"
    )
    return stats


# --------------------------------------------------------------------------------------------
# The default corpus, prepared once into a cache directory
# --------------------------------------------------------------------------------------------

DEFAULT_CORPUS_NAME = "kjv"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _default_cache_key() -> str:
    files = default_tokenizer_files()
    h = hashlib.sha256(f"format={CACHE_FORMAT_VERSION};eod=1".encode())
    for p in (str(default_corpus_file()), files.vocab_file, files.merge_file):
        h.update(_sha256(p).encode())
    return h.hexdigest()[:16]


def _is_complete(dataset_dir: Path, prefix: Path) -> bool:
    return (
        (dataset_dir / "meta.json").is_file()
        and Path(str(prefix) + ".bin").is_file()
        and Path(str(prefix) + ".idx").is_file()
    )


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock (POSIX); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_default_corpus(cache_dir: os.PathLike | None = None, workers: int = 1) -> str:
    """Build the default corpus' indexed dataset into ``cache_dir`` if absent; return its prefix.

    The returned prefix is what megatron.training takes as ``--data-path`` (``prefix.bin`` and
    ``prefix.idx`` exist). The dataset lives in ``cache_dir/kjv-<key>/`` where ``key`` hashes
    the corpus and tokenizer files, so editing either gives a new dataset. It is built in a
    temporary directory inside ``cache_dir`` and renamed into place when complete, so an
    interrupted run never leaves a corrupt dataset; concurrent callers (e.g. all ranks of a
    job) serialize on a lock file and the later ones find the finished dataset. Idempotent:
    a second call only hashes ~1.5 MB of inputs and returns. The tokenizer is
    :func:`default_tokenizer_files`; EOD is appended to every document.

    ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus = default_corpus_file()
    if not corpus.is_file():
        raise FileNotFoundError(
            f"default corpus not found: {corpus} (set MEGATRON_MHC_DATA_DIR to the repository's "
            "data/ directory)"
        )
    key = _default_cache_key()
    final_dir = cache / f"{DEFAULT_CORPUS_NAME}-{key}"
    prefix = final_dir / f"{DEFAULT_CORPUS_NAME}_text_document"
    if _is_complete(final_dir, prefix):
        return str(prefix)

    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / f".{DEFAULT_CORPUS_NAME}-{key}.lock"):
        if _is_complete(final_dir, prefix):  # built by another process while we waited
            return str(prefix)
        if final_dir.exists():  # not ours to trust (foreign or damaged): rebuild it
            shutil.rmtree(final_dir)
        tmp_dir = Path(tempfile.mkdtemp(dir=cache, prefix=f".{DEFAULT_CORPUS_NAME}-{key}."))
        try:
            tmp_prefix = tmp_dir / prefix.name
            files = default_tokenizer_files()
            stats = preprocess_jsonl(
                str(corpus),
                str(tmp_prefix),
                files.vocab_file,
                files.merge_file,
                json_key=DEFAULT_JSON_KEY,
                append_eod=True,
                workers=workers,
                log_interval=10.0,
            )
            tok = load_tokenizer(files.vocab_file, files.merge_file)
            meta = {
                "corpus": str(corpus),
                "vocab_file": files.vocab_file,
                "merge_file": files.merge_file,
                "vocab_size": tok.vocab_size,
                "eod_id": tok.eod,
                "cache_key": key,
                "format_version": CACHE_FORMAT_VERSION,
                "stats": asdict(stats),
            }
            (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            os.rename(tmp_dir, final_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    return str(prefix)


def default_training_args(
    cache_dir: os.PathLike | None = None, tokenizer: str = "null"
) -> list[str]:
    """megatron.training flags for the default corpus (data built on demand).

    ``tokenizer="null"``: ``--tokenizer-type NullTokenizer --vocab-size V`` (no extra package;
    eod = V - 1 = ``<|endoftext|>``, which is all that training on pre-tokenized data needs).
    ``tokenizer="hf"``: ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizer``
    (same ids and eod; needs ``transformers``).
    """
    prefix = prepare_default_corpus(cache_dir)
    files = default_tokenizer_files()
    with open(files.vocab_file, encoding="utf-8") as f:
        vocab_size = len(json.load(f))
    args = ["--data-path", prefix, "--split", "98,2,0"]
    if tokenizer == "null":
        args += ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab_size)]
    elif tokenizer == "hf":
        args += ["--tokenizer-type", "HuggingFaceTokenizer"]
        args += ["--tokenizer-model", files.tokenizer_dir]
    else:
        raise ValueError(f"tokenizer must be 'null' or 'hf', got {tokenizer!r}")
    return args


__all__ = [
    "EOD_TOKEN",
    "ByteLevelBPETokenizer",
    "JsonlError",
    "PreprocessStats",
    "TokenizerFiles",
    "data_dir",
    "default_cache_dir",
    "default_corpus_file",
    "default_tokenizer_files",
    "default_training_args",
    "iter_jsonl",
    "load_tokenizer",
    "prepare_default_corpus",
    "preprocess_jsonl",
]
