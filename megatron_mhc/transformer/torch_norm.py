"""A pure-PyTorch norm for the local spec that also runs under sequence parallelism."""

import copy

from megatron.core.transformer.torch_norm import WrappedTorchNorm


class SequenceParallelTorchNorm:
    """Megatron's `WrappedTorchNorm` (torch LayerNorm / RMSNorm), allowed with
    `sequence_parallel`.

    Megatron's torch norm refuses sequence parallelism only because its parameters would not be
    marked: under SP each tensor-parallel rank normalises its own sequence shard with the same
    (replicated) weight, so the weight's gradient is a partial sum that Megatron's
    `finalize_model_grads` all-reduces over the tensor-parallel group for every parameter with
    `sequence_parallel=True`, as it does for Transformer Engine's and apex's norms.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if not config.sequence_parallel:
            return WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        # WrappedTorchNorm reads the config only to pick and check the norm.
        unsharded = copy.copy(config)
        unsharded.sequence_parallel = False
        norm = WrappedTorchNorm(unsharded, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm
