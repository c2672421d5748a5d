"""Export a megatron-mhc checkpoint as a Hugging Face model directory (`tools/export_hf.py`).

The directory holds `config.json` (an MHCConfig with `auto_map` to the model code and the
dtype), the weights as `model.safetensors` under Hugging Face names (docs/hugging_face.md), the
model code (`configuration_mhc.py`, `attention_mhc.py`, `modeling_mhc.py` and
`mhc_reference.py`, a copy of `megatron_mhc/fusions/reference.py`: a generated artifact, so that
the directory loads where megatron_mhc is not installed), the tokenizer that made the training
data, and the run's arguments for `tools/evaluate_hf.py` (`megatron_args.json`).

Everything is checked before anything is written: a setting or a weight the exporter does not
know is refused with one line naming it, and the weights must be exactly those the model
expects.
"""

import math
import re
import shutil
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_mhc.checkpoint_conversion import new_directory
from megatron_mhc.data.paths import default_tokenizer_dir
from megatron_mhc.fusions import reference
from megatron_mhc.hf import attention_mhc, configuration_mhc, modeling_mhc
from megatron_mhc.hf.configuration_mhc import MHCConfig
from megatron_mhc.hf.evaluate import RUN_ARGUMENTS, run_arguments_json
from megatron_mhc.hf.megatron_checkpoint import MegatronCheckpoint, read_checkpoint

# The hybrid layer symbols the model code computes (Megatron's HybridModel pattern).
_HYBRID_SUBLAYERS = {"*": ["attention"], "+": ["mla"], "-": ["mlp"], "E": ["moe"]}
_HYBRID_NAMES = {"D": "DeepSeek sparse attention", "M": "Mamba", "G": "GDN"}
# The import of the reference ops in modeling_mhc.py, and what it becomes beside the weights.
_REFERENCE_IMPORT = "from megatron_mhc.fusions.reference import ("
_EXPORTED_REFERENCE_IMPORT = "from .mhc_reference import ("
# Megatron settings the model code does not compute: (config field, value it must have).
_REFUSED_SETTINGS = (
    ("attention_output_gate", False),
    ("softmax_scale", None),
    ("layernorm_zero_centered_gamma", False),
    ("apply_residual_connection_post_layernorm", False),
    ("fp32_residual_connection", False),
    ("rotary_interleaved", False),
    ("mla_down_proj_fusion", False),
    ("moe_shared_expert_intermediate_size", None),
    ("moe_router_topk_scaling_factor", None),
    ("moe_router_enable_expert_bias", False),
    ("moe_router_num_groups", None),
)
_REFUSED_ARGS = (
    ("use_rope_scaling", False),
    ("rotary_seq_len_interpolation_factor", None),
    ("mrope_section", None),
)


def _refuse(what: str, allowed: str):
    raise ValueError(f"unsupported checkpoint: {what} (the exporter supports {allowed})")


def _layer_sublayers(checkpoint: MegatronCheckpoint) -> list:
    args, config = checkpoint.args, checkpoint.config
    pattern = getattr(args, "hybrid_layer_pattern", None)
    if pattern:
        decoder = pattern.split("/", 1)[0].replace("|", "")
        for symbol in decoder:
            if symbol not in _HYBRID_SUBLAYERS:
                kind = _HYBRID_NAMES.get(symbol, "unknown")
                _refuse(
                    f"layer {symbol!r} ({kind}) in --hybrid-layer-pattern {pattern!r}",
                    "'*' attention, '+' MLA, '-' MLP and 'E' MoE layers",
                )
        return [_HYBRID_SUBLAYERS[symbol] for symbol in decoder]
    if config.num_moe_experts and config.moe_layer_freq != 1:
        _refuse(f"moe_layer_freq = {config.moe_layer_freq!r}", "1: every GPT layer MoE")
    attention = "mla" if config.multi_latent_attention else "attention"
    ffn = "moe" if config.num_moe_experts else "mlp"
    return [[attention, ffn]] * config.num_layers


def _hidden_act(config) -> str:
    if config.gated_linear_unit and config.activation_func is F.silu:
        return "swiglu"
    if not config.gated_linear_unit and config.activation_func is F.gelu:
        return "gelu"
    name = getattr(config.activation_func, "__name__", config.activation_func)
    _refuse(f"activation {name} (gated: {config.gated_linear_unit})", "gelu and swiglu")


