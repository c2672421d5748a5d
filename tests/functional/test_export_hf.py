"""From a Megatron checkpoint to Hugging Face, end to end: tiny mHC models trained by
pretrain_gpt_mhc.py (TP=1 PP=2; TP=2 with SwiGLU, grouped KV heads, LayerNorm, the learned
contract, untied embeddings and an MTP layer; n = 1; a HybridModel with MLA, MoE and `hc`
hyper-connections), their HC parameters replaced by random non-identity ones, exported with
tools/export_hf.py and loaded with transformers: the logits equal those of Megatron's model
loaded from the same checkpoint, the HC parameters stay fp32 in bf16, generation with a KV cache
equals generation without, and the directory loads and generates where megatron_mhc cannot be
imported; the torch format exports as torch_dist does. tools/evaluate_hf.py on the exported
golden run (conftest.py) gives Megatron's validation loss."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_mhc.checkpoint_conversion import _convert_checkpoint, _IndexRewrite
from tests.dist_utils import initialize_model_parallel, run_distributed
from tests.functional.pretrain_runs import REPO, run_pretrain

# Tiny models, 2 training steps (the HC parameters are then made random: training this short
# leaves them near their initialisation, where a transposed or misordered mapping hides).
TINY = [
    *("--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4"),
    *("--seq-length", "32", "--max-position-embeddings", "64"),
    *("--micro-batch-size", "2", "--global-batch-size", "4"),
    *("--train-iters", "2", "--lr-warmup-iters", "1", "--save-interval", "2"),
]
LAYOUTS = {
    "gpt_tp1_pp2": ["--num-layers", "4"],
    "gpt_tp2": [
        *("--num-layers", "2", "--tensor-model-parallel-size", "2"),
        *("--pipeline-model-parallel-size", "1", "--swiglu", "--normalization", "LayerNorm"),
        *("--group-query-attention", "--num-query-groups", "2"),
        *("--mhc-output-contract", "learned", "--untie-embeddings-and-output-weights"),
        *("--mtp-num-layers", "1"),  # exported for speculative decoding, unused by forward
    ],
    # n = 1: Megatron's plain GPT, exported without HC modules.
    "gpt_n1": ["--num-layers", "2", "--mhc-num-residual-streams", "1"],
}
HYBRID_CONFIG = "configs/hybrid_tiny_mhc.yaml"
# Multi-latent attention (with its latent norms), MLP and MoE layers, `hc` hyper-connections.
HYBRID = [
    *("--hybrid-layer-pattern", "+-E|+-E", "--moe-ffn-hidden-size", "64", "--mhc-type", "hc"),
    *("--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16"),
    *("--qk-head-dim", "8", "--qk-pos-emb-head-dim", "4", "--v-head-dim", "6"),
    *("--rope-type", "rope", "--qk-layernorm"),
]
NAMES = [*LAYOUTS, "hybrid_mla_moe_hc"]
MHC_NAMES = [name for name in NAMES if name != "gpt_n1"]
PROMPT_LENGTH, NEW_TOKENS = 8, 32
VOCAB = 8192  # the tiny configs' (padded) vocabulary


class Export(NamedTuple):
    workdir: Path
    """The run's directory: its checkpoints in `checkpoints/`."""
    iteration_dir: Path
    """The trained checkpoint with random HC parameters."""
    directory: Path
    """Its Hugging Face export."""
    megatron_logits: torch.Tensor
    """Megatron's logits of TOKENS."""
    megatron_prompt_logits: torch.Tensor
    """Megatron's logits of PROMPT."""


def _tokens(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(7))


TOKENS, PROMPT = _tokens(2, 32), _tokens(1, PROMPT_LENGTH)


def _random_hc_parameters(tensors: dict) -> dict:
    """Random, non-identity HC parameters of each type's shapes (seeded by the name)."""
    randomized = {}
    for key, value in tensors.items():
        generator = torch.Generator().manual_seed(sum(map(ord, key)))
        noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
        if key.endswith("scale"):
            randomized[key] = 0.5 + noise.abs()
        elif key.endswith("fn"):
            randomized[key] = value + 0.2 * noise
        else:
            randomized[key] = value + 0.5 * noise
    return randomized


def _is_hc_parameter(key: str) -> bool:
    return "hyper_connection." in key or ".mhc_head." in key


def _trained_and_exported(tmp_path_factory, name: str, flags: list, config=None) -> Export:
    workdir = tmp_path_factory.mktemp(name)
    kwargs = {"config": config} if config else {}
    run_pretrain(workdir, *TINY, *flags, **kwargs)
    randomized = workdir / "randomized"
    rewrite = _IndexRewrite(lambda key: key, _random_hc_parameters, _is_hc_parameter)
    _convert_checkpoint(workdir / "checkpoints", randomized, rewrite)
    exported = workdir / "hf"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_hf.py"), str(randomized), str(exported)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    iteration_dir = randomized / "iter_0000002"
    (logits,) = run_distributed(_megatron_logits, 1, str(iteration_dir), [TOKENS, PROMPT])
    return Export(workdir, iteration_dir, exported, *logits)


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """name -> its Export: each layout trained, exported and run by Megatron once for the
    module."""
    done = {}

    def get(name: str) -> Export:
        if name not in done:
            if name == "hybrid_mla_moe_hc":
                flags, config = HYBRID, HYBRID_CONFIG
            else:
                flags, config = LAYOUTS[name], None
            done[name] = _trained_and_exported(tmp_path_factory, name, flags, config)
        return done[name]

    return get


def _megatron_logits(rank, world_size, iteration_dir: str, batches: list) -> list:
    """Logits [b, s, vocab] of each of `batches` by Megatron's model (the training entry
    point's model provider, one process) with the weights of `iteration_dir` loaded by
    Megatron's dist checkpointing."""
    from megatron.core import dist_checkpointing
    from megatron.training.global_vars import set_args

    from megatron_mhc.training.gpt_step import model_provider

    args = dist_checkpointing.load_common_state_dict(iteration_dir)["args"]
    for field in ("tensor", "pipeline", "expert"):
        setattr(args, f"{field}_model_parallel_size", 1)
    if args.hybrid_layer_pattern:
        args.hybrid_layer_pattern = args.hybrid_layer_pattern.replace("|", "")
    initialize_model_parallel()
    set_args(args)
    model = model_provider()
    loaded = dist_checkpointing.load(model.sharded_state_dict(), iteration_dir)
    model.load_state_dict(loaded, strict=False)
    model.eval()
    logits = []
    for tokens in batches:
        batch, seq = tokens.shape
        causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
        with torch.no_grad():
            logits.append(model(tokens, torch.arange(seq).expand(batch, seq), causal))
    return logits


def _load(directory: Path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, **kwargs
    ).eval()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert not actual.isnan().any()
    return ((actual.float() - expected.float()).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", NAMES)
def test_hf_logits_equal_megatrons(exported_run, name):
    run = exported_run(name)
    with torch.no_grad():
        logits = _load(run.directory)(TOKENS).logits
    assert _relative_error(logits, run.megatron_logits) <= 1e-5, name


@pytest.mark.parametrize("name", NAMES)
def test_config_and_weights_are_exported_as_documented(exported_run, name):
    exported = exported_run(name).directory
    config = json.loads((exported / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mhc.MHCForCausalLM"
    with safe_open(exported / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    if name == "gpt_n1":
        assert config["hc_mult"] == 1
        assert not [n for n in names if "_hc." in n or "hc_head" in n]
        return
    expected = {"model.layers.0.attn_hc.base", "model.layers.1.ffn_hc.base"}
    if name == "hybrid_mla_moe_hc":  # a hybrid layer holds one sublayer
        expected |= {
            "model.layers.0.self_attn.kv_a_layernorm.weight",
            "model.layers.2.mlp.gate.weight",
        }
    else:
        expected |= {"model.layers.0.ffn_hc.fn", "model.layers.1.attn_hc.scale"}
    assert expected <= names
    assert ("model.hc_head.hc_fn" in names) == (name == "gpt_tp2")
    assert ("lm_head.weight" in names) == (name == "gpt_tp2")  # untied there only
    mtp = {n for n in names if n.startswith("mtp.")}
    assert config["mtp_num_layers"] == (1 if name == "gpt_tp2" else 0)
    assert bool(mtp) == (name == "gpt_tp2")
    if mtp:  # under Megatron's names, the MTP layer's own hyper-connections included
        hc = "mtp.layers.0.transformer_layer.self_attention_hyper_connection.fn"
        assert {"mtp.layers.0.e_proj.weight", hc} <= mtp


@pytest.mark.parametrize("name", MHC_NAMES)
def test_bf16_load_keeps_hc_parameters_fp32(exported_run, name):
    model = _load(exported_run(name).directory, dtype=torch.bfloat16)
    hc = {n: p.dtype for n, p in model.named_parameters() if "_hc." in n or "hc_head." in n}
    assert hc and set(hc.values()) == {torch.float32}, hc
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


# The dense layouts: in the MoE model bf16 rounding moves some tokens to other experts (2 of 64
# at its first MoE layer, measured), which changes their logits by more than rounding.
@pytest.mark.parametrize("name", LAYOUTS)
def test_bf16_logits_stay_within_bf16_tolerance_of_fp32(exported_run, name):
    exported = exported_run(name).directory
    with torch.no_grad():
        low = _load(exported, dtype=torch.bfloat16)(TOKENS).logits
        full = _load(exported)(TOKENS).logits
    assert _relative_error(low, full) <= 1e-2, name


@pytest.mark.parametrize("name", NAMES)
def test_generate_with_cache_equals_without_and_starts_at_megatrons_argmax(exported_run, name):
    run = exported_run(name)
    model = _load(run.directory)
    settings = dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    cached = model.generate(PROMPT, use_cache=True, **settings)
    uncached = model.generate(PROMPT, use_cache=False, **settings)
    assert cached.sequences.shape == (1, PROMPT_LENGTH + NEW_TOKENS)
    assert torch.equal(cached.sequences, uncached.sequences), name
    # The logits of every step too, not only their argmax: the same function computed in another
    # order (one query against the cached keys instead of the whole causal square), so fp32
    # rounding apart; a wrong position, mask or cache slot changes them by O(1). Not in the
    # hybrid model, whose unconstrained `hc` streams grow to ~1e3 and whose MoE routing
    # amplifies rounding (6e-4 measured by the last step): there the tokens are the claim.
    if name in LAYOUTS:
        for with_cache, without in zip(cached.logits, uncached.logits, strict=True):
            assert _relative_error(with_cache, without) <= 1e-4, name
    assert cached.sequences[0, PROMPT_LENGTH] == run.megatron_prompt_logits[0, -1].argmax()


# Loads the exported directory and prints greedy tokens, with megatron_mhc unimportable.
_BLOCKED = """
import sys, json, torch
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "megatron_mhc" or name.startswith("megatron_mhc."):
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Blocker())
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
prompt = torch.tensor([json.loads(sys.argv[2])])
out = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
print(json.dumps(out[0].tolist()))
"""


def test_exported_directory_generates_without_megatron_mhc(exported_run, tmp_path):
    exported = exported_run("gpt_tp1_pp2").directory
    prompt = PROMPT[0].tolist()
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKED, str(exported), json.dumps(prompt)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = _load(exported).generate(
        torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected[0].tolist()


def test_evaluate_hf_on_the_golden_run_equals_megatrons_validation_loss(golden_run, tmp_path):
    workdir, log, _ = golden_run
    exported = tmp_path / "hf"
    for tool, *args in (
        ("export_hf.py", workdir / "checkpoints", exported),
        ("evaluate_hf.py", exported),
    ):
        result = subprocess.run(
            [sys.executable, str(REPO / "tools" / tool), *map(str, args)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    # The golden run evaluates 2 batches of 8 at iterations 25 and 50 (pretrain_runs.py).
    megatron = re.search(r"validation loss at iteration 50 \| lm loss value: ([^ |]+)", log)
    evaluated = re.search(
        r"validation samples 16\.\.31 \((\d+) tokens\) \| lm loss ([^ |]+)", result.stdout
    )
    assert evaluated, result.stdout
    assert int(evaluated.group(1)) == 16 * 128
    assert abs(float(evaluated.group(2)) - float(megatron.group(1))) <= 1e-4


def test_torch_format_exports_as_its_torch_dist_twin(exported_run, tmp_path):
    """The torch format (one file per pipeline stage, stage-local layer numbers) of the TP=1
    PP=2 checkpoint, written by Megatron's own conversion, exports the same model."""
    workdir = exported_run("gpt_tp1_pp2").workdir
    converted = workdir / "torch_format"
    flags = ["--ckpt-convert-format", "torch", "--ckpt-convert-save", str(converted)]
    run_pretrain(workdir, *TINY, *LAYOUTS["gpt_tp1_pp2"], *flags)
    exports = {}
    for name, checkpoint in (
        ("torch", converted / "torch"),
        ("torch_dist", workdir / "checkpoints"),
    ):
        exports[name] = tmp_path / name
        result = subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "export_hf.py"),
                str(checkpoint),
                str(exports[name]),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    stage_files = (converted / "torch" / "iter_0000002").iterdir()
    assert sorted(p.name for p in stage_files) == ["mp_rank_00_000", "mp_rank_00_001"]
    torch_format = load_file(exports["torch"] / "model.safetensors")
    torch_dist = load_file(exports["torch_dist"] / "model.safetensors")
    assert sorted(torch_format) == sorted(torch_dist)
    assert all(torch.equal(torch_format[key], torch_dist[key]) for key in torch_dist)
    config = json.loads((exports["torch"] / "config.json").read_text())
    assert config == json.loads((exports["torch_dist"] / "config.json").read_text())
