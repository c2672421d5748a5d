"""Step 1 of the dry run: the flags validated exactly as a launch on N GPUs validates them.

`parse_and_check_arguments` (Megatron's parsing and validation plus megatron-mhc's checks) runs
with the environment a launcher gives rank 0 of N (WORLD_SIZE, RANK, LOCAL_RANK) and with what
Megatron asks of the machine answered as a Hopper GPU machine with Transformer Engine answers it
(`_as_on_gpu_machine`). Only the data files are not looked at (`check_data=False`; a tokenizer
whose files are absent gives an assumed vocabulary). Also: the fewest GPUs a layout allows, and
the packages the real launch needs.
"""

import contextlib
import importlib.util
import io
import math
import os
import sys
from collections.abc import Iterator

from packaging.version import Version

from megatron_mhc.megatron_patches import MegatronPatch, check_patches

# The GPU the flags are validated for: the Hopper machines of docs/slurm.md.
ASSUMED_COMPUTE_CAPABILITY = (9, 0)
# The Transformer Engine release the GPU machines are assumed to have (its version checks in
# Megatron's validation pass for it).
ASSUMED_TE_VERSION = "2.14.0"
# Vocabulary when the tokenizer's files are not here (the placeholder paths of the paper-size
# configs): DeepSeek-V3's, the tokenizer of the mHC paper's MoE models.
ASSUMED_VOCAB_SIZE = 129280


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


@contextlib.contextmanager
def _launch_environment(argv: list[str], world_size: int) -> Iterator[None]:
    """sys.argv and the variables a launcher sets for rank 0 of `world_size` (Megatron reads
    both while parsing)."""
    env = dict(
        WORLD_SIZE=str(world_size),
        RANK="0",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE=str(min(world_size, 8)),  # nodes of 8 GPUs, as in docs/slurm.md
    )
    saved_env = {key: os.environ.get(key) for key in env}
    saved_argv = sys.argv
    os.environ.update(env)
    sys.argv = ["pretrain_gpt_mhc.py", *argv]
    try:
        yield
    finally:
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _transformer_engine_rope(*_args, **_kwargs):
    raise RuntimeError("Transformer Engine's fused RoPE stands in for validation only")


# What Megatron's validation asks of the machine, answered as a Hopper GPU machine answers it
# while the dry run parses: the device capability (grouped GEMM) and the architecture (TP/CP > 1).
# Listed in docs/megatron_patches.md.
GPU_ANSWERS = (
    (
        MegatronPatch(
            "dry run: GPU capability", "torch.cuda", "get_device_capability", ("device",)
        ),
        lambda device=None: ASSUMED_COMPUTE_CAPABILITY,
    ),
    (
        MegatronPatch(
            "dry run: GPU architecture",
            "megatron.training.arguments",
            "get_device_arch_version",
            (),
        ),
        lambda: ASSUMED_COMPUTE_CAPABILITY[0],
    ),
)
# The same for Transformer Engine when it is not installed here: its version (Megatron's version
# checks) and its fused RoPE (TransformerConfig refuses apply_rope_fusion without it).
TRANSFORMER_ENGINE_ANSWERS = (
    (
        MegatronPatch("dry run: Transformer Engine version", "megatron.core.utils", "_te_version"),
        Version(ASSUMED_TE_VERSION),
    ),
    (
        MegatronPatch(
            "dry run: Transformer Engine's fused RoPE",
            "megatron.core.models.common.embeddings.rope_utils",
            "fused_apply_rotary_pos_emb",
        ),
        _transformer_engine_rope,
    ),
)


@contextlib.contextmanager
def _as_on_gpu_machine(notes: list[str]) -> Iterator[None]:
    """GPU_ANSWERS, and TRANSFORMER_ENGINE_ANSWERS unless Transformer Engine is installed, in
    place inside the block (all checked before any is made)."""
    answers = GPU_ANSWERS
    transformer_engine = "the installed Transformer Engine"
    if not _installed("transformer_engine"):
        answers += TRANSFORMER_ENGINE_ANSWERS
        transformer_engine = f"Transformer Engine {ASSUMED_TE_VERSION}"
    check_patches(patch for patch, _ in answers)
    with contextlib.ExitStack() as stack:
        for patch, answer in answers:
            stack.enter_context(patch.replaced(answer))
        notes.append(
            f"validated as on a GPU machine with compute capability "
            f"{'.'.join(map(str, ASSUMED_COMPUTE_CAPABILITY))} and {transformer_engine}"
        )
        yield