def _latent_attention_fields(args, config) -> dict:
    """MHCConfig's MLA fields; Megatron's RoPE of type `rope` only (not YaRN)."""
    if not config.multi_latent_attention:
        return {}
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_mscale,
    )

    if config.rope_type != "rope":
        _refuse(f"MLA with rope_type = {config.rope_type!r}", "MLA with rope_type = 'rope'")
    if args.rotary_percent != 1.0:
        _refuse(f"MLA with --rotary-percent {args.rotary_percent}", "MLA with --rotary-percent 1")
    # MLASelfAttention's softmax scale: YaRN's mscale enters it whatever the RoPE type.
    mscale = _yarn_get_mscale(config.rotary_scaling_factor, config.mscale_all_dim)
    head_dim = config.qk_head_dim + config.qk_pos_emb_head_dim
    return dict(
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_head_dim,
        qk_rope_head_dim=config.qk_pos_emb_head_dim,
        v_head_dim=config.v_head_dim,
        mla_latent_norms=config.qk_layernorm,
        mla_softmax_scale=mscale * mscale / math.sqrt(head_dim),
    )


def hf_config(checkpoint: MegatronCheckpoint) -> MHCConfig:
    """The MHCConfig of the model `checkpoint` holds; refuses what the model code lacks."""
    args, config = checkpoint.args, checkpoint.config
    for field, allowed in _REFUSED_SETTINGS:
        if getattr(config, field, allowed) != allowed:
            _refuse(f"{field} = {getattr(config, field)!r}", f"{field} = {allowed}")
    for field, allowed in _REFUSED_ARGS:
        if getattr(args, field, allowed) != allowed:
            flag = f"--{field.replace('_', '-')}"
            _refuse(f"{flag} {getattr(args, field)!r}", f"{flag} {allowed}")
    if args.position_embedding_type != "rope":
        _refuse(f"--position-embedding-type {args.position_embedding_type}", "rope")
    if config.num_moe_experts and config.moe_router_score_function != "softmax":
        _refuse(f"moe_router_score_function = {config.moe_router_score_function!r}", "softmax")
    if config.qk_layernorm and not config.multi_latent_attention:
        _refuse("qk_layernorm = True", "qk_layernorm = False, or MLA's latent norms")
    dtype = "bfloat16" if config.bf16 else "float16" if config.fp16 else "float32"
    return MHCConfig(
        vocab_size=args.padded_vocab_size,
        hidden_size=config.hidden_size,
        layer_sublayers=_layer_sublayers(checkpoint),
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        intermediate_size=config.ffn_hidden_size,
        hidden_act=_hidden_act(config),
        attention_bias=config.add_bias_linear or config.add_qkv_bias,
        linear_bias=config.add_bias_linear,
        normalization=config.normalization.lower(),
        norm_eps=config.layernorm_epsilon,
        rope_theta=float(args.rotary_base),
        rotary_dim=int(config.kv_channels * args.rotary_percent),
        max_position_embeddings=args.max_position_embeddings,
        num_experts=config.num_moe_experts or 0,
        num_experts_per_tok=config.moe_router_topk,
        moe_intermediate_size=config.moe_ffn_hidden_size,
        moe_router_pre_softmax=config.moe_router_pre_softmax,
        **_latent_attention_fields(args, config),
        hc_type=config.mhc_type,
        hc_mult=config.mhc_num_residual_streams if config.mhc_active else 1,
        hc_sinkhorn_iters=config.mhc_sinkhorn_iterations,
        hc_eps=config.mhc_eps,
        hc_norm_eps=config.mhc_norm_eps,
        hc_output_contract=config.mhc_output_contract,
        mtp_num_layers=config.mtp_num_layers or 0,
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        dtype=dtype,
        architectures=["MHCForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_mhc.MHCConfig",
            "AutoModelForCausalLM": "modeling_mhc.MHCForCausalLM",
        },
    )


def _qkv(config: MHCConfig, prefix: str, kind: str, tensor: torch.Tensor) -> dict:
    """Megatron's fused QKV rows, grouped per KV head as [q (heads/groups) | k | v], split."""
    groups, per_group = config.num_key_value_heads, config.num_attention_heads
    per_group //= groups
    grouped = tensor.view(groups, (per_group + 2) * config.head_dim, *tensor.shape[1:])
    q, k, v = grouped.split([per_group * config.head_dim, config.head_dim, config.head_dim], 1)
    return {
        f"{prefix}self_attn.{name}_proj.{kind}": part.reshape(-1, *tensor.shape[1:]).clone()
        for name, part in (("q", q), ("k", k), ("v", v))
    }


def _fc1(config: MHCConfig, prefix: str, kind: str, tensor: torch.Tensor) -> dict:
    if config.hidden_act == "swiglu":
        gate, up = tensor.chunk(2, dim=0)
        return {f"{prefix}gate_proj.{kind}": gate.clone(), f"{prefix}up_proj.{kind}": up.clone()}
    return {f"{prefix}up_proj.{kind}": tensor}


def _renamed(name: str) -> Callable:
    return lambda config, prefix, found, tensor: {f"{prefix}{name}.{found['kind']}": tensor}


