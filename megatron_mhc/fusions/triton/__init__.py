"""Triton backend of the mHC ops: the functions of `megatron_mhc.fusions.reference`, same names,
signatures, outputs, dtypes and broadcasting, as autograd Functions over Triton kernels.

Fused (Triton forward and backward): `mhc_mappings`, `mhc_mappings_collapse`, `mhc_collapse`,
`mhc_update`, `mhc_head`.
Not fused (the reference implementations): `sinkhorn` and `hc_static_mappings` as they are,
`hc_mappings` wrapped so that it too saves only its inputs and recomputes in backward.
Float64 inputs (gradcheck) and empty tensors go to the reference. Everything around the kernels
(the autograd Functions, shape checks, broadcasting, the unfused ops) is the shared front end's
(`fused_frontend.FusedOps`); this package says only when the kernels can run and where its
launchers are. Design: docs/kernels.md.

Importing this package does not import Triton: the kernels are defined at the first op call.
TRITON_INTERPRET=1 (Triton's CPU interpreter, for tests) must be in the environment before
anything in the process imports triton: Triton's own library functions (tl.sum, ...) take the
interpreted form only then (is_available() is False, with the reason, when it came too late).
"""

import os

import torch

from megatron_mhc.fusions import fused_frontend as _frontend


def _interpret_requested() -> bool:
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _unavailable_reason():
    """None when the kernels can run here, else why not."""
    try:
        import triton.language as tl
    except Exception as err:  # ImportError, or a broken install
        return f"triton cannot be imported ({err})"
    if _interpret_requested():
        # Triton's own library functions (tl.sum, tl.zeros, ...) are interpreted only when
        # triton.language was first imported with TRITON_INTERPRET=1 already set.
        if type(tl.zeros).__name__ != "InterpretedFunction":
            return (
                "TRITON_INTERPRET=1 was set after triton was imported in this process: set "
                "it in the environment before anything imports triton (or torch's "
                "inductor, or Megatron)"
            )
        return None
    if torch.cuda.is_available():
        return None
    return (
        "no CUDA device (the Triton kernels run on CPU only in Triton's interpreter, for "
        "tests: TRITON_INTERPRET=1 in the environment before triton is imported)"
    )


def _ops():
    from megatron_mhc.fusions.triton import ops

    return ops


_frontend.FusedOps("triton", _ops, _unavailable_reason).export(globals())
