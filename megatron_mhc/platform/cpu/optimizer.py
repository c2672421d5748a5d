"""The optimizers' checks of CUDA tensor type names accept the same tensors on CPU.

Megatron recognizes fp32 / fp16 / bf16 parameters and gradients by their CUDA type names:
``clip_grad_by_total_norm_fp32`` (looked up in optimizer.py) asserts
``grad.type() == 'torch.cuda.FloatTensor'``; the constructors of the mixed-precision optimizer
(``Float16OptimizerWithFloat16Params``, bf16 / fp16) and of the ``DistributedOptimizer`` sort
parameters by ``'torch.cuda.{Float,Half,BFloat16}Tensor'`` and reject any other type. The same
tensors on CPU are ``'torch.FloatTensor'``, ...; while these run, they are named as on GPU.
"""

import contextlib
import functools

import torch

from megatron_mhc.megatron_patches import MegatronPatch

__all__ = ["TYPE_CHECK_PATCHES", "apply_type_check_patches"]


@contextlib.contextmanager
def _cpu_tensor_types_named_as_cuda():
    """While active, `Tensor.type()` names a CPU tensor's type as on GPU
    ('torch.FloatTensor' -> 'torch.cuda.FloatTensor'), process-wide (Megatron calls the functions
    wrapped with it from the main thread)."""
    if "type" in vars(torch.Tensor):  # already active (nested call)
        yield
        return
    type_name = torch._C.TensorBase.type

    def type_as_on_gpu(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and self.device.type == "cpu":
            return type_name(self).replace("torch.", "torch.cuda.", 1)
        return type_name(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_as_on_gpu
    try:
        yield
    finally:
        del torch.Tensor.type  # torch.Tensor inherits `type` from torch._C.TensorBase


def _with_cpu_tensor_types_named_as_cuda(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _cpu_tensor_types_named_as_cuda():
            return function(*args, **kwargs)

    return wrapper


# The parameters whose types these check.
TYPE_CHECK_PATCHES = tuple(
    MegatronPatch("CPU platform: CPU tensors pass CUDA type checks", owner, name, parameters)
    for owner, name, parameters in (
        ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32", ("parameters",)),
        (
            "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params",
            "__init__",
            ("optimizer",),
        ),
        (
            "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
            "__init__",
            ("optimizer", "model_chunks"),
        ),
    )
)


def apply_type_check_patches() -> None:
    """Make TYPE_CHECK_PATCHES (checked by the caller)."""
    for patch in TYPE_CHECK_PATCHES:
        patch.wrap(_with_cpu_tensor_types_named_as_cuda)
