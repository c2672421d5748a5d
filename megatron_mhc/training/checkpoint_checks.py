"""The checkpoint a launch would resume from, checked before anything is set up or written.

Megatron reads the checkpoint only after building the model and its optimizer; a damaged one
then fails deep inside torch.distributed.checkpoint (`EOFError`, `pickle data was truncated`,
`unexpected end of file`), naming no file and no way back. `check_checkpoint_to_load` reads
what Megatron would load, without the tensors: the tracker file, the iteration directory, its
`metadata.json`, its index `.metadata` (every tensor's file, offset and length) and the size of
every data file the index points into. A problem is one ValueError naming the file and how to
resume from the previous checkpoint.
"""

import json
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader

TRACKER = "latest_checkpointed_iteration.txt"


def _iterations(load: Path) -> list[int]:
    return sorted(
        int(p.name.removeprefix("iter_"))
        for p in load.glob("iter_*")
        if p.name.removeprefix("iter_").isdigit() and p.is_dir()
    )


def _iteration_dir(load: Path, iteration: int) -> Path:
    return load / f"iter_{iteration:07d}"


def check_checkpoint_to_load(load: str | None, ckpt_step: int | None = None) -> None:
    """ValueError, naming the file, when the checkpoint `--load load` (at `--ckpt-step`, else
    at its tracker's iteration) cannot be read in full; nothing when there is none to load (a
    fresh run: Megatron starts from scratch)."""
    if load is None:
        return
    directory = Path(load)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"--load {load}: is a file, expected a checkpoint directory")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise ValueError(f"--load {load}: the directory cannot be read (permissions)")
    tracker = directory / TRACKER
    iterations = _iterations(directory)
    on_disk = ", ".join(map(str, iterations)) or "none"
    if ckpt_step:
        iteration, source = ckpt_step, f"--ckpt-step {ckpt_step}"
    elif tracker.is_file():
        try:
            text = tracker.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--load {load}: {tracker} cannot be read ({err})") from err
        if text == "release":
            return  # a release checkpoint (converted weights), loaded as Megatron finds it
        if not text.isdigit():
            raise ValueError(
                f"--load {load}: {tracker} holds {text[:40]!r}, expected the iteration to resume "
                f"from (iterations on disk: {on_disk}); write one of them into it"
            )
        iteration, source = int(text), f"{tracker}"
    else:
        return  # no tracker: Megatron starts from scratch
    iteration_dir = _iteration_dir(directory, iteration)
    if not iteration_dir.is_dir():
        raise ValueError(
            f"--load {load}: {source} names iteration {iteration}, but {iteration_dir} does not "
            f"exist (iterations on disk: {on_disk})"
        )
    problem = _damage(iteration_dir)
    if problem is not None:
        file, what = problem
        raise ValueError(
            f"--load {load}: the checkpoint of iteration {iteration} is damaged: {file} {what}. "
            + _previous_checkpoint_hint(directory, iterations, iteration)
        )


def _previous_checkpoint_hint(directory: Path, iterations: list[int], iteration: int) -> str:
    earlier = [i for i in iterations if i < iteration]
    if not earlier:
        return f"There is no earlier checkpoint in {directory}: move it away to start afresh"
    previous = earlier[-1]
    return (
        f"To resume from the previous checkpoint, iteration {previous}: add --ckpt-step "
        f"{previous} (this run only), or write {previous} into {directory / TRACKER}"
    )


def _damage(iteration_dir: Path) -> tuple[Path, str] | None:
    """(file, what is wrong) for the first unreadable part of a torch_dist iteration
    directory; None when it reads in full (or is not torch_dist: Megatron checks others)."""
    metadata_json = iteration_dir / "metadata.json"
    if not metadata_json.is_file():
        return None
    try:
        backend = json.loads(metadata_json.read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError) as err:
        return metadata_json, f"is not readable JSON ({err})"
    if backend != "torch_dist":
        return None
    index = iteration_dir / ".metadata"
    if not index.is_file():
        return index, "is missing (the index of the checkpoint's tensors)"
    try:
        metadata = FileSystemReader(str(iteration_dir)).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, RuntimeError) as err:
        return index, f"cannot be read ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for item in metadata.storage_data.values():
        needed[item.relative_path] = max(
            needed.get(item.relative_path, 0), item.offset + item.length
        )
    for name, size in sorted(needed.items()):
        data = iteration_dir / name
        if not data.is_file():
            return data, "is missing (the index points into it)"
        actual = data.stat().st_size
        if actual < size:
            return data, f"is truncated: {actual} bytes, the index needs {size}"
    common = iteration_dir / "common.pt"
    if common.is_file():
        try:
            torch.load(common, map_location="cpu", weights_only=False)
        except Exception as err:  # any failure to unpickle it means it is damaged
            return common, f"cannot be read ({type(err).__name__}: {err})"
    return None
