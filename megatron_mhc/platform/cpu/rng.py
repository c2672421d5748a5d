"""The CPU default generator plays the part of the CUDA default generator.

Dropout on CPU tensors draws from the CPU default generator. With these patches the RNG tracker
of ``tensor_parallel/random.py`` keeps and forks CPU generator states, so
``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` give
tensor-parallel-rank-dependent dropout as on GPU, and the rerun state machine and checkpoints
save and restore it.
"""

import logging

import torch

from megatron_mhc.megatron_patches import MegatronPatch
from megatron_mhc.platform.cpu.module_views import override_torch_in, torch_views

__all__ = ["RNG_PATCHES", "apply_rng_patches"]

# Megatron modules that seed, save or restore the CUDA default generator with
# torch.cuda.manual_seed / get_rng_state / set_rng_state: the tensor-parallel RNG tracker, the
# rerun state machine (around every step) and checkpointing ('cuda_rng_state').
_TENSOR_PARALLEL_RANDOM = "megatron.core.tensor_parallel.random"
_MODULES_USING_THE_CUDA_GENERATOR = (
    _TENSOR_PARALLEL_RANDOM,
    "megatron.core.rerun_state_machine",
    "megatron.training.checkpointing",
)
RNG_PATCHES = (
    *torch_views("the CPU generator is the CUDA generator", _MODULES_USING_THE_CUDA_GENERATOR),
    MegatronPatch(
        "CPU platform: the CPU generator is the CUDA generator",
        _TENSOR_PARALLEL_RANDOM,
        "_get_cuda_rng_state",
        ("device", "clone", "graph_safe"),
    ),
    MegatronPatch(
        "CPU platform: the CPU generator is the CUDA generator",
        _TENSOR_PARALLEL_RANDOM,
        "_set_cuda_rng_state",
        ("new_state", "device", "graph_safe"),
    ),
)


def apply_rng_patches() -> None:
    """Make RNG_PATCHES (checked by the caller)."""
    # Without a GPU, torch.cuda.get_rng_state raises, and torch.cuda.manual_seed / set_rng_state
    # are queued for a CUDA initialization that never comes. With this, the tracker's `add` and
    # `model_parallel_cuda_manual_seed` seed and record CPU generator states (one per
    # tensor-parallel rank for dropout in TP regions, as on GPU).
    *module_views, get_patch, set_patch = RNG_PATCHES
    for patch in module_views:
        override_torch_in(
            patch,
            cuda=dict(
                manual_seed=torch.manual_seed,
                get_rng_state=torch.get_rng_state,
                set_rng_state=torch.set_rng_state,
            ),
        )

    # The tracker's `fork` (and activation recomputation) swap states with these two helpers,
    # which read and write torch.cuda.default_generators[device].
    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        # torch.get_rng_state returns a copy (`clone`); CUDA graphs (`graph_safe`) need a GPU.
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    get_patch.replace(get_rng_state)
    set_patch.replace(set_rng_state)

    # `fork` warns when the CPU generator moved inside the fork, which on GPU means that CPU
    # random ops ran in a CUDA RNG region. On CPU the forked generator is the CPU one, so every
    # fork that draws a dropout mask would warn.
    logging.getLogger(_TENSOR_PARALLEL_RANDOM).addFilter(
        lambda record: record.getMessage() != "CPU RNG state changed within GPU RNG context"
    )
