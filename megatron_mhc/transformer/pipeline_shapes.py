"""The n-stream state between pipeline stages, in the shapes Megatron's schedules exchange.

Megatron's pipeline schedules (1F1B, interleaved, and the combined 1F1B of the expert-parallel
overlap) size every tensor they send or receive between stages as [s, micro_batch_size,
hidden_size], from the `micro_batch_size` they are given and `config.hidden_size`; the
interleaved ones offer no hook to change it. With mHC a stage sends the n-stream state
[s, b, n*C], which is the same memory as [s, b*n, C]. So the schedules are run with
`micro_batch_size * n` (they use it for nothing else), and an mHC stack sends and receives its
state as [s, b*n, C] (`HyperConnectionStack.set_input_tensor` and its forward), whatever the
schedule, with or without `variable_seq_lengths`.
"""

import functools

from megatron.core.pipeline_parallel import schedules
from megatron.core.utils import get_model_config


def get_forward_backward_func(*args, **kwargs):
    """Megatron's `get_forward_backward_func`, for models with or without mHC.

    Same arguments and same returned function as Megatron's; for an mHC model the returned
    function passes the schedule `micro_batch_size * n`, the size of the stage-to-stage tensors
    [s, b*n, C] along their second axis.
    """
    forward_backward_func = schedules.get_forward_backward_func(*args, **kwargs)

    @functools.wraps(forward_backward_func)
    def forward_backward_with_stream_shapes(*, model, micro_batch_size, **fb_kwargs):
        config = get_model_config(model[0] if isinstance(model, list) else model)
        if getattr(config, "mhc_active", False):
            micro_batch_size *= config.mhc_num_residual_streams
        return forward_backward_func(model=model, micro_batch_size=micro_batch_size, **fb_kwargs)

    return forward_backward_with_stream_shapes