def _expert(name: str) -> str:
    return rf"mlp\.experts\.local_experts\.(?P<expert>\d+)\.{name}\.(?P<kind>weight)"


def _stacked_experts(name: str) -> str:
    return rf"mlp\.experts\.experts\.{name}\.(?P<kind>weight)"


def _expert_fc1(config: MHCConfig, prefix: str, expert, kind: str, tensor) -> dict:
    return _fc1(config, f"{prefix}mlp.experts.{expert}.", kind, tensor)


def _expert_fc2(config: MHCConfig, prefix: str, expert, kind: str, tensor) -> dict:
    return {f"{prefix}mlp.experts.{expert}.down_proj.{kind}": tensor}


def _per_expert(rule: Callable) -> Callable:
    """A rule for torch_dist's experts, stacked [num_experts, ...] (the torch format keeps
    `local_experts.<e>`)."""

    def split(config, prefix, found, tensor):
        weights = {}
        for expert, part in enumerate(tensor):
            weights.update(rule(config, prefix, expert, found["kind"], part))
        return weights

    return split


# Names within a decoder layer: Megatron's (torch_dist uses Transformer Engine's fused-norm
# names, the torch format the local spec's) -> the Hugging Face model's, by regex on the rest;
# each rule gives (config, "model.layers.<i>.", the match, the tensor) -> {name: tensor}.
_KIND = r"(?P<kind>weight|bias)"
_LAYER_RULES = (
    (
        rf"(self_attention\.linear_qkv\.layer_norm_|input_layernorm\.){_KIND}",
        _renamed("input_layernorm"),
    ),
    (
        rf"self_attention\.linear_qkv\.{_KIND}",
        lambda config, prefix, found, t: _qkv(config, prefix, found["kind"], t),
    ),
    (rf"self_attention\.linear_proj\.{_KIND}", _renamed("self_attn.o_proj")),
    (r"self_attention\.linear_q_proj\.(?P<kind>weight)", _renamed("self_attn.q_proj")),
    (r"self_attention\.linear_q_down_proj\.(?P<kind>weight)", _renamed("self_attn.q_a_proj")),
    (r"self_attention\.linear_q_up_proj\.(?P<kind>weight)", _renamed("self_attn.q_b_proj")),
    (
        r"self_attention\.(linear_q_up_proj\.layer_norm_|q_layernorm\.)(?P<kind>weight)",
        _renamed("self_attn.q_a_layernorm"),
    ),
    (
        r"self_attention\.linear_kv_down_proj\.(?P<kind>weight)",
        _renamed("self_attn.kv_a_proj_with_mqa"),
    ),
    (r"self_attention\.linear_kv_up_proj\.(?P<kind>weight)", _renamed("self_attn.kv_b_proj")),
    (
        r"self_attention\.(linear_kv_up_proj\.layer_norm_|kv_layernorm\.)(?P<kind>weight)",
        _renamed("self_attn.kv_a_layernorm"),
    ),
    (r"self_attention_hyper_connection\.(?P<kind>fn|base|scale)", _renamed("attn_hc")),
    (
        rf"(mlp\.linear_fc1\.layer_norm_|pre_mlp_layernorm\.){_KIND}",
        _renamed("post_attention_layernorm"),
    ),
    (
        rf"mlp\.linear_fc1\.{_KIND}",
        lambda config, prefix, found, t: _fc1(config, f"{prefix}mlp.", found["kind"], t),
    ),
    (rf"mlp\.linear_fc2\.{_KIND}", _renamed("mlp.down_proj")),
    (r"mlp\.router\.(?P<kind>weight)", _renamed("mlp.gate")),
    (
        _expert("linear_fc1"),
        lambda config, prefix, found, t: _expert_fc1(
            config, prefix, found["expert"], found["kind"], t
        ),
    ),
    (
        _expert("linear_fc2"),
        lambda config, prefix, found, t: _expert_fc2(
            config, prefix, found["expert"], found["kind"], t
        ),
    ),
    (_stacked_experts("linear_fc1"), _per_expert(_expert_fc1)),
    (_stacked_experts("linear_fc2"), _per_expert(_expert_fc2)),
    (r"mlp_hyper_connection\.(?P<kind>fn|base|scale)", _renamed("ffn_hc")),
)
_TOP_LEVEL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
    "decoder.final_norm.weight": "model.norm.weight",  # HybridModel's name
    "decoder.final_norm.bias": "model.norm.bias",
    "decoder.mhc_head.fn": "model.hc_head.hc_fn",
    "decoder.mhc_head.base": "model.hc_head.hc_base",
    "decoder.mhc_head.scale": "model.hc_head.hc_scale",
}
_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _layer_weights(config: MHCConfig, layer: str, name: str, tensor: torch.Tensor) -> dict:
    for pattern, rule in _LAYER_RULES:
        found = re.fullmatch(pattern, name)
        if found:
            return rule(config, f"model.layers.{layer}.", found, tensor)
    raise ValueError(
        f"unsupported checkpoint: decoder.layers.{layer}.{name} (a weight the exporter does "
        "not know)"
    )


