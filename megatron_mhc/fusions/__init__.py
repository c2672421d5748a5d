"""Every implementation of the mHC ops behind one interface.

A backend is a module exposing the functions of `reference.py` under the same names and
signatures. `mhc_kernel_backend` chooses it: `torch` is the pure-PyTorch reference (any device),
`triton` the fused Triton kernels (CUDA GPUs; on CPU only under TRITON_INTERPRET=1, for tests),
`cutile` the fused cuTile kernels (GPUs its compiler supports). An explicit choice that cannot
run is an error, never a silent fallback.

`auto`, for a model (`model_backend(config)`), takes the fastest backend that passes a check on
the device the model runs on: on a CUDA device, each fused backend it supports runs the model's
ops at the model's shape against the reference, then the HC module is timed with each backend
that passed and with the reference (`verification.py`; `python -m megatron_mhc.fusions.check`
prints it as a table). Elsewhere, and for `get_backend("auto")` (no model to check against),
`auto` is the reference.
"""

import importlib
from types import ModuleType
from typing import Literal, get_args

KernelBackend = Literal["auto", "torch", "triton", "cutile"]
KERNEL_BACKENDS = get_args(KernelBackend)

_BACKEND_MODULES = {
    "torch": "megatron_mhc.fusions.reference",
    "triton": "megatron_mhc.fusions.triton",
    "cutile": "megatron_mhc.fusions.cutile",
}


def _import_backend(name: str) -> ModuleType:
    module = importlib.import_module(_BACKEND_MODULES[name])
    available = getattr(module, "is_available", None)
    if available is not None and not available():
        raise ImportError(getattr(module, "UNAVAILABLE_REASON", "not supported on this device"))
    return module


def get_backend(name: str = "auto") -> ModuleType:
    """The module implementing the mHC ops for `mhc_kernel_backend=name`."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"mhc_kernel_backend={name!r} is not one of {KERNEL_BACKENDS}")
    if name == "auto":
        return _import_backend("torch")
    try:
        return _import_backend(name)
    except ImportError as err:
        raise ValueError(
            f"mhc_kernel_backend={name!r} cannot run here ({err}); "
            f"use 'torch' (runs everywhere) or 'auto'"
        ) from err


def model_backend(config) -> ModuleType:
    """The module implementing the mHC ops for a model built from config: `get_backend`, with
    `auto` checked on this device once per process and shape (`verification.select`)."""
    from megatron_mhc.fusions import verification

    return verification.select(config).module
