"""The Hugging Face model of an mHC GPT trained with megatron-mhc (`tools/export_hf.py`).

Plain PyTorch and transformers: a `PreTrainedModel` + `GenerationMixin` causal LM whose residual
is n streams [batch, seq, n, C]. The hyper-connection math is the project's reference ops
(`megatron_mhc/fusions/reference.py`), the one definition of it: the exporter writes a copy of
that file beside the weights as `mhc_reference.py` and points this file's import at it, so that
the exported directory loads where megatron_mhc is not installed.

Each sublayer computes what Megatron's local spec computes (pre-norm, attention with RoPE and
grouped KV heads, GELU or SwiGLU MLP, top-k MoE), with Megatron's weights split into the usual
Hugging Face projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
`down_proj`); docs/hugging_face.md has the name map.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from megatron_mhc.fusions.reference import (
    hc_mappings,
    hc_static_mappings,
    mhc_collapse,
    mhc_head,
    mhc_mappings,
    mhc_update,
)

from .attention_mhc import MHCAttention, MHCLatentAttention, MHCRotaryEmbedding
from .configuration_mhc import ATTENTION_KINDS, MHCConfig


def _norm(config: MHCConfig) -> nn.Module:
    if config.normalization == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class MHCMLP(nn.Module):
    """Megatron's MLP: fc1 (gate and up halves for SwiGLU), activation, fc2."""

    def __init__(self, config: MHCConfig, intermediate_size: int, bias: bool):
        super().__init__()
        hidden = config.hidden_size
        self.gated = config.hidden_act == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(hidden, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden, bias=bias)

    def forward(self, x):
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class MHCMoE(nn.Module):
    """Megatron's top-k softmax router (probabilities over the top-k logits, or top-k of the
    probabilities with `moe_router_pre_softmax`) and bias-free experts."""

    def __init__(self, config: MHCConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.pre_softmax = config.moe_router_pre_softmax
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MHCMLP(config, config.moe_intermediate_size, bias=False)
            for _ in range(config.num_experts)
        )

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.gate(tokens).float()
        if self.pre_softmax:
            weights, experts = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        else:
            top_logits, experts = logits.topk(self.top_k, dim=-1)
            weights = torch.softmax(top_logits, dim=-1)
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            rows, slot = torch.where(experts == index)
            if rows.numel():
                expert_out = expert(tokens[rows]) * weights[rows, slot, None].to(tokens.dtype)
                out.index_add_(0, rows, expert_out)
        return out.view_as(x)


class MHCHyperConnection(nn.Module):
    """The hyper-connection around one sublayer: fn, base, scale as in docs/math.md (fp32;
    `hc` has fn [2 + n, C], `hc_static` only base)."""

    def __init__(self, config: MHCConfig):
        super().__init__()
        n, hidden = config.hc_mult, config.hidden_size
        self.config = config
        num_maps = n * n + 2 * n
        self.base = nn.Parameter(torch.zeros(num_maps))
        if config.hc_type != "hc_static":
            shape = (num_maps, n * hidden) if config.hc_type == "mhc" else (2 + n, hidden)
            self.fn = nn.Parameter(torch.zeros(shape))
            self.scale = nn.Parameter(torch.zeros(3))

    def forward(self, streams: torch.Tensor, sublayer) -> torch.Tensor:
        """X' = H_post * F(H_pre X) + H_res X for streams [..., n, C]."""
        config = self.config
        if config.hc_type == "mhc":
            h_pre, h_post, comb = mhc_mappings(
                streams,
                self.fn,
                self.base,
                self.scale,
                config.hc_sinkhorn_iters,
                config.hc_eps,
                config.hc_norm_eps,
            )
        elif config.hc_type == "hc":
            h_pre, h_post, comb = hc_mappings(
                streams, self.fn, self.base, self.scale, config.hc_norm_eps
            )
        else:
            h_pre, h_post, comb = hc_static_mappings(streams, self.base)
        return mhc_update(streams, sublayer(mhc_collapse(streams, h_pre)), h_post, comb)


