"""Megatron's HybridStack with its final norm taken from the spec, and its mHC form."""

from dataclasses import dataclass

from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_mhc.transformer.hyper_connection_stack import HyperConnectionStack


@dataclass
class HybridStackWithNormSubmodules(HybridStackSubmodules):
    """HybridStackSubmodules plus the stack's final norm (Megatron builds a TENorm there)."""

    final_norm: ModuleSpec | type = IdentityOp


class SpecNormHybridStack(HybridStack):
    """Megatron's HybridStack whose final norm is built from `submodules.final_norm`.

    HybridStack.__init__ constructs `final_norm` as a Transformer Engine `TENorm` whatever the
    spec; it is asked to build none, and the spec's norm is built under the same name and
    condition (last stage, `post_layer_norm`), so the forward and the state dict are Megatron's.
    """

    def __init__(
        self,
        config,
        submodules: HybridStackWithNormSubmodules,
        *args,
        post_layer_norm: bool = True,
        **kwargs,
    ):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and self.post_layer_norm:
            self.final_norm = build_module(
                submodules.final_norm,
                config=self.config,
                hidden_size=self.config.hidden_size,
                eps=self.config.layernorm_epsilon,
            )


class HyperConnectionHybridStack(HyperConnectionStack, SpecNormHybridStack):
    """A HybridStack whose layers carry the n-stream residual [s, b, n*C].

    Expands the embedding output on the first pipeline stage, contracts the streams before
    `final_norm` (a forward pre-hook) and plans the recompute blocks of its stage, as every
    HyperConnectionStack does. L_r counts hybrid layers: one layer is one residual sublayer
    (attention, MLP or MoE), so `auto` is eq. 20 with L = the number of this stage's hybrid
    layers.
    """

    def __init__(self, config, submodules: HybridStackWithNormSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.setup_hyper_connections(getattr(self, "final_norm", None))
