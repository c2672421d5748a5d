"""Helpers for multi-process Megatron tests on CPU (gloo); reusable by any test.

Processes:
    run_distributed(fn, world_size, *args) starts `world_size` processes, applies the CPU
    platform in each (megatron_mhc.platform.cpu; a no-op with CUDA), initializes torch.distributed
    with gloo on a free local port, calls fn(rank, world_size, *args) and returns the list of the
    return values, indexed by rank. `fn` must be a module-level function (it is pickled by name)
    and its return value must survive torch.save/torch.load (tensors, dicts, lists, numbers).
    An exception in any rank fails the call with that rank's traceback; a collective left waiting
    for a dead rank times out after `timeout_s`. Megatron's model parallelism and
    torch.distributed are torn down when `fn` returns.
    run_isolated(fn, *args) runs fn(*args) in one fresh process (no platform applied, no
    torch.distributed): for tests that must not patch the pytest process.

    Processes start with torch.multiprocessing (start method "forkserver": each is a fresh
    process as with "spawn", but forked from a server that imported torch and Megatron once, which
    saves ~4 s of imports per process on a 2-core machine). The server, and so every process,
    runs with CPU_ENV (TORCHDYNAMO_DISABLE=1, ...) and CUDA_VISIBLE_DEVICES="" (CPU tests stay on
    CPU on a GPU machine too); the pytest process's environment is left as it was. Each process
    uses one intra-op thread: world_size processes share the cores, and gloo collectives wait on
    threads that would otherwise spin.

Inside `fn`:
    initialize_model_parallel(tp, pp, seed=..., **kwargs) sets up Megatron's groups and seeds as
    megatron.training does (torch.manual_seed and model_parallel_cuda_manual_seed, offset per
    pipeline stage); destroy_model_parallel() tears the groups down, so one `fn` can try several
    layouts in a row (cheaper than a start per layout).

Same weights in every layout:
    full_state_dict(model), on a model built with TP=1 / PP=1, gives the reference weights;
    load_full_state_dict(model, full) loads them into this rank's part of the same model built
    under any TP / PP layout: a tensor-parallel parameter (Megatron sets `tensor_model_parallel`
    and `partition_dim` on them) gets its chunk along `partition_dim`, layer `decoder.layers.<i>`
    of a pipeline stage the weights of global layer `layer_number - 1` (full_name() maps the
    names), and the output layer of a last stage with tied embeddings the word embeddings.
    full = same_weights(model, full) does both for a series of layouts: the first model (TP=1 /
    PP=1) gives the weights (`full` None), every model gets them.

Gradients back in full:
    export_grads(model) returns this rank's gradients (`main_grad` under DDP, else `grad`) by full
    name with its tensor / pipeline ranks; merge_full_grads(exports), in the parent on the list
    returned by run_distributed, concatenates tensor-parallel shards along `partition_dim`, keeps
    one data-parallel replica, and sums the contributions of pipeline stages to the same weight
    (tied embedding and output layer), which gives the TP=1 / PP=1 gradients.

Limitations: the fc1 weight of a gated linear unit (SwiGLU) is laid out per rank as
[gate_r; up_r], which plain chunking does not reproduce; expert-parallel MoE experts are not
renumbered; virtual pipeline stages (a list of model chunks) are not handled.
"""

import contextlib
import datetime
import os
import re
import socket
import tempfile
from multiprocessing import forkserver

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_mhc.platform.cpu import CPU_ENV, apply_cpu_platform

_START_METHOD = "forkserver"
# Imported once by the fork server, inherited by every process it starts.
_PRELOAD = [
    "torch",
    "megatron.core.models.gpt",
    "megatron.core.pipeline_parallel",
    "megatron.training.training",
    "megatron.training.checkpointing",
    __name__,
]
# Environment of the started processes: the CPU one, and no GPU even on a GPU machine (these are
# CPU tests; a process forked from a server that queried CUDA also could not initialize it).
_SERVER_ENV = {**CPU_ENV, "CUDA_VISIBLE_DEVICES": ""}
_LAYER_NAME = re.compile(r"^(?P<layers>(?:.*\.)?decoder\.layers)\.(?P<index>\d+)\.(?P<rest>.+)$")


