"""Every implementation of the mHC ops behind one interface.

A backend is a module exposing the functions of `reference.py` under the same names and
signatures. `mhc_kernel_backend` chooses it: `torch` is the pure-PyTorch reference (any device),
`triton` the fused Triton kernels (CUDA GPUs; on CPU only under TRITON_INTERPRET=1, for tests),
`cutile` the fused cuTile kernels (GPUs its compiler supports). An explicit choice that cannot run is an error, never a silent
fallback.

`auto` is meant to take the fastest backend the device runs. The fused kernels pass their tests
against the reference on CPU (Triton's interpreter, and compiled ahead of time for sm_90 and
sm_100; cuTile compiled to Tile IR bytecode and emulated) but have not yet run or been timed on
a GPU, so until they have, `auto` is the reference everywhere.
"""

import importlib
from types import ModuleType

KERNEL_BACKENDS = ("auto", "torch", "triton", "cutile")

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
