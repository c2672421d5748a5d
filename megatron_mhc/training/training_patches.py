"""The names of megatron.training that pretrain_gpt_mhc.py replaces, in one fenced place.

megatron.training.pretrain (megatron-core 0.19.2) takes the model and dataset providers and the
forward step, but has no argument, hook or config field for these (docs/megatron_patches.md):

  * `get_forward_backward_func`: the pipeline P2P buffers sized for the n-stream state
    (megatron_mhc/transformer/pipeline_shapes.py);
  * `build_pretraining_data_loader`: loaders with their own random generator, so that resuming
    from a checkpoint draws the same dropout masks as the uninterrupted run (on CPU, dropout and
    a loader without a generator share the default generator);
  * `initialize._compile_dependencies`: initialize_megatron's build of the C++ dataset helpers
    (`make` in megatron/core/datasets) becomes an import of the helpers the megatron-core wheel
    ships prebuilt, without a Makefile;
  * `training_log`: also logs tokens/s and the mHC health figures (mhc_logging.py), and after the
    first iteration which schedule the run took (schedule_report.py).

`install_training_patches` checks all four (megatron-core version, names, signatures) before it
replaces any.
"""

import functools
import importlib

import torch

from megatron_mhc.megatron_patches import MegatronPatch, check_patches
from megatron_mhc.training import mhc_logging
from megatron_mhc.transformer.pipeline_shapes import get_forward_backward_func

STREAM_SHAPED_SCHEDULES = MegatronPatch(
    "pipeline schedules sized for the n-stream state",
    "megatron.training.training",
    "get_forward_backward_func",
    ("pp_size", "vp_size", "schedule_pg_collection"),
)
LOADERS_WITH_OWN_GENERATOR = MegatronPatch(
    "data loaders with their own generator",
    "megatron.training.training",
    "build_pretraining_data_loader",
    ("dataset", "consumed_samples"),
)
PREBUILT_DATASET_HELPERS = MegatronPatch(
    "prebuilt dataset helpers", "megatron.training.initialize", "_compile_dependencies", ()
)

TRAINING_PATCHES = (
    STREAM_SHAPED_SCHEDULES,
    LOADERS_WITH_OWN_GENERATOR,
    PREBUILT_DATASET_HELPERS,
    mhc_logging.TRAINING_LOG_PATCH,
)


def _loaders_with_own_generator(build_loader):
    @functools.wraps(build_loader)
    def build(*args, **kwargs):
        loader = build_loader(*args, **kwargs)
        if isinstance(loader, torch.utils.data.DataLoader) and loader.generator is None:
            consumed_samples = MegatronPatch.bind(build_loader, args, kwargs)["consumed_samples"]
            loader.generator = torch.Generator().manual_seed(consumed_samples)
        return loader

    return build


def _dataset_helpers_are_prebuilt():
    importlib.import_module("megatron.core.datasets.helpers_cpp")
    torch.distributed.barrier()  # as after Megatron's build


def install_training_patches() -> None:
    """Replace the four names (see the module docstring); raises MegatronPatchError, having
    replaced none, if one does not fit the installed megatron-core."""
    check_patches(TRAINING_PATCHES)
    STREAM_SHAPED_SCHEDULES.replace(get_forward_backward_func)
    LOADERS_WITH_OWN_GENERATOR.wrap(_loaders_with_own_generator)
    PREBUILT_DATASET_HELPERS.replace(_dataset_helpers_are_prebuilt)
    mhc_logging.install()
