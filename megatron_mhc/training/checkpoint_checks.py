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
_INDEX = ".metadata"


def _iterations(load: Path) -> list[int]:
    return sorted(
        int(p.name.removeprefix("iter_"))
        for p in load.glob("iter_*")
        if p.name.removeprefix("iter_").isdigit() and p.is_dir()
    )


def _iteration_dir(load: Path, iteration: int) -> Path:
    return load / f"iter_{iteration:07d}"


def _iteration_to_load(load: str, ckpt_step: int | None) -> tuple[int, str] | None:
    """(iteration, what names it) that `--load load` resumes from; None for a fresh run (no
    directory or no tracker) or a release checkpoint. ValueError for an unreadable one."""
    directory = Path(load)
    if not directory.exists():
        return None
    if not directory.is_dir():
        raise ValueError(f"--load {load}: is a file, expected a checkpoint directory")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise ValueError(f"--load {load}: the directory cannot be read (permissions)")
    if ckpt_step:
        return ckpt_step, f"--ckpt-step {ckpt_step}"
    tracker = directory / TRACKER
    if not tracker.is_file():
        return None  # no tracker: Megatron starts from scratch
    try:
        text = tracker.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--load {load}: {tracker} cannot be read ({err})") from err
    if text == "release":
        return None  # a release checkpoint (converted weights), loaded as Megatron finds it
    if not text.isdigit():
        on_disk = ", ".join(map(str, _iterations(directory))) or "none"
        raise ValueError(
            f"--load {load}: {tracker} holds {text[:40]!r}, expected the iteration to resume "
            f"from (iterations on disk: {on_disk}); write one of them into it"
        )
    return int(text), f"{tracker}"


def check_checkpoint_to_load(load: str | None, ckpt_step: int | None = None) -> None:
    """ValueError, naming the file, when the checkpoint `--load load` (at `--ckpt-step`, else
    at its tracker's iteration) cannot be read in full; nothing when there is none to load (a
    fresh run: Megatron starts from scratch)."""
    if load is None or (found := _iteration_to_load(load, ckpt_step)) is None:
        return
    iteration, source = found
    directory = Path(load)
    iterations = _iterations(directory)
    iteration_dir = _iteration_dir(directory, iteration)
    if not iteration_dir.is_dir():
        on_disk = ", ".join(map(str, iterations)) or "none"
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


def check_optimizer_state_to_load(args) -> None:
    """ValueError when the run would load optimizer state that is not there (a checkpoint saved
    with --no-save-optim, the only kind bf16 / fp16 mHC runs wrote before megatron-mhc 0.3), or
    that of another iteration (megatron-core 0.19.2 reads the distributed optimizer's torch-format
    state of the tracker's iteration, whatever --ckpt-step says). Call after
    check_checkpoint_to_load."""
    if args.load is None or args.no_load_optim or args.finetune:
        return
    found = _iteration_to_load(args.load, args.ckpt_step)
    if found is None:
        return
    iteration, _ = found
    if not _holds_optimizer_state(_iteration_dir(Path(args.load), iteration)):
        raise ValueError(
            f"--load {args.load}: the checkpoint of iteration {iteration} holds no optimizer "
            "state (it was saved with --no-save-optim); add --no-load-optim to resume it with "
            "Adam's moments starting from zero (the learning-rate schedule continues)"
        )
    if args.ckpt_step and args.use_distributed_optimizer and args.ckpt_format == "torch":
        tracked = _iteration_to_load(args.load, None)
        if tracked is None or tracked[0] != args.ckpt_step:
            raise ValueError(
                f"--ckpt-step {args.ckpt_step} with --ckpt-format torch and "
                "--use-distributed-optimizer: megatron-core would load the weights of iteration "
                f"{args.ckpt_step} with the optimizer state of the iteration in "
                f"{Path(args.load) / TRACKER}; write {args.ckpt_step} into that file instead"
            )


def _holds_optimizer_state(iteration_dir: Path) -> bool:
    """Whether a torch_dist or torch iteration directory saved the optimizer's state (True
    for other formats: Megatron checks those)."""
    if (iteration_dir / _INDEX).is_file():
        keys = FileSystemReader(str(iteration_dir)).read_metadata().state_dict_metadata
        return any(key.startswith("optimizer.") for key in keys)
    for rank_dir in sorted(iteration_dir.glob("mp_rank_*")):
        if (rank_dir / "distrib_optim.pt").is_file():
            return True
        model_file = rank_dir / "model_optim_rng.pt"
        if model_file.is_file():
            return "optimizer" in torch.load(model_file, mmap=True, weights_only=False)
    return True


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
    index = iteration_dir / _INDEX
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
