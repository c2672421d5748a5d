"""Checkpoint names across versions: this project's earlier names, and Megatron-LM's native mHC.

Two conversions, both of Megatron `torch_dist` checkpoints (a directory with
`latest_checkpointed_iteration.txt` and `iter_NNNNNNN/` subdirectories, or one iteration
directory) and of plain state dicts:

* `upgrade`: checkpoints written before the hyper-connections took Megatron's slot names
  (`self_attention_hc` -> `self_attention_hyper_connection`, `mlp_hc` -> `mlp_hyper_connection`).
  Only names change, so only the checkpoint's index (`.metadata`) is rewritten; the data files
  are hard-linked (copied across file systems) into the new directory.
* `to_megatron_main` / `from_megatron_main`: this project's HC parameters (DeepSeek-V4's layout:
  `fn` [n*n+2n, n*C], `base` [n*n+2n], `scale` [3]) and Megatron-LM main's native mHC
  (`mapping_proj.weight`, `bias`, `alpha_pre`, `alpha_post`, `alpha_res`). Main applies its
  residual mixing matrix to the streams as H @ X, this project as K^T @ X (DeepSeek-V4), so the
  n x n residual rows are transposed on the way; see docs/migration.md for what stays equal.

The source is never modified: every conversion writes a new directory, and a directory is only
renamed into place once it is complete. `read_tensors` (whole tensors of any parallel layout, in
one process) and `new_directory` serve the Hugging Face exporter too (megatron_mhc/hf/export.py).
"""

import contextlib
import dataclasses
import functools
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

LEGACY_HC_RENAMES = (
    (".self_attention_hc.", ".self_attention_hyper_connection."),
    (".mlp_hc.", ".mlp_hyper_connection."),
)
_TRACKER = "latest_checkpointed_iteration.txt"
_INDEX = ".metadata"
_HC_SLOTS = (".self_attention_hyper_connection.", ".mlp_hyper_connection.")
# Megatron main's names for each of this project's HC parameters.
_MAIN_NAMES = {
    "fn": "mapping_proj.weight",
    "base": "bias",
    "scale": ("alpha_pre", "alpha_post", "alpha_res"),
}


def upgrade_key(key: str) -> str:
    """A state-dict or checkpoint key of an earlier version under today's name."""
    for old, new in LEGACY_HC_RENAMES:
        key = key.replace(old, new)
    return key


def iteration_dirs(checkpoint: Path) -> list:
    """The iteration directories of a checkpoint directory, or [checkpoint] for one iteration."""
    checkpoint = Path(checkpoint)
    if (checkpoint / _INDEX).is_file():
        return [checkpoint]
    found = sorted(p for p in checkpoint.glob("iter_*") if (p / _INDEX).is_file())
    if not found:
        raise ValueError(
            f"{checkpoint} is not a torch_dist checkpoint: no {_INDEX} in it nor in any iter_* "
            "subdirectory"
        )
    return found


def _read_index(iteration_dir: Path):
    with open(iteration_dir / _INDEX, "rb") as f:
        return pickle.load(f)


def checkpoint_keys(iteration_dir: Path) -> list:
    """The keys stored in one torch_dist iteration directory."""
    return list(_read_index(Path(iteration_dir)).state_dict_metadata)


def tensor_keys(iteration_dir: Path) -> list:
    """The keys of the tensors (not the pickled objects) in one torch_dist iteration directory."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _read_index(Path(iteration_dir)).state_dict_metadata
    return [key for key, entry in metadata.items() if isinstance(entry, TensorStorageMetadata)]


def _loaded_iteration(checkpoint: Path) -> Path:
    """The iteration directory Megatron would load from `checkpoint` (its tracker, else the
    newest)."""
    tracker = Path(checkpoint) / _TRACKER
    if tracker.is_file() and tracker.read_text().strip().isdigit():
        chosen = Path(checkpoint) / f"iter_{int(tracker.read_text().strip()):07d}"
        if (chosen / _INDEX).is_file():
            return chosen
    return iteration_dirs(checkpoint)[-1]


def legacy_keys(checkpoint: Path) -> list:
    """Keys of the iteration Megatron would load that carry an earlier version's names."""
    return [
        key for key in checkpoint_keys(_loaded_iteration(checkpoint)) if upgrade_key(key) != key
    ]


def check_no_legacy_names(checkpoint: str | None) -> None:
    """ValueError (naming the conversion command) if `checkpoint`, a --load directory, was
    written with an earlier version's names; nothing when it holds no torch_dist checkpoint."""
    if not checkpoint or not Path(checkpoint).is_dir():
        return
    try:
        found = legacy_keys(Path(checkpoint))
    except ValueError:
        return  # not a torch_dist checkpoint (yet): Megatron reports what it finds
    if found:
        raise ValueError(
            f"--load {checkpoint}: the checkpoint uses the HC module names of megatron-mhc "
            f"before 0.2 ({found[0]}, ...). Convert it once, then load the copy: python "
            f"tools/convert_checkpoint.py upgrade {checkpoint} {checkpoint.rstrip('/')}-upgraded"
        )


