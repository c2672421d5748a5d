"""Pretraining data: shipped tokenizer, jsonl -> indexed dataset, GPTDataset, default corpus,
and the launch checks of --data-path and the tokenizer flags."""

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import types
from pathlib import Path

import numpy
import pytest

from megatron_mhc.data import default_corpus
from megatron_mhc.data.default_corpus import prepare_default_corpus
from megatron_mhc.data.flag_checks import check_data_paths, check_tokenizer_files
from megatron_mhc.data.jsonl import JsonlError
from megatron_mhc.data.paths import default_tokenizer_dir, default_tokenizer_file
from megatron_mhc.data.preprocess import preprocess_jsonl
from megatron_mhc.data.tokenizer import DocumentTokenizer

TOOLS = Path(__file__).resolve().parents[2] / "tools"

DOCS = [
    "In the beginning God created the heaven and the earth.",
    "Caf\u00e9 \u2014 na\u00efve \u201cquotes\u201d, digits 12,345 and emoji \U0001f600.\n\n"
    "New paragraph.",
    "",  # empty: skipped
    "Short.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # tabs\tand   spaces   \n",
]
NON_EMPTY = [d for d in DOCS if d]


@pytest.fixture(scope="module")
def tokenizer():
    return DocumentTokenizer(default_tokenizer_file())


@pytest.fixture(scope="module")
def golden():
    """ids and corpus dataset hashes recorded by tools/train_tokenizer.py."""
    return json.loads((default_tokenizer_dir() / "golden.json").read_text(encoding="utf-8"))


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def default_training_args(cache_dir, tokenizer="null"):
    """megatron.training flags for the default corpus (data built on demand)."""
    args = ["--data-path", prepare_default_corpus(cache_dir), "--split", "98,2,0"]
    if tokenizer == "null":
        return args + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "8192"]
    return args + [
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(default_tokenizer_dir()),
    ]


def write_jsonl(path, docs, key="text", gz=False):
    lines = "".join(json.dumps({key: d, "meta": i}) + "\n" for i, d in enumerate(docs))
    lines += "\n"  # a blank line is ignored
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def null_tokenizer(vocab_size):
    """The tokenizer megatron.training builds for --tokenizer-type NullTokenizer --vocab-size V."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    args = types.SimpleNamespace(
        tokenizer_type="NullTokenizer",
        vocab_size=vocab_size,
        pad_vocab_size=True,
        padded_vocab_size=None,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1,
        rank=0,
    )
    tok = build_tokenizer(args)
    return tok, args


# ------------------------------------------------------------------------------ tokenizer


def test_shipped_tokenizer_layout(tokenizer):
    assert tokenizer.vocab_size == 8192
    assert tokenizer.eod == tokenizer.vocab_size - 1  # NullTokenizer --vocab-size 8192 agrees
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(default_tokenizer_file()))
    b2u = load_tool("train_tokenizer").bytes_to_unicode()
    assert all(hf.token_to_id(b2u[b]) == b for b in range(256))
    tok, args = null_tokenizer(tokenizer.vocab_size)
    assert tok.eod == tokenizer.eod and tok.vocab_size == tokenizer.vocab_size
    assert args.padded_vocab_size == 8192


def test_tokenizer_matches_golden_ids(tokenizer, golden):
    """ids recorded from Hugging Face `tokenizers` (tokenizer.json) at training time."""
    assert len(golden["cases"]) >= 5
    for case in golden["cases"]:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]
        assert tokenizer.decode(case["ids"]) == case["text"]


def test_literal_eod_text_is_not_special(tokenizer):
    ids = tokenizer.encode("a <|endoftext|> b")
    assert tokenizer.eod not in ids
    assert tokenizer.decode(ids) == "a <|endoftext|> b"


def test_huggingface_tokenizer_route_agrees(tokenizer):
    """--tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizer (transformers is in
    the `test` extra; training with this route needs it installed)."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    args = types.SimpleNamespace(
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=str(default_tokenizer_dir()),
        vocab_file=None,
        merge_file=None,
        chat_template=None,
        special_tokens=None,
        tokenizer_hf_no_use_fast=False,
        trust_remote_code=False,
        tokenizer_hf_no_include_special_tokens=False,
        metadata_path=None,
        pad_vocab_size=False,
    )
    hf = build_tokenizer(args)
    assert hf.vocab_size == tokenizer.vocab_size and hf.eod == tokenizer.eod
    for text in NON_EMPTY:
        assert hf.tokenize(text) == tokenizer.encode(text)