def _padded_vocabulary(args, notes: list[str]) -> None:
    """args.padded_vocab_size as the launch's tokenizer gives it; when the tokenizer's files are
    not on this machine, --vocab-size (or ASSUMED_VOCAB_SIZE) padded as Megatron pads it."""
    from megatron.core.tokenizers.utils.build_tokenizer import (
        build_tokenizer,
        vocab_size_with_padding,
    )

    try:
        build_tokenizer(args)
    except (OSError, ValueError, ImportError) as err:
        vocab = args.vocab_size or ASSUMED_VOCAB_SIZE
        args.padded_vocab_size = vocab_size_with_padding(vocab, args, logging_enabled=False)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        source = "--vocab-size" if args.vocab_size else "assumed; give --vocab-size"
        notes.append(f"tokenizer not loaded here ({reason[:100]}); vocabulary {vocab} ({source})")


def smallest_world_size(args) -> int:
    """The fewest GPUs the layout allows: a multiple of TP x CP x PP (the dense grid) and of
    ETP x EP x PP (the expert grid)."""
    pp = args.pipeline_model_parallel_size
    dense = args.tensor_model_parallel_size * args.context_parallel_size * pp
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    expert = etp * args.expert_model_parallel_size * pp
    return math.lcm(dense, expert)


def _parse_unvalidated(argv: list[str]):
    from megatron.training.arguments import parse_args

    from megatron_mhc.training.arguments import add_mhc_arguments

    with _launch_environment(argv, world_size=1), contextlib.redirect_stdout(io.StringIO()):
        return parse_args(add_mhc_arguments)


def _without_world_size(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--world-size":
            skip = True
        elif not arg.startswith("--world-size="):
            out.append(arg)
    return out


def validate_as_on_gpus(argv: list[str], world_size: int | None, notes: list[str]):
    """(args, config) of `argv` (pretrain_gpt_mhc.py's flags, `--dry-run` and `--world-size`
    among them or not) as a launch on `world_size` GPUs (default: the smallest the layout
    allows) parses and checks them, with the padded vocabulary; what it assumed is added to
    `notes`. Raises what the launch's checks raise (ValueError, ConfigError, Megatron's
    AssertionError) when the launch would not start."""
    from megatron_mhc.training.launch_checks import parse_and_check_arguments

    argv = [a for a in argv if a != "--dry-run"]
    argv = _without_world_size(argv)
    if world_size is None:
        world_size = smallest_world_size(_parse_unvalidated(argv))
    with _launch_environment(argv, world_size), _as_on_gpu_machine(notes):
        args, config = parse_and_check_arguments(
            check_data=False, set_globals=False, this_machine=False
        )
    _padded_vocabulary(args, notes)
    return args, config


def required_extras(args, config) -> list[tuple[str, str, bool]]:
    """(package, why, installed here) for what the real launch imports beyond the base install."""

    needs = []
    te_reasons = [
        reason
        for reason, on in (
            (
                "--transformer-impl transformer_engine",
                args.transformer_impl == "transformer_engine",
            ),
            ("fused RoPE (--no-rope-fusion turns it off)", config.apply_rope_fusion),
            ("fp8", bool(args.fp8)),
        )
        if on
    ]
    if te_reasons:
        needs.append(
            ("transformer-engine", ", ".join(te_reasons), _installed("transformer_engine"))
        )
    if args.transformer_impl == "local" and (
        args.gradient_accumulation_fusion or not args.no_persist_layer_norm
    ):
        needs.append(
            (
                "apex",
                "gradient-accumulation fusion / persistent layer norm with the local spec",
                _installed("apex"),
            )
        )
    if config.mhc_active and args.mhc_kernel_backend in ("auto", "triton"):
        needs.append(("triton", f"mHC kernels ({args.mhc_kernel_backend})", _installed("triton")))
    if config.mhc_active and args.mhc_kernel_backend == "cutile":
        needs.append(("cuda-tile", "mHC kernels (cutile)", _installed("cuda.tile")))
    pattern = args.hybrid_layer_pattern or ""
    if "M" in pattern:
        needs.append(("mamba-ssm", "Mamba layers (M)", _installed("mamba_ssm")))
    if "G" in pattern:
        needs.append(("flash-linear-attention", "GDN layers (G)", _installed("fla")))
    return needs