class MHCHyperHead(nn.Module):
    """The learned contract of the streams before the final norm (DeepSeek-V4's `hc_head`)."""

    def __init__(self, config: MHCConfig):
        super().__init__()
        n, hidden = config.hc_mult, config.hidden_size
        self.config = config
        self.hc_fn = nn.Parameter(torch.zeros(n, n * hidden))
        self.hc_base = nn.Parameter(torch.zeros(n))
        self.hc_scale = nn.Parameter(torch.zeros(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        config = self.config
        return mhc_head(
            streams, self.hc_fn, self.hc_base, self.hc_scale, config.hc_eps, config.hc_norm_eps
        )


def _residual(hyper_connection: MHCHyperConnection | None, streams, sublayer):
    """The sublayer's residual step: through its hyper-connection, or x + F(x) for n = 1."""
    if hyper_connection is None:
        return streams + sublayer(streams.squeeze(-2)).unsqueeze(-2)
    return hyper_connection(streams, sublayer)


class MHCDecoderLayer(nn.Module):
    """One layer: attention and/or an MLP or MoE, each behind its pre-norm and its
    hyper-connection (`attn_hc`, `ffn_hc`)."""

    def __init__(self, config: MHCConfig, layer_idx: int):
        super().__init__()
        sublayers = config.layer_sublayers[layer_idx]
        with_hc = config.hc_mult > 1
        self.self_attn = self.mlp = None
        attention = next((kind for kind in sublayers if kind in ATTENTION_KINDS), None)
        if attention:
            self.attention_kind = attention
            self.input_layernorm = _norm(config)
            cache_index = config.attention_layers.index(layer_idx)
            attention_class = MHCAttention if attention == "attention" else MHCLatentAttention
            self.self_attn = attention_class(config, cache_index)
            self.attn_hc = MHCHyperConnection(config) if with_hc else None
        if "mlp" in sublayers or "moe" in sublayers:
            self.post_attention_layernorm = _norm(config)
            if "moe" in sublayers:
                self.mlp = MHCMoE(config)
            else:
                self.mlp = MHCMLP(config, config.intermediate_size, config.linear_bias)
            self.ffn_hc = MHCHyperConnection(config) if with_hc else None

    def forward(self, streams, rope, mask, cache):
        if self.self_attn is not None:
            streams = _residual(
                self.attn_hc,
                streams,
                lambda x: self.self_attn(
                    self.input_layernorm(x), rope[self.attention_kind], mask, cache
                ),
            )
        if self.mlp is not None:
            streams = _residual(
                self.ffn_hc, streams, lambda x: self.mlp(self.post_attention_layernorm(x))
            )
        return streams


class MHCPreTrainedModel(PreTrainedModel):
    config_class = MHCConfig
    config: MHCConfig
    base_model_prefix = "model"
    _no_split_modules = ["MHCDecoderLayer"]
    # The HC parameters stay fp32 in any load dtype (docs/math.md): the strict list applies to
    # bf16 as well as fp16.
    _keep_in_fp32_modules_strict = ["attn_hc", "ffn_hc", "hc_head"]
    # Multi-token-prediction layers are exported for speculative decoding; forward does not use
    # them.
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)mtp\..*"]
    _supports_sdpa = False
    _supports_flash_attn = False

    def _init_weights(self, module):
        """A new model's initialisation (docs/math.md's default); `init` leaves loaded weights
        alone. The RoPE frequencies are a non-persistent buffer: computed here on loading."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MHCRotaryEmbedding):
            init.copy_(module.inv_freq, module.inverse_frequencies())
        elif isinstance(module, MHCHyperConnection):
            init.zeros_(module.base)
            if hasattr(module, "fn"):
                init.normal_(module.fn, mean=0.0, std=std)
                init.constant_(module.scale, 0.01)
        elif isinstance(module, MHCHyperHead):
            init.normal_(module.hc_fn, mean=0.0, std=std)
            init.zeros_(module.hc_base)
            init.constant_(module.hc_scale, 0.01)


def _causal_mask(attention_mask, batch: int, seq: int, past: int, device) -> torch.Tensor:
    """[b or 1, 1, seq, past + seq] booleans, True where a query may attend: earlier or same
    positions, and not padding (`attention_mask` [b, past + seq], 1 for tokens)."""
    query = torch.arange(past, past + seq, device=device)[:, None]
    key = torch.arange(past + seq, device=device)[None, :]
    mask = (key <= query)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, : past + seq].bool()
    return mask.expand(batch if attention_mask is not None else 1, 1, seq, past + seq)


class MHCModel(MHCPreTrainedModel):
    def __init__(self, config: MHCConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MHCDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        if config.hc_mult > 1 and config.hc_output_contract == "learned":
            self.hc_head = MHCHyperHead(config)
        self.norm = _norm(config)
        # RoPE of each attention kind: its heads' rotated channels.
        self.rotary_emb = MHCRotaryEmbedding(config.rotary_dim, config.rope_theta)
        self.mla_rotary_emb = MHCRotaryEmbedding(config.qk_rope_head_dim, config.rope_theta)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def contract(self, streams: torch.Tensor) -> torch.Tensor:
        """[..., n, C] -> [..., C]: the learned head, or the mean accumulated in fp32."""
        if hasattr(self, "hc_head"):
            return self.hc_head(streams)
        return streams.mean(dim=-2, dtype=torch.float32).to(streams.dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MHCModel: give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        batch, seq, hidden = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=inputs_embeds.device)[None]
        mask = _causal_mask(attention_mask, batch, seq, past, inputs_embeds.device)
        rope = {
            "attention": self.rotary_emb(position_ids, inputs_embeds.dtype),
            "mla": self.mla_rotary_emb(position_ids, inputs_embeds.dtype),
        }
        # Every stream starts as the embedding output.
        streams = inputs_embeds.unsqueeze(-2).expand(batch, seq, self.config.hc_mult, hidden)
        for layer in self.layers:
            streams = layer(streams, rope, mask, cache if use_cache else None)
        hidden_states = self.norm(self.contract(streams))
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache if use_cache else None
        )


class MHCForCausalLM(MHCPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MHCConfig):
        super().__init__(config)
        self.model = MHCModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [b, s, vocab]; with `labels`, the mean next-token cross entropy (labels are
        the inputs: they are shifted here, -100 is ignored)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)
