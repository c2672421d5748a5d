"""Triton kernels of the mHC ops, one file per op family (see docs/kernels.md for the design):
`projection.py` (projection + RMS), `gates.py` (gates and Sinkhorn), `collapse.py` (collapse,
and the head's weights), `update.py` (update). This package exports them for the launchers
(`megatron_mhc.fusions.triton.ops`).

Imported lazily, at the first op call, by the launchers: whether Triton compiles the kernels for
the GPU or runs them in its CPU interpreter is decided when they (and Triton's own library
functions, at `import triton`) are defined: TRITON_INTERPRET=1 must be in the environment before
the process imports triton.

Conventions of every kernel:
- Token-major contiguous buffers: x [T, n, C] (= [T, K] with K = n*C, flattened stream-major),
  y / u [T, C], gates [T, n], comb [T, n, n] (row j = input stream, column k = output stream),
  the projection output mn [T, M] with M = n*n + 2n ordered [pre | post | res (row-major)].
- Every value is converted to fp32 right after its load (bf16 included: the interpreter computes
  bf16 as integers) and cast to the destination's element type at the store.
- Token offsets are int64 (T * n * C may pass 2**31); padded lanes (t >= T, c >= C, stream
  index >= n) are masked at the loads (read as 0) and at the stores.
- NP is n rounded up to a power of two (>= 2): the n x n Sinkhorn matrices live in registers
  as [BLOCK_T, NP, NP] tiles, the padded rows and columns kept at exactly 0.
"""

from megatron_mhc.fusions.triton.kernels.collapse import collapse_bwd_kernel, collapse_fwd_kernel
from megatron_mhc.fusions.triton.kernels.gates import mhc_gates_bwd_kernel, mhc_gates_fwd_kernel
from megatron_mhc.fusions.triton.kernels.projection import proj_rms_bwd_kernel, proj_rms_fwd_kernel
from megatron_mhc.fusions.triton.kernels.update import update_bwd_kernel, update_fwd_kernel

__all__ = [
    "collapse_bwd_kernel",
    "collapse_fwd_kernel",
    "mhc_gates_bwd_kernel",
    "mhc_gates_fwd_kernel",
    "proj_rms_bwd_kernel",
    "proj_rms_fwd_kernel",
    "update_bwd_kernel",
    "update_fwd_kernel",
]
