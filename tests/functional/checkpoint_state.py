"""What a checkpoint of pretrain_gpt_mhc.py holds, read back from disk for the resume tests.

`training_state(iteration_dir)` is every value of one iteration directory that training reads
when it resumes, flattened to {path: value}: model weights, the optimizer's fp32 main weights,
Adam's moments and step, the learning-rate schedule and the RNG state; torch_dist (the index and
its data files) or torch (every `mp_rank_*/*.pt`). The run's arguments (paths, flags) are left
out. `differences(a, b)` names the paths where two such states are not bitwise equal.
"""

import warnings
from pathlib import Path

import numpy as np
import torch

# Saved with the run but not part of the training state.
_NOT_STATE = ("args", "num_floating_point_operations_so_far", "checkpoint_version")


def _flatten(value, path: str, into: dict) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{path}.{key}" if path else str(key), into)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _flatten(item, f"{path}[{i}]", into)
    elif not any(part in path.split(".") for part in _NOT_STATE):
        into[path] = value


def _torch_dist_values(iteration_dir: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    values: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.distributed is not initialized: one process
        _load_state_dict(
            values,
            storage_reader=FileSystemReader(str(iteration_dir)),
            planner=_EmptyStateDictLoadPlanner(),
            no_dist=True,
        )
    return values


def training_state(iteration_dir: Path) -> dict:
    """{path: tensor or plain value} of one iteration directory (module docstring)."""
    iteration_dir = Path(iteration_dir)
    if (iteration_dir / ".metadata").is_file():
        values = _torch_dist_values(iteration_dir)
    else:
        values = {
            str(f.relative_to(iteration_dir)): torch.load(f, map_location="cpu", weights_only=False)
            for f in sorted(iteration_dir.glob("mp_rank_*/*.pt"))
        }
    if not values:
        raise FileNotFoundError(f"{iteration_dir} holds no checkpoint")
    state: dict = {}
    _flatten(values, "", state)
    return state


def _equal(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (
            torch.is_tensor(a)
            and torch.is_tensor(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return type(a) is type(b) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def differences(a: dict, b: dict) -> list[str]:
    """The paths present in only one of two training states, or whose values differ."""
    paths = a.keys() | b.keys()
    return sorted(p for p in paths if p not in a or p not in b or not _equal(a[p], b[p]))


def optimizer_paths(state: dict, *names: str) -> list[str]:
    """The paths of `state` that hold one of the optimizer's values `names` ('exp_avg', ...):
    under `optimizer`, or in the distributed optimizer's own file (`distrib_optim.pt`)."""
    return [p for p in state if "optim" in p and any(n in p for n in names)]
