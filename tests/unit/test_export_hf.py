"""tools/export_hf.py refuses what it cannot export, by name and before writing anything, on a
real checkpoint (the tiny legacy one of tests/functional/legacy, upgraded): a weight of a layer
kind it does not know, Megatron settings the Hugging Face model does not compute, a training
run whose tokenizer is unknown. The exports themselves are tested end to end in
tests/functional/test_export_hf.py."""

import dataclasses
import json
import subprocess
import sys

import pytest

from megatron_mhc.checkpoint_conversion import (
    _convert_checkpoint,
    _IndexRewrite,
    upgrade_checkpoint,
)
from megatron_mhc.hf import export
from megatron_mhc.hf.megatron_checkpoint import read_checkpoint
from tests.functional.pretrain_runs import REPO

LEGACY = REPO / "tests" / "functional" / "legacy" / "gpt_tiny_mhc_before_hc_rename"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    upgraded = tmp_path_factory.mktemp("legacy") / "checkpoints"
    upgrade_checkpoint(LEGACY, upgraded)
    return upgraded


def test_the_legacy_checkpoint_exports(checkpoint, tmp_path):
    """The refusals below start from a checkpoint that exports (its iteration 2 by its tracker,
    or named by --ckpt-step)."""
    export.export(checkpoint, tmp_path / "hf")
    export.export(checkpoint, tmp_path / "step_2", step=2)
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (
        tmp_path / "step_2" / "model.safetensors"
    ).read_bytes()
    assert json.loads((tmp_path / "hf" / "megatron_args.json").read_text())["iteration"] == 2


def test_a_step_the_checkpoint_lacks_is_refused_by_name(checkpoint, tmp_path):
    with pytest.raises(ValueError) as refused:
        export.export(checkpoint, tmp_path / "hf", step=3)
    assert str(refused.value) == (
        f"--ckpt-step 3: no iter_0000003 in {checkpoint} (found: iter_0000002)"
    )
    assert not (tmp_path / "hf").exists()


def test_a_weight_of_an_unknown_layer_kind_is_refused_by_name_and_nothing_written(
    checkpoint, tmp_path
):
    # The attention output projection stored as a Mamba mixer's: a layer the exporter lacks.
    mamba = tmp_path / "mamba"
    rename = _IndexRewrite(lambda key: key.replace("self_attention.linear_proj", "mixer.in_proj"))
    _convert_checkpoint(checkpoint, mamba, rename)
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_hf.py"), str(mamba), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "export_hf.py: unsupported checkpoint: decoder.layers.0.mixer.in_proj.weight (a weight "
        "the exporter does not know)"
    )
    assert not (tmp_path / "hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mamba"]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"hybrid_layer_pattern": "*M|*-"},
            "unsupported checkpoint: layer 'M' (Mamba) in --hybrid-layer-pattern '*M|*-' (the "
            "exporter supports '*' attention, '+' MLA, '-' MLP and 'E' MoE layers)",
        ),
        (
            {"position_embedding_type": "learned_absolute"},
            "unsupported checkpoint: --position-embedding-type learned_absolute (the exporter "
            "supports rope)",
        ),
    ],
)
def test_unsupported_run_arguments_are_refused_by_name(checkpoint, change, message):
    megatron = read_checkpoint(checkpoint)
    vars(megatron.args).update(change)
    with pytest.raises(ValueError) as refused:
        export.hf_config(megatron)
    assert str(refused.value) == message


def test_unsupported_model_settings_are_refused_by_name(checkpoint):
    megatron = read_checkpoint(checkpoint)
    megatron.config = dataclasses.replace(megatron.config, qk_layernorm=True)
    with pytest.raises(ValueError, match=r"^unsupported checkpoint: qk_layernorm = True "):
        export.hf_config(megatron)


def test_a_run_on_pre_tokenized_data_needs_its_tokenizer_named(checkpoint, tmp_path):
    megatron = read_checkpoint(checkpoint)
    vars(megatron.args).update(default_corpus=False, data_path=["/data/web_text_document"])
    with pytest.raises(ValueError) as refused:
        export._tokenizer_dir(megatron, None)
    assert str(refused.value) == (
        "unknown tokenizer: the run used --tokenizer-type NullTokenizer on "
        "['/data/web_text_document']; give the tokenizer that made this data with --tokenizer DIR"
    )
    assert export._tokenizer_dir(megatron, tmp_path) == tmp_path