# ------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("append_eod,gz", [(True, False), (False, True)])
def test_preprocess_round_trip(tmp_path, tokenizer, append_eod, gz):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = write_jsonl(tmp_path / ("in.jsonl.gz" if gz else "in.jsonl"), DOCS, gz=gz)
    prefix = tmp_path / "out" / "ds"
    logs = []
    stats = preprocess_jsonl(src, prefix, append_eod=append_eod, log=logs.append)
    assert stats.documents == len(NON_EMPTY) and stats.empty_skipped == 1
    assert any("docs/s" in m and "MB/s" in m for m in logs)
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx"]  # no temp files left

    ds = IndexedDataset(str(prefix))
    assert len(ds) == len(NON_EMPTY)
    assert ds.sequence_lengths.dtype == numpy.int32 and ds.index.dtype == numpy.uint16
    assert list(ds.document_indices) == list(range(len(NON_EMPTY) + 1))
    total = 0
    for i, text in enumerate(NON_EMPTY):
        want = tokenizer.encode(text) + ([tokenizer.eod] if append_eod else [])
        assert ds[i].tolist() == want
        total += len(want)
    assert stats.tokens == total


def test_preprocess_workers_match_single(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", NON_EMPTY * 40)
    preprocess_jsonl(src, tmp_path / "a", append_eod=True, workers=1, log=lambda m: None)
    preprocess_jsonl(src, tmp_path / "b", append_eod=True, workers=2, log=lambda m: None)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


def test_gpt_dataset_sample(tmp_path, tokenizer):
    """As megatron.training does: BlendedMegatronDatasetBuilder + GPTDatasetConfig."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    src = write_jsonl(tmp_path / "in.jsonl", NON_EMPTY * 10)
    prefix = str(tmp_path / "ds")
    preprocess_jsonl(src, prefix, append_eod=True, log=lambda m: None)
    stream = []
    for text in NON_EMPTY * 10:
        stream += tokenizer.encode(text) + [tokenizer.eod]

    tok, _ = null_tokenizer(tokenizer.vocab_size)
    seq = 16
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=seq,
        blend=([prefix], None),
        split="100,0,0",
        path_to_cache=str(tmp_path / "cache"),
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [8, None, None], lambda: True, config
    ).build()
    assert valid is None and test is None
    assert len(train) >= 8
    joined = " ".join(map(str, stream))
    for idx in (0, 5):
        sample = train[idx]
        tokens, labels = sample["tokens"], sample["labels"]
        assert tokens.shape == (seq,) and labels.shape == (seq,)
        assert tokens[1:].tolist() == labels[:-1].tolist()
        window = tokens.tolist() + labels[-1:].tolist()
        # a contiguous window of the document stream (documents are shuffled, but the
        # corpus repeats the same documents, and windows within one document match)
        assert all(0 <= t < tokenizer.vocab_size for t in window)
        assert " ".join(map(str, window[:4])) in joined
        assert sample["loss_mask"].sum() == seq
        assert sample["position_ids"].tolist() == list(range(seq))


# ------------------------------------------------------------------------------ bad input


def test_missing_input_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        preprocess_jsonl(tmp_path / "nope.jsonl", tmp_path / "out")


@pytest.mark.parametrize(
    "lines,lineno,match",
    [
        (['{"text": "ok"}', '{"body": "no text key"}'], 2, "key 'text' not found"),
        (['{"text": "ok"}', "", '{"text": "unterminated'], 3, "invalid JSON"),
        (['{"text": "ok"}', '["a list"]'], 2, "expected a JSON object"),
        (['{"text": 42}'], 1, "value of 'text' is int"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, lines, lineno, match):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(JsonlError, match=match) as err:
        preprocess_jsonl(src, tmp_path / "out" / "ds", log=lambda m: None)
    assert f"{src}:{lineno}:" in str(err.value)
    assert err.value.lineno == lineno
    assert not (tmp_path / "out").exists()  # nothing left behind, not even the new folder


def _cli_args(src, json_key, output_prefix) -> list:
    """preprocess_data's arguments for `src`, read at `json_key`, with end-of-document tokens."""
    return [
        "--input",
        str(src),
        "--json-key",
        json_key,
        "--output-prefix",
        str(output_prefix),
        "--append-eod",
    ]


def test_cli_reports_bad_line(tmp_path, capsys):
    cli = load_tool("preprocess_data")

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n{"content": "x"}\n', encoding="utf-8")
    rc = cli.main(_cli_args(src, "text", tmp_path / "o"))
    assert rc == 2
    assert f"{src}:2: key 'text' not found" in capsys.readouterr().err

    rc = cli.main(
        ["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "o")]
    )
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err

    src.write_text('{"content": "fine"}\n', encoding="utf-8")
    rc = cli.main([*_cli_args(src, "content", tmp_path / "o"), "--log-interval", "0"])
    out = capsys.readouterr()
    assert rc == 0 and f"--data-path {tmp_path / 'o'}" in out.out
    assert "docs/s" in out.err and "MB/s" in out.err


# ------------------------------------------------------------------------------ default corpus


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory):
    """One cache directory (one full build of the corpus) for the tests below."""
    return tmp_path_factory.mktemp("mhc_cache")


def test_prepare_default_corpus_idempotent(default_cache, tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    cache = default_cache
    # debris of an interrupted run: a temp dir that must be ignored
    (cache / ".kjv-deadbeef.xyz").mkdir(parents=True)
    prefix = prepare_default_corpus(cache)
    for ext in (".bin", ".idx"):
        assert os.path.isfile(prefix + ext)
    stamp = {ext: os.stat(prefix + ext).st_mtime_ns for ext in (".bin", ".idx")}

    assert prepare_default_corpus(cache) == prefix  # second call: nothing rebuilt
    assert {ext: os.stat(prefix + ext).st_mtime_ns for ext in (".bin", ".idx")} == stamp
    entries = [e for e in os.listdir(cache) if not e.endswith(".lock")]
    dataset_dir = os.path.basename(os.path.dirname(prefix))
    assert sorted(entries) == sorted([".kjv-deadbeef.xyz", dataset_dir])

    ds = IndexedDataset(prefix)
    meta = json.loads(open(os.path.join(os.path.dirname(prefix), "meta.json")).read())
    assert len(ds) == meta["stats"]["documents"] == 1189  # one per chapter
    assert int(ds.sequence_lengths.sum()) == meta["stats"]["tokens"]
    first = ds[0].tolist()
    assert first[-1] == tokenizer.eod
    assert tokenizer.decode(first[:-1]).startswith("Genesis 1\n\nIn the beginning God created")

    # a damaged final directory (e.g. someone deleted a file) is rebuilt, not trusted
    os.remove(prefix + ".idx")
    assert prepare_default_corpus(cache) == prefix
    rebuilt = IndexedDataset(prefix)  # keep a reference: items are views of its mmap
    assert rebuilt[0].tolist() == first
    assert rebuilt.sequence_lengths.tolist() == ds.sequence_lengths.tolist()


def test_default_corpus_dataset_bytes_match_golden(default_cache, golden):
    """The whole corpus' ids (and the dataset's bytes) are the ones recorded when the tokenizer
    was trained: sha256 of the .bin and .idx."""
    prefix = prepare_default_corpus(default_cache)
    want = golden["default_corpus_dataset"]
    for ext in ("bin", "idx"):
        got = hashlib.sha256(Path(f"{prefix}.{ext}").read_bytes()).hexdigest()
        assert got == want[f"{ext}_sha256"], ext
    meta = json.loads((Path(prefix).parent / "meta.json").read_text())
    assert (meta["stats"]["documents"], meta["stats"]["tokens"]) == (
        want["documents"],
        want["tokens"],
    )


def test_prepare_default_corpus_interrupted_leaves_nothing(tmp_path, monkeypatch):
    """An interruption while building leaves no dataset (and no temp dir) behind."""

    def interrupted(input_path, output_prefix, *args, **kwargs):
        with open(str(output_prefix) + ".bin", "wb") as f:  # partial output...
            f.write(b"\0" * 10)
        raise KeyboardInterrupt  # ...then the user hits ^C

    monkeypatch.setattr(default_corpus, "preprocess_jsonl", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_default_corpus(tmp_path)
    assert [e for e in os.listdir(tmp_path) if not e.endswith(".lock")] == []


def test_training_args_parse_with_megatron_and_pass_the_launch_checks(default_cache, monkeypatch):
    """The flags exist in megatron.training's own parser, mean what we intend, and the parsed
    namespace passes check_data_paths and check_tokenizer_files."""
    from megatron.training.arguments import parse_args

    for kind in ("null", "hf"):
        flags = default_training_args(default_cache, tokenizer=kind)
        monkeypatch.setattr("sys.argv", ["pretrain"] + flags)
        args = parse_args()
        assert args.data_path == [flags[flags.index("--data-path") + 1]]
        assert args.split == "98,2,0"
        if kind == "null":
            assert (args.tokenizer_type, args.vocab_size) == ("NullTokenizer", 8192)
        else:
            assert args.tokenizer_type == "HuggingFaceTokenizer"
            assert args.tokenizer_model == str(default_tokenizer_dir())
        check_data_paths(args.data_path)
        check_tokenizer_files(args)


# ------------------------------------------------------------------------------ empty input


@pytest.mark.parametrize(
    "content", ["", "\n\n", '{"text": ""}\n\n{"text": ""}\n'], ids=["empty", "blank", "no-text"]
)
def test_input_without_text_is_an_error_naming_the_file(tmp_path, content):
    src = tmp_path / "in.jsonl"
    src.write_text(content, encoding="utf-8")
    with pytest.raises(JsonlError, match="no document with text under key 'text'") as err:
        preprocess_jsonl(src, tmp_path / "out" / "ds", log=lambda m: None)
    assert str(err.value).startswith(f"{src}: ")
    assert not (tmp_path / "out").exists()  # no 0-byte .bin for training to trip on

    rc = load_tool("preprocess_data").main(
        ["--input", str(src), "--output-prefix", str(tmp_path / "out" / "ds"), "--append-eod"]
    )
    assert rc == 2 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ launch checks


@pytest.fixture
def dataset_prefix(tmp_path):
    prefix = tmp_path / "ds"
    preprocess_jsonl(write_jsonl(tmp_path / "in.jsonl", NON_EMPTY), prefix, log=lambda m: None)
    return str(prefix)


def test_check_data_paths_accepts_datasets_and_weighted_blends(dataset_prefix):
    check_data_paths(None)  # flag not given: --mock-data or --default-corpus
    check_data_paths([dataset_prefix])
    check_data_paths(["0.3", dataset_prefix, "0.7", dataset_prefix])


@pytest.mark.parametrize("blend", ["plain", "weighted"])
def test_check_data_paths_names_flag_path_and_expected_files(tmp_path, dataset_prefix, blend):
    missing = str(tmp_path / "my_corpus_text_document")
    paths = [missing] if blend == "plain" else ["0.3", dataset_prefix, "0.7", missing]
    with pytest.raises(ValueError) as err:
        check_data_paths(paths)
    message = str(err.value)
    assert message.startswith(f"--data-path {missing}: ")
    assert f"{missing}.bin and {missing}.idx" in message and "does not exist" in message
    assert f"--output-prefix {missing}" in message


def test_check_data_paths_refuses_empty_files_and_extensions(dataset_prefix):
    with pytest.raises(ValueError, match=r"give the prefix without the extension"):
        check_data_paths([dataset_prefix + ".bin"], flag="--train-data-path")
    Path(dataset_prefix + ".bin").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"--data-path {dataset_prefix}: .*\.bin is empty"):
        check_data_paths([dataset_prefix])
    with pytest.raises(ValueError, match="--data-path is given without a dataset prefix"):
        check_data_paths([])


def _tokenizer_args(**flags):
    fields = {"tokenizer_model": None, "vocab_file": None, "merge_file": None, "vocab_size": None}
    return argparse.Namespace(**{**fields, **flags})


def test_check_tokenizer_files_accepts_existing_files_and_hub_ids():
    shipped = default_tokenizer_dir()
    for flags in (
        {"tokenizer_type": "NullTokenizer", "vocab_size": 8192},
        {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(shipped)},
        {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "gpt2"},
        {
            "tokenizer_type": "GPT2BPETokenizer",
            "vocab_file": str(shipped / "vocab.json"),
            "merge_file": str(shipped / "merges.txt"),
        },
    ):
        check_tokenizer_files(_tokenizer_args(**flags))


@pytest.mark.parametrize(
    "flags,match",
    [
        (
            {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "./no/tokenizer"},
            r"--tokenizer-model \./no/tokenizer: does not exist, expected a directory",
        ),
        (
            {"tokenizer_type": "HuggingFaceTokenizer"},
            r"HuggingFaceTokenizer needs --tokenizer-model",
        ),
        (
            {
                "tokenizer_type": "GPT2BPETokenizer",
                "vocab_file": str(default_tokenizer_dir() / "vocab.json"),
                "merge_file": "/no/m.txt",
            },
            r"--merge-file /no/m\.txt: does not exist, expected the tokenizer's BPE merges file",
        ),
        (
            {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": "/no/sp.model"},
            r"--tokenizer-model /no/sp\.model: does not exist",
        ),
        ({"tokenizer_type": "NullTokenizer"}, r"NullTokenizer needs --vocab-size"),
    ],
    ids=["hf-missing-dir", "hf-no-model", "gpt2bpe-missing-merges", "sp-missing", "null-no-size"],
)
def test_check_tokenizer_files_names_flag_and_path(flags, match):
    with pytest.raises(ValueError, match=match):
        check_tokenizer_files(_tokenizer_args(**flags))
