"""megatron.training's start-up without a GPU: ``initialize_megatron`` (called by ``pretrain``),
the argument validation it runs, and its device selection and JIT warm-up."""

import functools

import torch

from megatron_mhc.megatron_patches import MegatronPatch
from megatron_mhc.platform.cpu.module_views import override_torch_in, torch_views

__all__ = ["INITIALIZE_PATCHES", "apply_initialize_patches"]

_ONE_CPU_DEVICE_PER_PROCESS = torch_views(
    "one CPU device per process", ("megatron.training.initialize",)
)


def _one_cpu_device_per_process():
    # initialize_megatron only sets up model parallelism and the RNG tracker
    # (`_set_random_seed` -> `model_parallel_cuda_manual_seed`) if torch.cuda.device_count() > 0,
    # and then selects the device with torch.cuda.set_device(local_rank). On CPU each process has
    # one device, its CPU, which needs no selecting (torch.cpu: device_count() == 1, set_device
    # a no-op).
    (patch,) = _ONE_CPU_DEVICE_PER_PROCESS
    override_torch_in(
        patch, cuda=dict(device_count=torch.cpu.device_count, set_device=torch.cpu.set_device)
    )


_PRETRAIN_WITHOUT_CUDA = MegatronPatch(
    "CPU platform: pretrain initializes Megatron without CUDA",
    "megatron.training.training",
    "initialize_megatron",
    ("allow_no_cuda",),
)


def _pretrain_allows_no_cuda():
    # pretrain() calls initialize_megatron(), which asserts torch.cuda.is_available() unless it
    # is called with allow_no_cuda=True.
    _PRETRAIN_WITHOUT_CUDA.wrap(
        lambda initialize_megatron: functools.partial(initialize_megatron, allow_no_cuda=True)
    )


_NO_GPU_ARCHITECTURE = MegatronPatch(
    "CPU platform: no GPU architecture",
    "megatron.training.arguments",
    "get_device_arch_version",
    (),
)


def _no_gpu_architecture():
    # validate_args() asks get_device_arch_version() (CUDA device properties; raises without a
    # GPU) whether the device is Blackwell or newer when TP or CP > 1. There is no GPU
    # architecture: 0.
    _NO_GPU_ARCHITECTURE.replace(lambda: 0)


_JIT_WARMUP = MegatronPatch(
    "CPU platform: the JIT warm-up leaves the weights' generator alone",
    "megatron.training.initialize",
    "_warmup_jit_function",
    (),
)


def _jit_warmup_leaves_the_weights_generator_alone():
    # initialize_megatron warms up the fused functions on random tensors sized by the TP and SP
    # settings, drawn from "the CUDA generator", which on CPU is the generator the weights are
    # initialised from next (use_cpu_initialization): the starting weights would then depend on
    # the parallel layout. On GPU the warm-up draws from the GPU's generator and leaves them
    # alone; on CPU it runs with the CPU generator's state saved and restored.
    def without_consuming_random_numbers(warmup):
        @functools.wraps(warmup)
        def warmup_without_consuming_random_numbers(*args, **kwargs):
            with torch.random.fork_rng(devices=[]):
                return warmup(*args, **kwargs)

        return warmup_without_consuming_random_numbers

    _JIT_WARMUP.wrap(without_consuming_random_numbers)


INITIALIZE_PATCHES = (
    *_ONE_CPU_DEVICE_PER_PROCESS,
    _PRETRAIN_WITHOUT_CUDA,
    _NO_GPU_ARCHITECTURE,
    _JIT_WARMUP,
)


def apply_initialize_patches() -> None:
    """Make INITIALIZE_PATCHES (checked by the caller)."""
    _one_cpu_device_per_process()
    _pretrain_allows_no_cuda()
    _no_gpu_architecture()
    _jit_warmup_leaves_the_weights_generator_alone()
