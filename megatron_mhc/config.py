"""MHCTransformerConfig: Megatron's TransformerConfig plus the mHC fields, validated on creation;
MHCMLATransformerConfig: the same fields on Megatron's MLATransformerConfig."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_mhc.fusions.backends import KERNEL_BACKENDS, KernelBackend

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


def _as_config_field(field: str, value) -> str:
    return f"MHCTransformerConfig.{field}={value!r}"


def mhc_active(values) -> bool:
    """True when `values` (an MHCTransformerConfig, or the parsed flags of pretrain_gpt_mhc.py,
    which carry the same names) describe a model with more than one residual stream."""
    return values.enable_mhc_connections and values.mhc_num_residual_streams > 1


def check_mhc_fields(values, name: Callable[[str, Any], str] = _as_config_field) -> None:
    """ValueError for the first mHC field of `values` outside what it allows.

    `values` is an MHCTransformerConfig (its `__post_init__` calls this) or the parsed flags of
    pretrain_gpt_mhc.py, whose destinations are the field names: the launch checks them before
    Megatron's own validation, with the same conditions. `name(field, value)` says how the
    error names the field (by default `MHCTransformerConfig.field=value`).
    """

    def check(ok: bool, field: str, allowed: str):
        if not ok:
            raise ValueError(f"{name(field, getattr(values, field))} is invalid: {allowed}")

    check(
        isinstance(values.enable_mhc_connections, bool),
        "enable_mhc_connections",
        "must be True or False",
    )
    check(
        _is_int(values.mhc_num_residual_streams) and values.mhc_num_residual_streams >= 1,
        "mhc_num_residual_streams",
        "must be an integer >= 1",
    )
    check(values.mhc_type in MHC_TYPES, "mhc_type", f"must be one of {MHC_TYPES}")
    check(
        _is_int(values.mhc_sinkhorn_iterations) and values.mhc_sinkhorn_iterations >= 1,
        "mhc_sinkhorn_iterations",
        "must be an integer >= 1",
    )
    check(
        _is_real(values.mhc_eps) and 0 <= values.mhc_eps < 1,
        "mhc_eps",
        "must be a finite number in [0, 1)",
    )
    check(
        _is_real(values.mhc_norm_eps) and values.mhc_norm_eps > 0,
        "mhc_norm_eps",
        "must be a finite number > 0",
    )
    check(
        _is_real(values.mhc_init_gating_factor) and values.mhc_init_gating_factor >= 0,
        "mhc_init_gating_factor",
        "must be a finite number >= 0",
    )
    check(values.mhc_init in MHC_INITS, "mhc_init", f"must be one of {MHC_INITS}")
    check(
        values.mhc_output_contract in MHC_OUTPUT_CONTRACTS,
        "mhc_output_contract",
        f"must be one of {MHC_OUTPUT_CONTRACTS}",
    )
    check(
        values.mhc_kernel_backend in KERNEL_BACKENDS,
        "mhc_kernel_backend",
        f"must be one of {KERNEL_BACKENDS}",
    )
    check(
        isinstance(values.mhc_mlp_high_priority_stream, bool),
        "mhc_mlp_high_priority_stream",
        "must be True or False",
    )
    check(
        values.mhc_recompute_layer_num in (None, "auto")
        or (_is_int(values.mhc_recompute_layer_num) and values.mhc_recompute_layer_num >= 1),
        "mhc_recompute_layer_num",
        "must be an integer >= 1, 'auto' or None",
    )
    check(
        values.mhc_init == "default" or values.mhc_type == "mhc",
        "mhc_init",
        f"'identity' is defined for mhc_type='mhc' only (got mhc_type={values.mhc_type!r})",
    )


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
        check_mhc_fields(self)
        self._check_mhc_with_megatron_features()

    @property
    def mhc_active(self) -> bool:
        """True when the model actually carries more than one residual stream."""
        return mhc_active(self)

    def _check_mhc_with_megatron_features(self):
        """The mHC settings against Megatron features that assume one residual stream: they need
        the whole config, so a launch checks them once Megatron has validated its flags."""

        def check(ok: bool, field: str, allowed: str):
            if not ok:
                raise ValueError(
                    f"{_as_config_field(field, getattr(self, field))} is invalid: {allowed}"
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