@contextlib.contextmanager
def new_directory(destination: Path) -> Iterator[Path]:
    """A scratch directory beside `destination`, renamed to it once the block completes."""
    destination = Path(destination)
    if destination.exists():
        raise ValueError(f"{destination} exists already: the conversion writes a new directory")
    destination.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        yield scratch
        os.rename(scratch, destination)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@dataclasses.dataclass(frozen=True)
class _IndexRewrite:
    """What a conversion does to a torch_dist index: every key renamed, and the tensors of the
    selected (renamed) keys replaced by `convert` of them."""

    rename: Callable[[str], str]
    convert: Callable[[dict], dict] | None = None
    select: Callable[[str], bool] = lambda key: False


def read_tensors(iteration_dir: Path, keys) -> dict:
    """{key: tensor} of `keys` of one torch_dist iteration, whole (global) tensors whatever the
    parallel layout that saved them, read in this process without Megatron."""
    from torch.distributed.checkpoint import FileSystemReader, load

    metadata = _read_index(Path(iteration_dir)).state_dict_metadata
    tensors = {
        key: torch.empty(metadata[key].size, dtype=metadata[key].properties.dtype) for key in keys
    }
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process
    load(tensors, storage_reader=FileSystemReader(str(iteration_dir)), no_dist=True)
    return tensors