@contextlib.contextmanager
def environment(env: dict):
    """os.environ with `env` set inside (for the processes started there), restored after."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def _context():
    """The forkserver context; starts the fork server (once) with the CPU environment."""
    context = mp.get_context(_START_METHOD)
    context.set_forkserver_preload(_PRELOAD)
    with environment(_SERVER_ENV):
        forkserver.ensure_running()  # the server, and the processes it forks, keep this env
    return context


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, world_size, port, timeout_s, result_dir, args):
    torch.set_num_threads(1)
    apply_cpu_platform()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: int = 120) -> list:
    """Run fn(rank, world_size, *args) on `world_size` gloo processes; return their results."""
    _context()
    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(
            _worker,
            args=(fn, world_size, _free_port(), timeout_s, result_dir, args),
            nprocs=world_size,
            join=True,
            start_method=_START_METHOD,
        )
        return [
            torch.load(os.path.join(result_dir, f"{rank}.pt"), weights_only=False)
            for rank in range(world_size)
        ]


def run_isolated(fn, *args):
    """fn(*args) in one fresh process (no CPU platform applied, no torch.distributed)."""
    with _context().Pool(1) as pool:
        return pool.apply(fn, args)


def initialize_model_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, **kwargs) -> None:
    """parallel_state.initialize_model_parallel(tp, pp, **kwargs), then seeding as
    megatron.training does."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **kwargs
    )
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def destroy_model_parallel() -> None:
    """Tear down Megatron's model-parallel groups (no-op if they are not initialized)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def full_name(model: torch.nn.Module, local_name: str) -> str:
    """Name in the TP=1 / PP=1 model of this pipeline stage's parameter `local_name`."""
    match = _LAYER_NAME.match(local_name)
    if match is None:
        return local_name
    layer = model.get_submodule(match["layers"])[int(match["index"])]
    return f"{match['layers']}.{layer.layer_number - 1}.{match['rest']}"


def _reference_name(model: torch.nn.Module, local_name: str) -> str:
    name = full_name(model, local_name)
    # The last stage of a pipeline with tied embeddings has its own copy of the word embeddings
    # as output layer weight.
    if name.endswith("output_layer.weight") and getattr(
        model, "share_embeddings_and_output_weights", False
    ):
        return name.replace("output_layer.weight", "embedding.word_embeddings.weight")
    return name


def _partition_dim(param: torch.nn.Parameter):
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def full_state_dict(model: torch.nn.Module) -> dict:
    """Parameters of a model built with TP=1 / PP=1, by name (detached copies)."""
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def load_full_state_dict(model: torch.nn.Module, full: dict) -> None:
    """Load the TP=1 / PP=1 weights `full` into this rank's part of `model`."""
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            weight = full[_reference_name(model, name)]
            dim = _partition_dim(param)
            param.copy_(weight if dim is None else weight.chunk(tp_size, dim=dim)[tp_rank])


def same_weights(model: torch.nn.Module, full: dict | None) -> dict:
    """`full` (the TP=1 / PP=1 weights; taken from `model` when None) loaded into `model`;
    returns `full`, for the next layout."""
    if full is None:
        full = full_state_dict(model)
    load_full_state_dict(model, full)
    return full


def export_grads(model: torch.nn.Module) -> dict:
    """This rank's gradients for merge_full_grads: {(full name, tp rank, pp rank): (grad, dim)}."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    exported = {}
    for name, param in model.named_parameters():
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        if grad is not None:
            key = (_reference_name(model, name), tp_rank, pp_rank)
            exported[key] = (grad.detach().clone(), _partition_dim(param))
    return exported


def merge_full_grads(exports: list) -> dict:
    """The TP=1 / PP=1 gradients, by name, from the export_grads() of all ranks."""
    shards = {}  # name -> pp rank -> tp rank -> (grad, dim); the first data-parallel replica
    for exported in exports:
        for (name, tp_rank, pp_rank), value in exported.items():
            shards.setdefault(name, {}).setdefault(pp_rank, {}).setdefault(tp_rank, value)
    full = {}
    for name, stages in shards.items():
        stage_grads = []
        for by_tp_rank in stages.values():
            grads = [by_tp_rank[tp_rank][0] for tp_rank in sorted(by_tp_rank)]
            dim = by_tp_rank[0][1]
            stage_grads.append(grads[0] if dim is None else torch.cat(grads, dim=dim))
        full[name] = sum(stage_grads[1:], stage_grads[0])
    return full
