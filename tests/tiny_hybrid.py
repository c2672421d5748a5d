"""Tiny HybridModels for the tests: the tiny GPT settings of tests/tiny_gpt.py on a hybrid layer
pattern (`*` attention, `-` MLP, `E` MoE; `|` between pipeline stages).

`tiny_hybrid_config(pattern, **overrides)` is tiny_config with num_layers counted from the
pattern (one layer per symbol, as megatron.training derives it) and Megatron's hybrid-model
initialisation; `build_tiny_hybrid(config, pattern, vp_stage)` builds this pipeline stage's (or
virtual stage's) part through `build_mhc_hybrid_model`. tests/tiny_gpt.py's `forward_backward`
and `logits` run them.
"""

from megatron.core.models.hybrid.hybrid_layer_allocation import get_hybrid_total_layer_count

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.models.hybrid import build_mhc_hybrid_model
from tests.tiny_gpt import SEQ, VOCAB, tiny_config


def tiny_hybrid_config(pattern: str, **overrides) -> MHCTransformerConfig:
    return tiny_config(
        num_layers=get_hybrid_total_layer_count(pattern), is_hybrid_model=True, **overrides
    )


def build_tiny_hybrid(config: MHCTransformerConfig, pattern: str, vp_stage=None, **hybrid_kwargs):
    from megatron.core import parallel_state

    hybrid_kwargs.setdefault("position_embedding_type", "rope")
    return build_mhc_hybrid_model(
        config,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        hybrid_layer_pattern=pattern,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
        **hybrid_kwargs,
    )
