"""The embedded corpus' indexed dataset, built once into a cache directory (atomically, under a
lock) and reused; its prefix is what ``--default-corpus`` trains on."""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from megatron_mhc.data.jsonl import DEFAULT_JSON_KEY
from megatron_mhc.data.paths import default_cache_dir, default_corpus_file, default_tokenizer_file
from megatron_mhc.data.preprocess import preprocess_jsonl
from megatron_mhc.data.tokenizer import load_tokenizer

DEFAULT_CORPUS_NAME = "kjv"
#: Bump when the layout of the cached default dataset changes (invalidates old caches).
CACHE_FORMAT_VERSION = 1


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _default_cache_key() -> str:
    """Hash of what the dataset's bytes depend on: the corpus and the tokenizer file."""
    h = hashlib.sha256(f"format={CACHE_FORMAT_VERSION};eod=1".encode())
    for p in (default_corpus_file(), default_tokenizer_file()):
        h.update(_sha256(str(p)).encode())
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
    :func:`~megatron_mhc.data.paths.default_tokenizer_file`; EOD is appended to every document.

    ``cache_dir`` defaults to :func:`~megatron_mhc.data.paths.default_cache_dir`.
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
            tokenizer_file = str(default_tokenizer_file())
            stats = preprocess_jsonl(
                str(corpus),
                str(tmp_prefix),
                tokenizer_file,
                json_key=DEFAULT_JSON_KEY,
                append_eod=True,
                workers=workers,
                log_interval=10.0,
            )
            tokenizer = load_tokenizer(tokenizer_file)
            meta = {
                "corpus": str(corpus),
                "tokenizer_file": tokenizer_file,
                "vocab_size": tokenizer.vocab_size,
                "eod_id": tokenizer.eod,
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
