"""The tiny mHC config's mappings, pinned where a wrong Sinkhorn or mixing cannot hide.

The functional golden test (tests/functional/test_pretrain.py) compares 50 training losses of
configs/gpt_tiny_mhc.yaml at 1e-5, then 1e-4, relative. From the default initialisation (base
0, gating 0.01) every H_res starts uniform, where the Sinkhorn projection has converged after one
iteration and K equals its transpose: `mhc_sinkhorn_iterations` 20 -> 19 moves that curve by
1.2e-6 over 20 iterations, and a transposed H_res by as little, both inside the tolerances.

This test pins what such bugs change, at a tolerance that sees them: the tiny config's model
(its `model` sizes and its whole `mhc` section, read from the YAML file) with random,
non-uniform HC parameters (a fixed draw: base ~ N(0, 2^2), gating 1, so that every K is far
from uniform and far from symmetric), one forward pass of fixed tokens, and per HC module the
token mean of the mixing matrix K, with the loss. The first module's K depends on the Sinkhorn
only; every later module reads streams mixed by the modules before it, so a transposed mixing moves
them by 1e-3 or more. Sinkhorn 19 instead of 20 moves the K means of some modules by 1e-3
(measured), a transposed H_res by 1e-2; the pinned values are compared at 1e-6 absolute (K
entries lie in [0, 1]) and the loss at 1e-6 relative, above the last-bit differences of one fp32
forward pass between CPUs (about 1e-7).

Regenerate the pinned values (only after a deliberate change of the model or the config) with
    MHC_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_golden_sensitivity.py
"""

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_mhc.training.yaml_config import load_yaml_config
from tests import dist_utils
from tests.tiny_gpt import (
    batches,
    build_tiny_gpt,
    forward_backward,
    randomize_hc_parameters,
    tiny_config,
)

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "gpt_tiny_mhc.yaml"
PINNED = Path(__file__).resolve().parent / "golden" / "gpt_tiny_mhc_first_step_mappings.json"
# The config's `model` fields that shape the decoder (sequence length and vocabulary are the
# tiny test model's: the mappings are per token).
MODEL_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "init_method_std",
    "normalization",
)
HC_DRAW_SEED = 2026
BASE_STD = 2.0
GATING = 1.0
COMB_ATOL = 1e-6
LOSS_RTOL = 1e-6


def _tiny_config_fields(parser) -> dict:
    values = load_yaml_config(str(TINY_CONFIG), parser)
    fields = {name: values[name] for name in MODEL_FIELDS}
    fields.update(
        {
            name: value
            for name, value in values.items()
            if name.startswith("mhc_") or name == "enable_mhc_connections"
        }
    )
    return fields


def _first_step_mappings(rank, world_size, fields):
    from megatron_mhc.transformer.hyper_connection import HyperConnectionModule

    dist_utils.initialize_model_parallel(seed=1234)
    model = build_tiny_gpt(tiny_config(**fields))
    randomize_hc_parameters(model, HC_DRAW_SEED, BASE_STD, GATING)
    comb_means = {}
    for name, module in model.named_modules():
        if isinstance(module, HyperConnectionModule):
            module.register_forward_hook(
                lambda _m, _args, out, name=name: comb_means.__setitem__(
                    name, out.comb.flatten(0, -3).mean(0).tolist()
                )
            )
    loss = forward_backward(model, batches(seed=11), forward_only=True)
    return {"loss": loss, "comb_mean": comb_means}


def test_tiny_config_first_step_mappings_match_pinned_values(parser):
    fields = _tiny_config_fields(parser)
    got = dist_utils.run_distributed(_first_step_mappings, 1, fields)[0]
    assert len(got["comb_mean"]) == 2 * fields["num_layers"]
    if os.environ.get("MHC_REGENERATE_GOLDEN") == "1":
        PINNED.parent.mkdir(exist_ok=True)
        PINNED.write_text(
            json.dumps(
                {
                    "what": "token mean of K per HC module and the loss: one forward pass of "
                    "configs/gpt_tiny_mhc.yaml's model with random HC parameters "
                    "(tests/unit/test_golden_sensitivity.py)",
                    **got,
                },
                indent=1,
            )
            + "\n"
        )
    pinned = json.loads(PINNED.read_text())
    assert got["comb_mean"].keys() == pinned["comb_mean"].keys()
    differences = {}
    for name, comb in pinned["comb_mean"].items():
        # Non-uniform, non-symmetric mixing: the bugs this test is for would show.
        k = torch.tensor(comb)
        assert (k - k.T).abs().max() > 0.05, name
        differences[name] = (torch.tensor(got["comb_mean"][name]) - k).abs().max().item()
    worst = max(differences, key=differences.get)
    assert differences[worst] <= COMB_ATOL, (worst, differences)
    assert got["loss"] == pytest.approx(pinned["loss"], rel=LOSS_RTOL)
