"""The README's examples run as written: the Python ones (build an mHC GPT, one forward and
backward; the same as a HybridModel) and the custom-data commands (preprocess a jsonl, then the
training command's flags name the dataset it wrote)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _example(section: str, language: str) -> str:
    readme = (REPO / "README.md").read_text()
    return re.search(rf"```{language}\n(.*?)```", readme.split(section, 1)[1], re.S).group(1)


def _python_example(section: str) -> str:
    return _example(section, "python")


def _shell_commands(section: str) -> list[str]:
    """The commands of the first bash block after `section`, continuation lines joined."""
    block = _example(section, "bash").replace("\\\n", " ")
    return [line.strip() for line in block.splitlines() if line.strip()]


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "TORCHDYNAMO_DISABLE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _checkout_view(root: Path) -> Path:
    """A directory that the README's commands see as the repository root, but where what they
    write lands under `root`: links to the repository's top-level entries, except `data/`, a
    real directory of links to the repository's data."""
    for entry in REPO.iterdir():
        if entry.name not in ("data", ".git", "runs"):
            (root / entry.name).symlink_to(entry)
    (root / "data").mkdir()
    for entry in (REPO / "data").iterdir():
        (root / "data" / entry.name).symlink_to(entry)
    if not (root / ".venv").exists():  # tests run with another interpreter than make's .venv
        (root / ".venv" / "bin").mkdir(parents=True)
        python = root / ".venv" / "bin" / "python"
        python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        python.chmod(0o755)
    return root


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_readme_python_example_runs():
    stdout = _run(_python_example("## Build an mHC GPT in Python"))
    assert re.search(r"^MHCGPTModel loss \d+\.\d+$", stdout, re.M), stdout


def test_readme_hybrid_example_runs_after_the_gpt_one():
    stdout = _run(
        _python_example("## Build an mHC GPT in Python") + _python_example("### HybridModel")
    )
    assert re.search(r"^HyperConnectionHybridStack loss \d+\.\d+$", stdout, re.M), stdout


def test_readme_custom_data_commands_train_on_the_dataset_they_write(tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.training.arguments import parse_args

    from megatron_mhc.data.flag_checks import check_data_paths, check_tokenizer_files
    from megatron_mhc.data.paths import default_tokenizer_file
    from megatron_mhc.data.tokenizer import DocumentTokenizer
    from megatron_mhc.training.arguments import add_mhc_arguments

    preprocess, train = _shell_commands("### Data")
    assert "tools/preprocess_data.py" in preprocess and "pretrain_gpt_mhc.py" in train
    cwd = _checkout_view(tmp_path)
    docs = ["In the beginning was the Word.", "And the Word was with God.", "Amen."]
    user_file = cwd / _flag(shlex.split(preprocess), "--input")
    user_file.write_text("".join(f'{{"text": "{d}"}}\n' for d in docs))

    proc = subprocess.run(
        ["bash", "-c", preprocess],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The training command up to the launch: its flags parse with pretrain_gpt_mhc.py's own
    # parser (--config applied), and its --data-path and tokenizer pass the launch checks and
    # hold the documents just preprocessed, with the EOD id that --vocab-size implies.
    argv = shlex.split(train)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", argv[argv.index("pretrain_gpt_mhc.py") :])
    args = parse_args(extra_args_provider=add_mhc_arguments)
    check_data_paths(args.data_path)
    check_tokenizer_files(args)
    (prefix,) = args.data_path
    dataset = IndexedDataset(prefix)
    tokenizer = DocumentTokenizer(default_tokenizer_file())
    assert args.vocab_size == tokenizer.vocab_size and tokenizer.eod == args.vocab_size - 1
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        tokenizer.encode(d) + [tokenizer.eod] for d in docs
    ]
