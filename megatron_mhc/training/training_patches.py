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
    first iteration which schedule the run took (schedule_report.py);
  * `load_checkpoint`: with --no-load-optim megatron.training skips the learning-rate schedule
    too, so a resumed run would warm up again from iteration 0; the schedule continues at the
    checkpoint's consumed samples instead, and only Adam's state starts afresh;
  * `MoEMetricsTracker.report`: a HybridModel pipeline stage without MoE layers pre-creates the
    MoE metrics with one entry per MoE layer of the model, where the routers of the other stages
    record one entry per layer of any kind; the stages' all-reduce of unequal tensors then hangs
    at the first log (a pattern such as "*E|*-"). They are pre-created at the routers' size.

`install_training_patches` checks all six (megatron-core version, names, signatures) before it
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

SCHEDULE_KEPT_WITHOUT_OPTIMIZER_STATE = MegatronPatch(
    "the learning-rate schedule continues under --no-load-optim",
    "megatron.training.training",
    "load_checkpoint",
    ("ddp_model", "optimizer", "opt_param_scheduler"),
)
MOE_METRICS_SIZED_AS_RECORDED = MegatronPatch(
    "MoE metrics of a pipeline stage without MoE layers sized as the routers record them",
    "megatron.core.transformer.moe.moe_logging:MoEMetricsTracker",
    "report",
    ("self", "loss_scale", "iteration", "force_initialize", "track_names", "num_layers"),
)

TRAINING_PATCHES = (
    STREAM_SHAPED_SCHEDULES,
    LOADERS_WITH_OWN_GENERATOR,
    PREBUILT_DATASET_HELPERS,
    mhc_logging.TRAINING_LOG_PATCH,
    SCHEDULE_KEPT_WITHOUT_OPTIMIZER_STATE,
    MOE_METRICS_SIZED_AS_RECORDED,
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


def _schedule_kept_without_optimizer_state(load_checkpoint):
    @functools.wraps(load_checkpoint)
    def load(*args, **kwargs):
        from megatron.training import get_args
        from megatron.training.utils import print_rank_0

        iteration, *rest = load_checkpoint(*args, **kwargs)
        run = get_args()
        scheduler = MegatronPatch.bind(load_checkpoint, args, kwargs)["opt_param_scheduler"]
        if run.no_load_optim and not run.finetune and scheduler is not None and iteration > 0:
            # The scheduler counts samples; megatron.training steps it by each batch's size.
            scheduler.num_steps = 0
            scheduler.step(increment=run.consumed_train_samples)
            print_rank_0(
                f"megatron-mhc: resumed iteration {iteration} without its optimizer state "
                "(--no-load-optim): Adam's moments start from zero; the learning-rate schedule "
                f"continues at {run.consumed_train_samples} consumed samples"
            )
        return (iteration, *rest)

    return load


def _moe_metrics_sized_as_recorded(report):
    @functools.wraps(report)
    def wrapped(*args, **kwargs):
        from megatron.training import get_args

        call = MegatronPatch.bind(report, args, kwargs)
        if call["force_initialize"] and call["track_names"] is not None:
            # A router records into a tensor of config.num_layers (+ MTP layers) entries
            # (megatron/core/transformer/moe/router.py); the report's own pre-creation then
            # finds these and creates nothing.
            run = get_args()
            size = run.num_layers + (run.mtp_num_layers or 0)
            names = call["track_names"]
            for name in [names] if isinstance(names, str) else names:
                call["self"].ensure_initialized(name, size)
        return report(*args, **kwargs)

    return wrapped


def _dataset_helpers_are_prebuilt():
    importlib.import_module("megatron.core.datasets.helpers_cpp")
    torch.distributed.barrier()  # as after Megatron's build


def install_training_patches() -> None:
    """Replace the six names (see the module docstring); raises MegatronPatchError, having
    replaced none, if one does not fit the installed megatron-core."""
    check_patches(TRAINING_PATCHES)
    STREAM_SHAPED_SCHEDULES.replace(get_forward_backward_func)
    LOADERS_WITH_OWN_GENERATOR.wrap(_loaders_with_own_generator)
    PREBUILT_DATASET_HELPERS.replace(_dataset_helpers_are_prebuilt)
    mhc_logging.install()
    SCHEDULE_KEPT_WITHOUT_OPTIMIZER_STATE.wrap(_schedule_kept_without_optimizer_state)
    MOE_METRICS_SIZED_AS_RECORDED.wrap(_moe_metrics_sized_as_recorded)
