"""docs/migration.md's way out of Megatron's checkpoint format, run as written on a real
checkpoint: PyTorch's DCP converter, then the documented unstacking, gives the state dict of the
model build_mhc_gpt_model builds, every key matched and every value the checkpoint's."""

import os
import re

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_mhc.checkpoint_conversion import upgrade_checkpoint
from tests.dist_utils import initialize_model_parallel, run_distributed
from tests.functional.pretrain_runs import REPO
from tests.tiny_gpt import MHC_4_STREAMS, tiny_config

# A torch_dist checkpoint at iteration 2 written by a real run (2 layers, hidden 32, 2 heads,
# FFN 64, n = 4, RMSNorm, vocabulary 8192, sequence 32; earlier HC names, upgraded below).
LEGACY = REPO / "tests" / "functional" / "legacy" / "gpt_tiny_mhc_before_hc_rename"


def _documented_snippet() -> str:
    doc = (REPO / "docs" / "migration.md").read_text()
    section = doc.split("## Out of Megatron's checkpoint format", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _load_exported(rank, world_size, workdir):
    from megatron_mhc.models.gpt import build_mhc_gpt_model

    initialize_model_parallel()
    config = tiny_config(
        num_layers=2,
        ffn_hidden_size=64,
        num_attention_heads=2,
        **MHC_4_STREAMS,
        normalization="RMSNorm",
    )
    model = build_mhc_gpt_model(
        config,
        vocab_size=8192,
        max_sequence_length=32,
        position_embedding_type="rope",
        normalization="RMSNorm",
    )
    os.chdir(workdir)
    namespace = {"model": model}
    exec(_documented_snippet(), namespace)
    state_dict = namespace["state_dict"]
    result = model.load_state_dict(state_dict, strict=False)
    loaded = model.state_dict()
    return {
        "missing": [k for k in result.missing_keys if not k.endswith("_extra_state")],
        "unexpected": list(result.unexpected_keys),
        "equal": all(torch.equal(loaded[k], v) for k, v in state_dict.items()),
        "hc_fn": loaded["decoder.layers.1.mlp_hyper_connection.fn"],
    }


def test_documented_export_is_the_models_state_dict(tmp_path):
    upgrade_checkpoint(LEGACY, tmp_path / "checkpoints")
    dcp_to_torch_save(str(tmp_path / "checkpoints" / "iter_0000002"), tmp_path / "gpt_tiny_mhc.pt")
    (exported,) = run_distributed(_load_exported, 1, str(tmp_path))
    assert exported["missing"] == [] and exported["unexpected"] == []
    assert exported["equal"]
    flat = torch.load(tmp_path / "gpt_tiny_mhc.pt", weights_only=False)
    assert torch.equal(exported["hc_fn"], flat["decoder.layers.mlp_hyper_connection.fn"][1])
