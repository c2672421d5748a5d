"""The Hugging Face config of an mHC GPT exported from Megatron (`tools/export_hf.py`).

Plain transformers, no import of megatron_mhc: the exporter copies this file beside the weights,
where `config.json`'s `auto_map` finds it.
"""

from transformers import PreTrainedConfig

ATTENTION_KINDS = ("attention", "mla")
SUBLAYER_KINDS = (*ATTENTION_KINDS, "mlp", "moe")
HC_TYPES = ("mhc", "hc", "hc_static")
OUTPUT_CONTRACTS = ("mean", "learned")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("gelu", "swiglu")


class MHCConfig(PreTrainedConfig):
    """A decoder-only transformer on n residual streams, as megatron-mhc trains it.

    `layer_sublayers[i]` lists the residual sublayers of layer i in order: a GPT layer is
    ["attention", "mlp"] ("mla" for multi-latent attention, "moe" for MoE), a HybridModel layer
    holds one. Each sublayer has its own pre-norm and its own hyper-connection (`attn_hc` around
    attention, `ffn_hc` around the MLP or MoE, DeepSeek-V4's names). The HC fields are
    docs/math.md's, with megatron-mhc's config names in parentheses: `hc_type` (mhc_type),
    `hc_mult` (mhc_num_residual_streams), `hc_sinkhorn_iters`, `hc_eps`, `hc_norm_eps`,
    `hc_output_contract`. The MLA fields are DeepSeek-V3's (`q_lora_rank`, `kv_lora_rank`,
    `qk_nope_head_dim` = Megatron's qk_head_dim, `qk_rope_head_dim` = qk_pos_emb_head_dim,
    `v_head_dim`), with `mla_latent_norms` (Megatron's qk_layernorm) and `mla_softmax_scale`.
    """

    model_type = "megatron_mhc"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 8192
    hidden_size: int = 128
    layer_sublayers: list | None = None
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 512
    hidden_act: str = "gelu"
    attention_bias: bool = True
    linear_bias: bool = True
    normalization: str = "rmsnorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_dim: int | None = None
    max_position_embeddings: int = 4096
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_latent_norms: bool = False
    mla_softmax_scale: float | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    moe_router_pre_softmax: bool = False
    hc_type: str = "mhc"
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    hc_norm_eps: float = 1e-6
    hc_output_contract: str = "mean"
    mtp_num_layers: int = 0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.layer_sublayers is None:
            self.layer_sublayers = [["attention", "mlp"]] * 2
        self.num_hidden_layers = len(self.layer_sublayers)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.mla_softmax_scale is None:
            self.mla_softmax_scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        for name, value, allowed in (
            ("hc_type", self.hc_type, HC_TYPES),
            ("hc_output_contract", self.hc_output_contract, OUTPUT_CONTRACTS),
            ("normalization", self.normalization, NORMS),
            ("hidden_act", self.hidden_act, ACTIVATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"MHCConfig.{name} = {value!r}: allowed {', '.join(allowed)}")
        for index, sublayers in enumerate(self.layer_sublayers):
            unknown = [kind for kind in sublayers if kind not in SUBLAYER_KINDS]
            if unknown or not sublayers:
                raise ValueError(
                    f"MHCConfig.layer_sublayers[{index}] = {sublayers!r}: each layer holds "
                    f"one or more of {', '.join(SUBLAYER_KINDS)}"
                )
        if self.hc_mult < 1:
            raise ValueError(f"MHCConfig.hc_mult = {self.hc_mult}: at least 1 stream")

    @property
    def attention_layers(self) -> list:
        """The indices of the layers that hold attention: a layer's KV-cache slot is its
        position in this list."""
        return [
            i
            for i, sublayers in enumerate(self.layer_sublayers)
            if any(kind in ATTENTION_KINDS for kind in sublayers)
        ]
