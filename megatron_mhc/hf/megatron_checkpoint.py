"""A checkpoint this project wrote, read for export: the run's arguments, the model config they
give, and the model's weights under Megatron's names with one entry per layer.

torch_dist checkpoints hold global tensors whatever TP/PP/EP layout saved them; they are read
in one process with `checkpoint_conversion.read_tensors`, and the decoder's weights, which
Megatron stacks over the layers (`decoder.layers.<name>` [num_layers, ...]), are unstacked into
`decoder.layers.<i>.<name>`. The torch format (one file per model-parallel rank) is read where
TP = 1, its per-stage layer numbers made global.
"""

import dataclasses
import re
from argparse import Namespace
from pathlib import Path

import torch
from megatron.core.dist_checkpointing import load_common_state_dict

from megatron_mhc.checkpoint_conversion import iteration_dirs, read_tensors, tensor_keys
from megatron_mhc.config import MHCTransformerConfig

_STACKED = "decoder.layers."
_TORCH_FILE = "model_optim_rng.pt"
_LOCAL_LAYER = re.compile(r"^(decoder|mtp)\.layers\.(\d+)\.(.*)$")


@dataclasses.dataclass
class MegatronCheckpoint:
    iteration_dir: Path
    iteration: int
    args: Namespace
    config: MHCTransformerConfig
    weights: dict
    """{Megatron name with the global layer index: tensor} of the model (no optimizer state,
    no `_extra_state`)."""


def _iteration_dir(checkpoint: Path, step: int | None) -> Path:
    """`checkpoint/iter_<step>`; without a step the one its tracker names, else the newest
    iteration, else `checkpoint` itself (one iteration directory)."""
    checkpoint = Path(checkpoint)
    tracker = checkpoint / "latest_checkpointed_iteration.txt"
    if step is None and tracker.is_file() and tracker.read_text().strip().isdigit():
        step = int(tracker.read_text().strip())
    if step is None:
        return ([checkpoint] + sorted(checkpoint.glob("iter_*")))[-1]
    chosen = checkpoint / f"iter_{step:07d}"
    if not chosen.is_dir():
        found = ", ".join(p.name for p in sorted(checkpoint.glob("iter_*"))) or "none"
        raise ValueError(f"--ckpt-step {step}: no {chosen.name} in {checkpoint} (found: {found})")
    return chosen


def _torch_dist_weights(iteration_dir: Path) -> dict:
    keys = [key for key in tensor_keys(iteration_dir) if not key.startswith("optimizer.")]
    weights = {}
    for key, value in read_tensors(iteration_dir, keys).items():
        name = key.removeprefix(_STACKED)
        if key.startswith(_STACKED) and not name.split(".", 1)[0].isdigit():
            for layer, tensor in enumerate(value):
                weights[f"{_STACKED}{layer}.{name}"] = tensor
        else:
            weights[key] = value
    return weights


def _torch_format_weights(iteration_dir: Path) -> dict:
    """The stage files of a TP = 1 torch-format iteration merged, with global layer numbers."""
    weights, offsets = {}, {"decoder": 0, "mtp": 0}
    for stage_file in sorted(iteration_dir.glob(f"mp_rank_00*/{_TORCH_FILE}")):
        state = torch.load(stage_file, map_location="cpu", weights_only=False)["model"]
        counts = {"decoder": set(), "mtp": set()}
        for key, value in state.items():
            if not torch.is_tensor(value) or key.endswith("_extra_state"):
                continue
            local = _LOCAL_LAYER.match(key)
            if local:
                stack, layer, name = local.groups()
                counts[stack].add(int(layer))
                key = f"{stack}.layers.{offsets[stack] + int(layer)}.{name}"
            weights[key] = value
        for stack, layers in counts.items():
            offsets[stack] += len(layers)
    return weights


def _refuse_torch_format_layout(iteration_dir: Path, args: Namespace) -> None:
    for flag in ("tensor_model_parallel_size", "expert_model_parallel_size"):
        if getattr(args, flag, 1) > 1:
            raise ValueError(
                f"{iteration_dir}: a torch-format checkpoint with --{flag.replace('_', '-')} "
                f"{getattr(args, flag)}; the exporter reads the torch format only where it is 1 "
                "(merging its per-rank QKV and SwiGLU shards is not supported): save with "
                "--ckpt-format torch_dist, which holds whole tensors for any layout"
            )


def read_checkpoint(checkpoint: Path, step: int | None = None) -> MegatronCheckpoint:
    """The checkpoint Megatron would load from `checkpoint` (or its iteration `step`)."""
    from megatron_mhc.training.gpt_step import mhc_config_from_args

    iteration_dir = _iteration_dir(checkpoint, step)
    if (iteration_dir / ".metadata").is_file():
        common = load_common_state_dict(str(iteration_dir))
        weights = _torch_dist_weights(iteration_dir)
    else:
        stage_files = sorted(iteration_dir.glob(f"mp_rank_*/{_TORCH_FILE}"))
        if not stage_files:
            iteration_dirs(checkpoint)  # raises: names what a torch_dist checkpoint holds
        common = torch.load(stage_files[0], map_location="cpu", weights_only=False)
        _refuse_torch_format_layout(iteration_dir, common["args"])
        weights = _torch_format_weights(iteration_dir)
    args = common["args"]
    config = mhc_config_from_args(args)
    return MegatronCheckpoint(iteration_dir, common["iteration"], args, config, weights)
