"""The kernel backends: their names, and the module implementing the mHC ops for each.

Imports nothing of the package at module level (a backend module is imported by name when it is
asked for), so that the config can check `mhc_kernel_backend` against the names without
importing any kernel.
"""

import importlib
from types import ModuleType
from typing import Literal, get_args

KernelBackend = Literal["auto", "torch", "triton", "cutile"]
KERNEL_BACKENDS = get_args(KernelBackend)
# The fused backends, in order of preference when two are equally fast.
FUSED_BACKENDS = ("triton", "cutile")

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


def runnable_fused_backends() -> dict[str, ModuleType]:
    """The fused backends whose kernels can run in this process (Triton on CPU only in its
    interpreter)."""
    runnable = {}
    for name in FUSED_BACKENDS:
        try:
            runnable[name] = get_backend(name)
        except ValueError:
            pass
    return runnable
