"""HyperConnectionTransformerBlock: Megatron's TransformerBlock on the n-stream residual."""

from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_mhc.transformer.hyper_connection_stack import HyperConnectionStack


class HyperConnectionTransformerBlock(HyperConnectionStack, TransformerBlock):
    """A TransformerBlock whose layers carry the n-stream residual [s, b, n*C].

    Expands the embedding output on the first pipeline stage, contracts the streams before
    `final_layernorm` (a forward pre-hook) and plans the recompute blocks of its stage, as every
    HyperConnectionStack does; L_r counts GPT layers (two residual sublayers each).
    """

    def __init__(
        self,
        config,
        spec,
        post_layer_norm: bool = True,
        pre_process: bool = True,
        post_process: bool = True,
        **kwargs,
    ):
        super().__init__(
            config,
            spec,
            post_layer_norm=post_layer_norm,
            pre_process=pre_process,
            post_process=post_process,
            **kwargs,
        )
        self.setup_hyper_connections(self.final_layernorm)