def _rewrite_iteration(source: Path, target: Path, rewrite: _IndexRewrite) -> None:
    """One torch_dist iteration rewritten. Everything else keeps its bytes: the data files are
    linked and only the index is rewritten; the converted tensors go to one new data file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    index = _read_index(source)
    rename = rewrite.rename
    selected = {
        key: rename(key) for key in index.state_dict_metadata if rewrite.select(rename(key))
    }
    tensors = {}
    if selected:
        tensors = read_tensors(source, selected)
        tensors = rewrite.convert({selected[key]: value for key, value in tensors.items()})
    index.state_dict_metadata = {
        rename(k): v for k, v in index.state_dict_metadata.items() if k not in selected
    }
    index.storage_data = {
        MetadataIndex(rename(i.fqn), i.offset, i.index): info
        for i, info in index.storage_data.items()
        if i.fqn not in selected
    }
    target.mkdir()
    # Data files only the replaced entries used are left behind; the converted tensors go to a
    # new file (never into a linked one: that would write through to the source).
    in_use = {info.relative_path for info in index.storage_data.values()}
    for entry in source.iterdir():
        if entry.name != _INDEX and (entry.suffix != ".distcp" or entry.name in in_use):
            _link_or_copy(entry, target / entry.name)
    if tensors:
        data_file = next(
            f"__mhc_converted_{i}.distcp"
            for i in range(len(in_use) + 1)
            if f"__mhc_converted_{i}.distcp" not in in_use
        )
        with open(target / data_file, "xb") as stream:
            for key, tensor in tensors.items():
                tensor = tensor.contiguous()
                offset = stream.tell()
                torch.save(tensor, stream)
                origin = torch.Size([0] * tensor.dim())
                index.state_dict_metadata[key] = TensorStorageMetadata(
                    properties=TensorProperties.create_from_tensor(tensor),
                    size=tensor.shape,
                    chunks=[ChunkStorageMetadata(offsets=origin, sizes=tensor.shape)],
                )
                index.storage_data[MetadataIndex(key, origin, 0)] = _StorageInfo(
                    relative_path=data_file, offset=offset, length=stream.tell() - offset
                )
    with open(target / _INDEX, "wb") as f:
        pickle.dump(index, f)


def _convert_checkpoint(source: Path, destination: Path, rewrite: _IndexRewrite) -> None:
    """Every iteration of `source` (a checkpoint directory, or one iteration of it) rewritten
    into the new directory `destination`, with the tracker file."""
    source = Path(source)
    iterations = iteration_dirs(source)
    with new_directory(destination) as scratch:
        if iterations == [source]:
            _rewrite_iteration(source, scratch / "converted", rewrite)
            for entry in (scratch / "converted").iterdir():
                entry.rename(scratch / entry.name)
            (scratch / "converted").rmdir()
            return
        for iteration in iterations:
            _rewrite_iteration(iteration, scratch / iteration.name, rewrite)
        if (source / _TRACKER).is_file():
            shutil.copy2(source / _TRACKER, scratch / _TRACKER)


def upgrade_checkpoint(source: Path, destination: Path) -> None:
    """Write `source` (an earlier version's torch_dist checkpoint) with today's names to
    `destination` (a new directory)."""
    _convert_checkpoint(source, destination, _IndexRewrite(upgrade_key))


def _residual_rows_transposed(tensor: torch.Tensor, num_streams: int, dim: int) -> torch.Tensor:
    """Rows [pre (n) | post (n) | res (n*n)] along `dim` with the n x n res block transposed."""
    n = num_streams
    pre_post, res = tensor.split([2 * n, n * n], dim=dim)
    dim = dim % tensor.dim()
    res = res.unflatten(dim, (n, n)).transpose(dim, dim + 1).flatten(dim, dim + 1)
    return torch.cat([pre_post, res], dim=dim)


def _slot_parameter(key: str, names) -> tuple | None:
    """(prefix up to and with the HC slot, parameter name) when `key` is one of `names` of an
    HC module, else None."""
    for slot in _HC_SLOTS:
        head, found, tail = key.rpartition(slot)
        if found and tail in names:
            return head + slot, tail
    return None


def _hc_parameter(key: str) -> tuple | None:
    return _slot_parameter(key, _MAIN_NAMES)


def _main_hc_parameter(key: str) -> tuple | None:
    return _slot_parameter(key, ("mapping_proj.weight", "bias", *_MAIN_NAMES["scale"]))


def to_megatron_main(state_dict: Mapping[str, torch.Tensor], num_streams: int) -> dict:
    """This project's state dict (or checkpoint entries, optimizer moments included: they are
    per element) with the HC parameters under Megatron-LM main's names and orientation. Keys may
    carry a leading layer axis (torch_dist stacks layers); the learned head has no counterpart in
    main and is refused."""
    converted = {}
    for key, value in state_dict.items():
        if ".mhc_head." in key:
            raise ValueError(
                f"{key}: Megatron-LM main has no learned output contract (mhc_output_contract="
                "'learned'); only checkpoints of the 'mean' contract convert"
            )
        parameter = _hc_parameter(key)
        if parameter is None:
            converted[key] = value
            continue
        prefix, name = parameter
        if name == "scale":
            for index, main_name in enumerate(_MAIN_NAMES["scale"]):
                converted[prefix + main_name] = value[..., index : index + 1].clone()
        else:
            dim = -2 if name == "fn" else -1
            converted[prefix + _MAIN_NAMES[name]] = _residual_rows_transposed(
                value, num_streams, dim
            )
    return converted


def from_megatron_main(state_dict: Mapping[str, torch.Tensor], num_streams: int) -> dict:
    """The inverse of `to_megatron_main`."""
    converted, scales = {}, {}
    for key, value in state_dict.items():
        parameter = _main_hc_parameter(key)
        if parameter is None:
            converted[key] = value
            continue
        prefix, name = parameter
        if name == "mapping_proj.weight":
            converted[prefix + "fn"] = _residual_rows_transposed(value, num_streams, -2)
        elif name == "bias":
            converted[prefix + "base"] = _residual_rows_transposed(value, num_streams, -1)
        else:
            scales.setdefault(prefix, {})[name] = value
    for prefix, parts in scales.items():
        missing = [name for name in _MAIN_NAMES["scale"] if name not in parts]
        if missing:
            raise ValueError(f"{prefix}: missing {missing} (Megatron-LM main's gating factors)")
        converted[prefix + "scale"] = torch.cat([parts[n] for n in _MAIN_NAMES["scale"]], dim=-1)
    return converted


def _refuse_flat_optimizer_state(source: Path) -> None:
    flat = [
        key
        for it in iteration_dirs(source)
        for key in checkpoint_keys(it)
        if key.startswith("optimizer.distributed.")
    ]
    if flat:
        raise ValueError(
            f"{source} holds distributed-optimizer state in flat buffers ({flat[0]}, ...), whose "
            "rows cannot be reordered by name: save it with --dist-ckpt-optim-fully-reshardable, "
            "or convert a checkpoint saved without the distributed optimizer"
        )


def _converted_to_main(key: str) -> bool:
    """The entries Megatron-LM main's mHC stores in another layout: HC parameters, the head."""
    return _hc_parameter(key) is not None or ".mhc_head." in key


def _converted_from_main(key: str) -> bool:
    return _main_hc_parameter(key) is not None


def convert_to_megatron_main(source: Path, destination: Path, num_streams: int) -> None:
    """Write `source` (this project's torch_dist checkpoint, any version) for Megatron-LM
    main's mHC to `destination` (a new directory)."""
    _refuse_flat_optimizer_state(source)
    convert = functools.partial(to_megatron_main, num_streams=num_streams)
    rewrite = _IndexRewrite(upgrade_key, convert, _converted_to_main)
    _convert_checkpoint(source, destination, rewrite)


def convert_from_megatron_main(source: Path, destination: Path, num_streams: int) -> None:
    """Write `source` (Megatron-LM main's torch_dist checkpoint with mHC) for this project to
    `destination` (a new directory)."""
    _refuse_flat_optimizer_state(source)
    convert = functools.partial(from_megatron_main, num_streams=num_streams)
    rewrite = _IndexRewrite(lambda key: key, convert, _converted_from_main)
    _convert_checkpoint(source, destination, rewrite)
