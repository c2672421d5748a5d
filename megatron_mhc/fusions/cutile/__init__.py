"""cuTile backend of the mHC ops: the functions of `megatron_mhc.fusions.reference`, same names,
signatures, outputs, dtypes and broadcasting.

Ported to cuTile (forward and backward kernels): `mhc_mappings` and `mhc_mappings_collapse`
(the projection, the gates and the Sinkhorn projection), `mhc_collapse` and `mhc_update` (one
pass over the n streams each way) and `mhc_head`, all through the autograd Functions of the
shared front end (`fused_frontend.FusedOps`) over this backend's launchers. Not ported (the front
end's, as for Triton): `hc_mappings` (the `hc` ablation: the reference wrapped to save only its
inputs), `sinkhorn` and `hc_static_mappings` (the reference). Float64 inputs (gradcheck) and
empty tensors go to the reference. Design: docs/kernels.md ("cuTile backend").

cuTile (PyPI `cuda-tile`, import `cuda.tile`) has no CPU mode. Importing this package imports
neither `cuda.tile` nor Triton: the kernels are defined at the first op call.
"""

import torch

from megatron_mhc.fusions import fused_frontend as _frontend

# Compute capabilities (major) whose GPUs the cuTile compiler (tileiras 13.2) supports:
# Ampere / Ada (sm_80, sm_86, sm_87, sm_89) and Blackwell (sm_100, sm_103, sm_110, sm_120, ...).
# Hopper (sm_90) is not supported by it.
SUPPORTED_MAJORS = (8, 10, 11, 12)


def _arch_reason(capability) -> "str | None":
    """None when the cuTile compiler supports a GPU of this (major, minor), else why not."""
    major, minor = capability
    if major == 9:
        return f"cuTile's compiler does not support Hopper (sm_{major}{minor})"
    if major not in SUPPORTED_MAJORS:
        return (
            f"cuTile's compiler does not support sm_{major}{minor} (it supports Ampere/Ada "
            "sm_80/86/89 and Blackwell sm_100/120)"
        )
    return None


def _unavailable_reason() -> "str | None":
    """None when the kernels can run here, else why not."""
    try:
        import cuda.tile  # noqa: F401
    except Exception as err:  # ImportError, or a broken install
        return f"cuda.tile cannot be imported ({err}): pip install cuda-tile"
    if not torch.cuda.is_available():
        return "no CUDA device (cuTile has no CPU mode)"
    return _arch_reason(torch.cuda.get_device_capability())


def _ops():
    from megatron_mhc.fusions.cutile import ops

    return ops


_frontend.FusedOps("cutile", _ops, _unavailable_reason).export(globals())
