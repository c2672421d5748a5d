"""HyperConnectionTransformerBlock: expand to n streams on entry, contract before the final norm."""

import torch
from torch import Tensor

from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import WrappedTensor

from megatron_mhc.fusions import get_backend
from megatron_mhc.transformer.hyper_connection import HyperConnectionHead
from megatron_mhc.transformer.recompute import MHCRecomputeManager, recompute_block_size


def expand_streams(hidden_states: Tensor, num_streams: int) -> Tensor:
    """[s, b, C] -> [s, b, n*C]: every stream starts as the embedding output (SPEC)."""
    return hidden_states.unsqueeze(-2).expand(*hidden_states.shape[:-1], num_streams, -1).flatten(-2)


class HyperConnectionTransformerBlock(TransformerBlock):
    """A TransformerBlock whose layers carry the n-stream residual [s, b, n*C].

    The first pipeline stage expands the embedding output into n streams; the stage holding the
    final norm contracts them (`mean`, or the `learned` head) right before that norm, through a
    forward pre-hook on `final_layernorm`: Megatron's own forward (full recompute, layer
    extraction) stays untouched and the norm keeps the baseline's parameter names. Stages in
    between exchange [s, b, n*C] (see `pipeline_shapes.get_forward_backward_func`). With
    `mhc_recompute_layer_num`, an MHCRecomputeManager frees the stream states inside each block of
    L_r of this stage's layers after forward and recomputes them in backward.
    """

    def __init__(self, config, spec, post_layer_norm: bool = True, pre_process: bool = True,
                 post_process: bool = True, **kwargs):
        super().__init__(config, spec, post_layer_norm=post_layer_norm, pre_process=pre_process,
                         post_process=post_process, **kwargs)
        self.num_streams = config.mhc_num_residual_streams
        self.recompute_block_size = recompute_block_size(
            config.mhc_recompute_layer_num, self.num_streams, len(self.layers)
        )
        self.recompute_manager = None
        if self.recompute_block_size is not None:
            self.recompute_manager = MHCRecomputeManager(
                self.layers, self.recompute_block_size, get_backend(config.mhc_kernel_backend)
            )
        if not post_process:
            return
        if self.final_layernorm is None:
            raise ValueError(
                "HyperConnectionTransformerBlock contracts the streams before the final norm: the "
                "last pipeline stage needs one (post_layer_norm=True and a layer_norm in the spec)"
            )
        if config.mhc_output_contract == "learned":
            self.mhc_head = HyperConnectionHead(config)
        self.final_layernorm.register_forward_pre_hook(self._contract_before_final_norm)

    def contract_streams(self, hidden_states: Tensor) -> Tensor:
        """[s, b, n*C] -> [s, b, C] with the configured output contract."""
        streams = hidden_states.unflatten(-1, (self.num_streams, -1))
        if self.config.mhc_output_contract == "learned":
            return self.mhc_head(streams)
        # fp32 accumulation without an fp32 copy of the n-stream state.
        return streams.mean(dim=-2, dtype=torch.float32).to(streams.dtype)

    def _contract_before_final_norm(self, _norm: torch.nn.Module, args: tuple) -> tuple:
        return (self.contract_streams(args[0]), *args[1:])

    def forward(self, hidden_states, *args, **kwargs):
        if self.pre_process:
            if isinstance(hidden_states, WrappedTensor):
                hidden_states = hidden_states.unwrap()
            hidden_states = expand_streams(hidden_states, self.num_streams)
        return super().forward(hidden_states, *args, **kwargs)
