"""The tokenizer that turns documents into token ids: a Hugging Face ``tokenizers`` file
(``tokenizer.json``, read with ``Tokenizer.from_file``), by default the shipped byte-level BPE."""

import os
from collections.abc import Sequence

from tokenizers import Tokenizer

EOD_TOKEN = "<|endoftext|>"


class DocumentTokenizer:
    """Token ids of documents for pretraining, from a ``tokenizer.json``.

    Special tokens in the text are NOT parsed: a literal ``<|endoftext|>`` in a document is
    encoded as ordinary text, since only the preprocessing knows where a document ends and adds
    the end-of-document id (:attr:`eod`) there. No special tokens are added either.

    ``vocab_size``, ``eod`` and ``tokenize``/``detokenize`` mirror Megatron's tokenizer interface.
    """

    def __init__(self, tokenizer_file: os.PathLike | str, eod_token: str = EOD_TOKEN) -> None:
        self.tokenizer_file = str(tokenizer_file)
        if not os.path.isfile(self.tokenizer_file):
            raise FileNotFoundError(f"tokenizer file not found: {self.tokenizer_file}")
        try:
            self._tokenizer = Tokenizer.from_file(self.tokenizer_file)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(
                f"{self.tokenizer_file}: not a Hugging Face tokenizers file ({e})"
            ) from e
        eod = self._tokenizer.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"{self.tokenizer_file}: no end-of-document token {eod_token!r}")
        self._tokenizer.encode_special_tokens = True
        self.eod_token, self.eod = eod_token, eod

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-document token)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 from a cut sequence becomes U+FFFD)."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    tokenize = encode
    detokenize = decode


_TOKENIZERS: dict = {}


def load_tokenizer(tokenizer_file: os.PathLike | str) -> DocumentTokenizer:
    """A :class:`DocumentTokenizer`, shared per process while the file is unchanged (forked
    preprocessing workers inherit it instead of reading the file again)."""
    path = str(tokenizer_file)
    key = (
        (os.path.realpath(path), os.stat(path).st_mtime_ns, os.stat(path).st_size)
        if os.path.isfile(path)
        else path
    )
    tokenizer = _TOKENIZERS.get(key)
    if tokenizer is None:
        tokenizer = _TOKENIZERS[key] = DocumentTokenizer(path)
    return tokenizer
