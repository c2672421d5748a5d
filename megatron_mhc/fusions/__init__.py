"""Every implementation of the mHC ops behind one interface.

A backend is a module exposing the functions of `reference.py` under the same names and
signatures. `mhc_kernel_backend` chooses it (`backends.py`): `torch` is the pure-PyTorch
reference (any device), `triton` the fused Triton kernels (CUDA GPUs; on CPU only under
TRITON_INTERPRET=1, for tests), `cutile` the fused cuTile kernels (GPUs its compiler supports).
An explicit choice that cannot run is an error, never a silent fallback.

`auto`, for a model, takes the fastest backend that passes a check on the device the model runs
on: on a CUDA device, each fused backend it supports runs the model's ops at the model's shape
against the reference (`verification.py`), then the HC module is timed with each backend that
passed and with the reference (`auto_backend.py`, with the timer of the layer that owns the HC
modules: `megatron_mhc.transformer.hyper_connection`). Elsewhere, and for `get_backend("auto")`
(no model to check against), `auto` is the reference.

Nothing here imports a layer: the kernels sit below the modules that call them.
"""

from megatron_mhc.fusions.backends import (
    FUSED_BACKENDS,
    KERNEL_BACKENDS,
    KernelBackend,
    get_backend,
    runnable_fused_backends,
)

__all__ = [
    "FUSED_BACKENDS",
    "KERNEL_BACKENDS",
    "KernelBackend",
    "get_backend",
    "runnable_fused_backends",
]
