"""MHCTransformerConfig: Megatron's TransformerConfig plus the mHC fields, validated on creation;
MHCMLATransformerConfig: the same fields on Megatron's MLATransformerConfig."""

import math
from dataclasses import dataclass
from typing import Literal, get_args

from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_mhc.fusions import KERNEL_BACKENDS, KernelBackend

# The annotations of the fields below: their command-line flags take these as choices.
MHCType = Literal["mhc", "hc", "hc_static"]
MHCInit = Literal["default", "identity"]
MHCOutputContract = Literal["mean", "learned"]
MHC_TYPES = get_args(MHCType)
MHC_INITS = get_args(MHCInit)
MHC_OUTPUT_CONTRACTS = get_args(MHCOutputContract)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class MHCTransformerConfig(TransformerConfig):
    """TransformerConfig with manifold-constrained hyper-connections (docs/math.md).

    With `enable_mhc_connections` off or a single residual stream the model is exactly the
    plain Megatron model: no extra parameter, no extra op.
    """

    enable_mhc_connections: bool = False
    """Widen the residual stream into `mhc_num_residual_streams` streams mixed by HC modules."""

    mhc_num_residual_streams: int = 4
    """n, the number of parallel residual streams (1 = the plain residual)."""

    mhc_type: MHCType = "mhc"
    """`mhc` (Sinkhorn-projected mixing), `hc` (dynamic hyper-connections) or `hc_static`."""

    mhc_sinkhorn_iterations: int = 20
    """Sinkhorn-Knopp iterations projecting the mixing matrix onto the doubly stochastic ones."""

    mhc_eps: float = 1e-6
    """Added to H_pre and inside the Sinkhorn normalisations."""

    mhc_norm_eps: float = 1e-6
    """Epsilon of the RMS normalisation of the flattened streams inside the mappings."""

    mhc_init_gating_factor: float = 0.01
    """Initial value of the gating factors (scale) alpha_pre, alpha_post, alpha_res."""

    mhc_init: MHCInit = "default"
    """`default` (small random projection) or `identity` (function-preserving, for upcycling)."""

    mhc_output_contract: MHCOutputContract = "mean"
    """How the streams become one before the final norm: `mean` or `learned` (DeepSeek-V4 head)."""

    mhc_kernel_backend: KernelBackend = "auto"
    """Implementation of the mHC ops: `auto`, `torch` (reference), `triton` or `cutile`."""

    mhc_mlp_high_priority_stream: bool = False
    """Run the MLP's HC update (and its backward) on a high-priority CUDA stream, ordered by
    events (results unchanged), so that pipeline and expert-parallel communication kernels never
    delay it. Needs a CUDA device, or on CPU the CPU platform's stand-in streams."""

    mhc_recompute_layer_num: int | Literal["auto"] | None = None
    """L_r: free the n-stream states inside each block of L_r layers after forward and recompute
    them in backward; `auto` uses eq. 20 of the mHC paper per pipeline stage; None keeps them."""

    def __post_init__(self):
        super().__post_init__()
        self._validate_mhc()

    @property
    def mhc_active(self) -> bool:
        """True when the model actually carries more than one residual stream."""
        return self.enable_mhc_connections and self.mhc_num_residual_streams > 1

    def _validate_mhc(self):
        def check(ok: bool, field: str, allowed: str):
            if not ok:
                raise ValueError(
                    f"MHCTransformerConfig.{field}={getattr(self, field)!r} is invalid: {allowed}"
                )

        check(
            isinstance(self.enable_mhc_connections, bool),
            "enable_mhc_connections",
            "must be True or False",
        )
        check(
            _is_int(self.mhc_num_residual_streams) and self.mhc_num_residual_streams >= 1,
            "mhc_num_residual_streams",
            "must be an integer >= 1",
        )
        check(self.mhc_type in MHC_TYPES, "mhc_type", f"must be one of {MHC_TYPES}")
        check(
            _is_int(self.mhc_sinkhorn_iterations) and self.mhc_sinkhorn_iterations >= 1,
            "mhc_sinkhorn_iterations",
            "must be an integer >= 1",
        )
        check(
            _is_real(self.mhc_eps) and 0 <= self.mhc_eps < 1,
            "mhc_eps",
            "must be a finite number in [0, 1)",
        )
        check(
            _is_real(self.mhc_norm_eps) and self.mhc_norm_eps > 0,
            "mhc_norm_eps",
            "must be a finite number > 0",
        )
        check(
            _is_real(self.mhc_init_gating_factor) and self.mhc_init_gating_factor >= 0,
            "mhc_init_gating_factor",
            "must be a finite number >= 0",
        )
        check(self.mhc_init in MHC_INITS, "mhc_init", f"must be one of {MHC_INITS}")
        check(
            self.mhc_output_contract in MHC_OUTPUT_CONTRACTS,
            "mhc_output_contract",
            f"must be one of {MHC_OUTPUT_CONTRACTS}",
        )
        check(
            self.mhc_kernel_backend in KERNEL_BACKENDS,
            "mhc_kernel_backend",
            f"must be one of {KERNEL_BACKENDS}",
        )
        check(
            isinstance(self.mhc_mlp_high_priority_stream, bool),
            "mhc_mlp_high_priority_stream",
            "must be True or False",
        )
        check(
            self.mhc_recompute_layer_num in (None, "auto")
            or (_is_int(self.mhc_recompute_layer_num) and self.mhc_recompute_layer_num >= 1),
            "mhc_recompute_layer_num",
            "must be an integer >= 1, 'auto' or None",
        )
        check(
            self.mhc_init == "default" or self.mhc_type == "mhc",
            "mhc_init",
            f"'identity' is defined for mhc_type='mhc' only (got mhc_type={self.mhc_type!r})",
        )
        if not self.mhc_active:
            return

        # Megatron features whose code paths assume a [s, b, hidden_size] residual.
        def incompatible(ok: bool, field: str, why: str):
            check(
                ok,
                field,
                f"not supported with mHC (enable_mhc_connections and "
                f"mhc_num_residual_streams > 1): {why}",
            )

        incompatible(
            self.cuda_graph_impl == "none",
            "cuda_graph_impl",
            "must be 'none'; CUDA graphs capture [s, b, hidden_size] layer buffers",
        )
        incompatible(
            self.mtp_num_layers is None or self.pipeline_model_parallel_layout is None,
            "pipeline_model_parallel_layout",
            "must be None with mtp_num_layers: the MTP block reads the decoder's stream "
            "state at its final norm, so it sits on the last pipeline stage",
        )
        incompatible(
            self.mlp_chunks_for_training == 1,
            "mlp_chunks_for_training",
            "must be 1; the MLP's HC module needs the whole sequence at once",
        )
        incompatible(
            not self.inference_fuse_tp_communication,
            "inference_fuse_tp_communication",
            "must be False; the fused kernel adds a single-stream residual",
        )
        incompatible(
            self.transformer_impl != "inference_optimized",
            "transformer_impl",
            "must be 'local' or 'transformer_engine'",
        )
        incompatible(
            not self.cpu_offloading,
            "cpu_offloading",
            "must be False; activation offloading hooks expect one residual stream",
        )
        incompatible(
            not self.fine_grained_activation_offloading,
            "fine_grained_activation_offloading",
            "must be False; the offloaded norm inputs would be the collapsed streams",
        )
        incompatible(
            not self.fused_residual_rmsnorm,
            "fused_residual_rmsnorm",
            "must be False; the residual is the n-stream state, not the norm input",
        )
        incompatible(
            not self.apply_residual_connection_post_layernorm,
            "apply_residual_connection_post_layernorm",
            "must be False; the residual is the stream state, not a norm output",
        )
        incompatible(
            self.mhc_recompute_layer_num is None or self.recompute_granularity != "full",
            "mhc_recompute_layer_num",
            "recompute_granularity='full' already recomputes whole layers; use one or "
            "the other (selective recompute combines with it)",
        )


@dataclass
class MHCMLATransformerConfig(MLATransformerConfig, MHCTransformerConfig):
    """MLATransformerConfig (multi-latent attention) with the mHC fields of MHCTransformerConfig.

    MLATransformerConfig comes first so that its defaults of TransformerConfig's fields win
    (multi_latent_attention=True, RMSNorm, YaRN); its `__post_init__` reaches
    MHCTransformerConfig's through `super()`, so the mHC fields are validated there, once.
    """
