"""The CPU is "the CUDA device": where Megatron names, selects or moves to the current CUDA
device, or creates a tensor on a literal ``device="cuda"``, it gets the CPU.

``torch.cuda.current_device()`` / ``torch.cuda.synchronize()`` and ``Tensor.cuda()`` /
``Module.cuda()`` are replaced on torch itself: Megatron calls them from too many modules to list,
and without a GPU they raise, so no working code path changes. The ``device="cuda"`` literals are
replaced in the namespace of each module that has them on the code paths of a CPU run.
"""

import functools

import torch

from megatron_mhc.megatron_patches import MegatronPatch
from megatron_mhc.platform.cpu.module_views import override_torch_in, torch_views

__all__ = ["DEVICE_PATCHES", "apply_device_patches"]


def _cpu_for_cuda(device):
    """The CPU for a CUDA `device` ("cuda", "cuda:1", 0, ...); any other device unchanged."""
    return "cpu" if device is not None and torch.device(device).type == "cuda" else device


def _cpu_if_cuda(factory):
    """Tensor factory `factory` (torch.zeros, ...) placing `device="cuda"` on the CPU."""

    @functools.wraps(factory)
    def on_cpu(*args, device=None, **kwargs):
        return factory(*args, device=_cpu_for_cuda(device), **kwargs)

    return on_cpu


_CURRENT_DEVICE = (
    MegatronPatch(
        "CPU platform: the CPU is the current device", "torch.cuda", "current_device", ()
    ),
    MegatronPatch("CPU platform: the CPU is the current device", "torch.cuda", "synchronize", ()),
)


def _cpu_is_the_current_device():
    # Megatron allocates with `device=torch.cuda.current_device()` in ~200 places (p2p shape and
    # tensor buffers, loss reductions, the batch broadcast, ...); the pipeline p2p code calls
    # `torch.cuda.synchronize()` after every exchange. Without a GPU both raise. torch.cpu has
    # their CPU counterparts for device-agnostic code (returns "cpu"; no-op).
    current_device, synchronize = _CURRENT_DEVICE
    current_device.replace(torch.cpu.current_device)
    synchronize.replace(torch.cpu.synchronize)


_CUDA_MOVES_TO_CPU = (
    MegatronPatch("CPU platform: .cuda() stays on the CPU", "torch.nn:Module", "cuda", ("device",)),
    # A builtin method, without an inspectable signature.
    MegatronPatch("CPU platform: .cuda() stays on the CPU", "torch:Tensor", "cuda"),
)


def _cpu_is_where_cuda_moves_to():
    # megatron.training moves the built model with `Module.cuda()` and every batch with
    # `Tensor.cuda()`, which raise without a GPU. On CPU, model and batch already are on "the
    # device", for which torch returns the object itself.
    def module_cuda(self, device=None):
        return self

    def tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        return self

    module_patch, tensor_patch = _CUDA_MOVES_TO_CPU
    module_patch.replace(module_cuda)
    tensor_patch.replace(tensor_cuda)


# Megatron modules that create tensors on a literal CUDA device (`device="cuda"`) on the code
# paths of a CPU run: the schedules' token counter; the default causal attention mask; the
# gradient norm (local multi-tensor L2 norm, clipping buffers); the optimizers' scale and
# found-inf tensors; the rerun state machine's reductions; the checkpoint iteration reduction;
# the training loop's start time, loss sums and exit flags; the JIT-function warm-up of
# initialize_megatron (unconditional, also with fusions off); the parameter-norm logging; the
# exchange buffers of a fully parallel checkpoint load (--ckpt-fully-parallel-load).
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.training.checkpointing",
    "megatron.training.training",
    "megatron.training.initialize",
    "megatron.training.utils.common_utils",
)
_TENSOR_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "rand", "randn", "empty_like")
_CUDA_LITERALS = (
    *torch_views("device='cuda' literals place tensors on the CPU", _MODULES_WITH_CUDA_LITERALS),
    MegatronPatch(
        "CPU platform: device='cuda' literals place tensors on the CPU",
        "megatron.core.dist_checkpointing.mapping:ShardedTensor",
        "init_data",
        ("device",),
    ),
)


def _cuda_literals_on_cpu():
    # Without a GPU, creating a tensor on device "cuda" raises. In the modules above, the tensor
    # factories place it on the CPU instead; so does ShardedTensor.init_data, to which the fully
    # parallel load passes "cuda".
    *module_views, init_data_patch = _CUDA_LITERALS
    factories = {name: _cpu_if_cuda(getattr(torch, name)) for name in _TENSOR_FACTORIES}
    for patch in module_views:
        override_torch_in(patch, **factories)

    def cpu_init_data(init_data):
        @functools.wraps(init_data)
        def init_data_on_cpu(self, device, *args, **kwargs):
            return init_data(self, _cpu_for_cuda(device), *args, **kwargs)

        return init_data_on_cpu

    init_data_patch.wrap(cpu_init_data)


DEVICE_PATCHES = (*_CURRENT_DEVICE, *_CUDA_MOVES_TO_CPU, *_CUDA_LITERALS)


def apply_device_patches() -> None:
    """Make DEVICE_PATCHES (checked by the caller)."""
    _cpu_is_the_current_device()
    _cpu_is_where_cuda_moves_to()
    _cuda_literals_on_cpu()
