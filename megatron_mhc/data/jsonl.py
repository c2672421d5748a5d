"""Reading jsonl documents (plain, ``.gz``, ``.xz``/``.lzma``, ``.bz2``), with errors that name
the file and the line."""

import bz2
import gzip
import json
import lzma
import os
from collections.abc import Iterator

DEFAULT_JSON_KEY = "text"


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
                    ) from e
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise JsonlError(
                        path, lineno, f"invalid JSON: {e.msg} (column {e.colno})"
                    ) from e
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
