"""What every n-stream layer stack does at its ends, and its recompute plan.

Mixed into Megatron's stacks (TransformerBlock for GPT, HybridStack for HybridModel): the first
pipeline stage expands the embedding output into n streams; the stage holding the final norm
contracts them (`mean`, or the `learned` head) right before that norm, through a forward pre-hook
on the norm, so that Megatron's own stack forward (full recompute, layer extraction) stays
untouched and the norm keeps the baseline's parameter names. Stages in between exchange the
n-stream state, as [s, b*n, C] (see `pipeline_shapes.py`). With `mhc_recompute_layer_num`,
an MHCRecomputeManager frees the stream states inside each block of L_r of this stage's layers
after forward and recomputes them in backward (L_r counts the stack's layers: a GPT layer holds
two residual sublayers, a HybridModel layer one).
"""

import torch
from megatron.core.utils import WrappedTensor, make_viewless_tensor
from torch import Tensor

from megatron_mhc.transformer.hyper_connection import HyperConnectionHead, model_backend
from megatron_mhc.transformer.recompute import MHCRecomputeManager, recompute_block_size


def expand_streams(hidden_states: Tensor, num_streams: int) -> Tensor:
    """[s, b, C] -> [s, b, n*C]: every stream starts as the embedding output."""
    streams = hidden_states.unsqueeze(-2).expand(*hidden_states.shape[:-1], num_streams, -1)
    return streams.flatten(-2)


class HyperConnectionStack:
    """Mixin for a Megatron stack module (`self.layers`, `self.pre_process`,
    `self.post_process`, `self.config`) whose layers carry the n-stream residual.

    The stack's `__init__` calls `setup_hyper_connections(final_norm)` once its layers and final
    norm exist.
    """

    def setup_hyper_connections(self, final_norm: torch.nn.Module | None) -> None:
        """Plan the recompute blocks of this stage and hook the contract onto `final_norm`."""
        config = self.config
        self.num_streams = config.mhc_num_residual_streams
        self.recompute_block_size = recompute_block_size(
            config.mhc_recompute_layer_num, self.num_streams, len(self.layers)
        )
        self.recompute_manager = None
        if self.recompute_block_size is not None:
            self.recompute_manager = MHCRecomputeManager(
                self.layers, self.recompute_block_size, model_backend(config)
            )
            for hyper_connection, plan in self.recompute_manager.module_plans():
                hyper_connection.set_recompute_plan(plan)
        if not self.post_process:
            return
        if final_norm is None:
            raise ValueError(
                f"{type(self).__name__} contracts the streams before the final norm: the last "
                "pipeline stage needs one (post_layer_norm=True and a final norm in the spec)"
            )
        if config.mhc_output_contract == "learned":
            self.mhc_head = HyperConnectionHead(config)
        final_norm.register_forward_pre_hook(self._contract_before_final_norm)

    def contract_streams(self, hidden_states: Tensor) -> Tensor:
        """[s, b, n*C] -> [s, b, C] with the configured output contract."""
        streams = hidden_states.unflatten(-1, (self.num_streams, -1))
        if self.config.mhc_output_contract == "learned":
            return self.mhc_head(streams)
        # fp32 accumulation without an fp32 copy of the n-stream state.
        return streams.mean(dim=-2, dtype=torch.float32).to(streams.dtype)

    def _contract_before_final_norm(self, _norm: torch.nn.Module, args: tuple) -> tuple:
        return (self.contract_streams(args[0]), *args[1:])

    def set_input_tensor(self, input_tensor: Tensor | None) -> None:
        """The previous stage's state, received as [s, b*n, C] (pipeline_shapes.py), viewed as
        [s, b, n*C]; autograd returns its gradient in the received shape."""
        if input_tensor is not None:
            s, bn, hidden = input_tensor.shape
            input_tensor = input_tensor.view(s, bn // self.num_streams, self.num_streams * hidden)
        super().set_input_tensor(input_tensor)

    def forward(self, hidden_states, *args, **kwargs):
        if self.pre_process:
            if isinstance(hidden_states, WrappedTensor):
                hidden_states = hidden_states.unwrap()
            hidden_states = expand_streams(hidden_states, self.num_streams)
        output = super().forward(hidden_states, *args, **kwargs)
        if self.post_process:
            return output
        return self.to_next_stage(output)

    def to_next_stage(self, output: Tensor) -> Tensor:
        """This stage's state [s, b, n*C] as sent to the next stage, [s, b*n, C]."""
        # The schedule frees the storage of what it sent, so the tensor must own it rather than
        # be a view.
        s, b, _ = output.shape
        return make_viewless_tensor(
            inp=output.view(s, b * self.num_streams, -1),
            requires_grad=output.requires_grad,
            keep_graph=True,
        )
