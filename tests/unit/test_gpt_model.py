"""The mHC GPT model against Megatron's baseline GPTModel: n = 1 is the baseline bit for bit;
identity init (built directly or upcycled from a baseline state dict) computes its function."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_mhc.models.upcycling import check_upcycled_names, upcycle_state_dict
from tests.dist_utils import initialize_model_parallel, run_distributed
from tests.tiny_gpt import VOCAB, batches, build_tiny_gpt, logits, tiny_config

SEED = 1234


def _baseline_and_candidate(candidate_overrides, upcycle: bool):
    """Logits and parameter names of a baseline GPTModel and of a candidate built with the
    same seed (or, with `upcycle`, a different seed and the baseline's upcycled state dict)."""
    tokens = batches(seed=7)[0][0]
    initialize_model_parallel(seed=SEED)
    baseline = build_tiny_gpt(tiny_config())
    assert type(baseline) is GPTModel
    config = tiny_config(**candidate_overrides)
    candidate_seed = SEED + 1 if upcycle else SEED
    torch.manual_seed(candidate_seed)
    model_parallel_cuda_manual_seed(candidate_seed)
    candidate = build_tiny_gpt(config)
    if upcycle:
        upcycled = upcycle_state_dict(baseline.state_dict(), config)
        check_upcycled_names(baseline.state_dict(), candidate.state_dict())
        candidate.load_state_dict(upcycled, strict=True)
    baseline.eval()
    candidate.eval()
    with torch.no_grad():
        return (
            logits(baseline, tokens),
            logits(candidate, tokens),
            [n for n, _ in baseline.named_parameters()],
            [n for n, _ in candidate.named_parameters()],
            type(candidate).__name__,
        )


def _one_stream(rank, world_size, overrides):
    return _baseline_and_candidate(overrides, upcycle=False)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(enable_mhc_connections=True, mhc_num_residual_streams=1),
        dict(enable_mhc_connections=False, mhc_num_residual_streams=4),
    ],
    ids=["n1", "disabled"],
)
def test_one_stream_or_disabled_is_the_baseline_bit_for_bit(overrides):
    base, got, base_names, names, kind = run_distributed(_one_stream, 1, overrides)[0]
    assert kind == "GPTModel"
    assert names == base_names
    assert torch.equal(got, base)


def _identity(rank, world_size, overrides, upcycle):
    return _baseline_and_candidate(overrides, upcycle=upcycle)


@pytest.mark.parametrize("upcycle", [False, True], ids=["built", "upcycled"])
@pytest.mark.parametrize("contract", ["mean", "learned"])
def test_identity_init_n4_computes_the_baseline_function(contract, upcycle):
    overrides = dict(
        enable_mhc_connections=True,
        mhc_num_residual_streams=4,
        mhc_init="identity",
        mhc_output_contract=contract,
    )
    base, got, base_names, names, kind = run_distributed(_identity, 1, overrides, upcycle)[0]
    assert kind == "MHCGPTModel"
    assert set(base_names) < set(names)
    assert base.shape == got.shape == (2, 16, VOCAB)
    assert torch.isfinite(got).all()
    scale = base.abs().max()
    torch.testing.assert_close(got / scale, base / scale, rtol=0, atol=1e-5)


def test_upcycling_rejects_a_non_identity_config():
    with pytest.raises(ValueError, match="mhc_init='identity'"):
        upcycle_state_dict({}, tiny_config(enable_mhc_connections=True))


def test_name_check_reports_non_hc_differences():
    baseline = {"decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(2, 2)}
    renamed = {"decoder.layers.0.mlp.fc1.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="missing from mHC.*fc1"):
        check_upcycled_names(baseline, renamed)