def hf_weights(config: MHCConfig, megatron_weights: dict) -> dict:
    """{Hugging Face name: tensor} of Megatron's weights; refuses a name it does not know."""
    weights = {}
    for key, tensor in megatron_weights.items():
        layer = _DECODER_LAYER.match(key)
        if layer:
            weights.update(_layer_weights(config, *layer.groups(), tensor))
        elif key == "output_layer.weight" and config.tie_word_embeddings:
            continue  # the last pipeline stage's copy of the tied embedding (torch format)
        elif key in _TOP_LEVEL:
            weights[_TOP_LEVEL[key]] = tensor
        elif key.startswith("mtp."):
            weights[key] = tensor  # kept for speculative decoding, Megatron's names
        else:
            raise ValueError(f"unsupported checkpoint: {key} (a weight the exporter does not know)")
    return {name: tensor.contiguous() for name, tensor in weights.items()}


def _check_weights(config: MHCConfig, weights: dict) -> None:
    """The weights are exactly the model's (names and shapes), MTP layers aside."""
    with torch.device("meta"):
        expected = modeling_mhc.MHCForCausalLM(config).state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    given = {name: w for name, w in weights.items() if not name.startswith("mtp.")}
    missing = sorted(set(expected) - set(given))
    if missing:
        raise ValueError(
            f"unsupported checkpoint: it lacks {missing[0]} ({len(missing)} "
            "weights of the model are missing)"
        )
    for name, tensor in given.items():
        if name not in expected or expected[name].shape != tensor.shape:
            shape = tuple(expected[name].shape) if name in expected else "no such weight"
            raise ValueError(
                f"unsupported checkpoint: {name} {tuple(tensor.shape)} does not "
                f"fit the model ({shape})"
            )


def _tokenizer_dir(checkpoint: MegatronCheckpoint, tokenizer: Path | None) -> Path:
    """The tokenizer that made the training data: `tokenizer`, the run's --tokenizer-model, or
    the shipped one for the embedded corpus."""
    args = checkpoint.args
    if tokenizer is not None:
        return Path(tokenizer)
    if args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer_model:
        return Path(args.tokenizer_model)
    if getattr(args, "default_corpus", False):
        return default_tokenizer_dir()
    raise ValueError(
        f"unknown tokenizer: the run used --tokenizer-type {args.tokenizer_type} on "
        f"{args.data_path}; give the tokenizer that made this data with --tokenizer DIR"
    )


def _write_code(directory: Path) -> None:
    for module in (configuration_mhc, attention_mhc, modeling_mhc):
        shutil.copyfile(module.__file__, directory / Path(module.__file__).name)
    modeling = (directory / "modeling_mhc.py").read_text()
    if _REFERENCE_IMPORT not in modeling:
        raise RuntimeError(f"modeling_mhc.py no longer imports the ops as {_REFERENCE_IMPORT!r}")
    modeling = modeling.replace(_REFERENCE_IMPORT, _EXPORTED_REFERENCE_IMPORT)
    (directory / "modeling_mhc.py").write_text(modeling)
    (directory / "mhc_reference.py").write_text(
        "# Generated by tools/export_hf.py: a copy of megatron_mhc/fusions/reference.py, the one\n"
        "# definition of the HC math. Edit the original, not this copy.\n"
        + Path(reference.__file__).read_text()
    )


def export(
    checkpoint: Path,
    out_dir: Path,
    step: int | None = None,
    tokenizer: Path | None = None,
) -> Path:
    """Write the Hugging Face model directory `out_dir` (new) of `checkpoint`; returns it."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    megatron = read_checkpoint(checkpoint, step)
    config = hf_config(megatron)
    weights = hf_weights(config, megatron.weights)
    _check_weights(config, weights)
    tokenizer = AutoTokenizer.from_pretrained(str(_tokenizer_dir(megatron, tokenizer)))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    with new_directory(Path(out_dir)) as scratch:
        config.save_pretrained(scratch)
        save_file(weights, scratch / "model.safetensors", metadata={"format": "pt"})
        _write_code(scratch)
        tokenizer.save_pretrained(scratch)
        # For tools/evaluate_hf.py: the run's data settings and the checkpoint's iteration.
        run_arguments = Namespace(**{**vars(megatron.args), "iteration": megatron.iteration})
        (scratch / RUN_ARGUMENTS).write_text(run_arguments_json(run_arguments))
    return Path(out_dir)
