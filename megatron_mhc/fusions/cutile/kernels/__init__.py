"""cuTile kernels of the mHC mappings, collapse, update and head, one file per op family (see
docs/kernels.md, "cuTile backend"): `projection.py`, `gates.py` (gates and Sinkhorn),
`collapse.py`, `update.py`, `head.py`, over the helpers of `tiles.py`. `KERNELS` names them for
the launchers (`megatron_mhc.fusions.cutile.ops`).

Imported lazily, at the first op call (or by the bytecode-export tests), by the launchers:
importing this package imports `cuda.tile`.

Conventions of every kernel:
- Token-major contiguous arrays: x / dx / dout [T, n, C] (the projection kernels read the same
  memory as [T, K], K = n*C stream-major), y / u / du / dy [T, C], gates [T, n], comb [T, n, n]
  (row j = input stream, column k = output stream). The mapping rows M = n*n + 2n of fn, mn and
  g are ordered [pre (n) | post (n) | res (n*n, row-major)]; the gates kernels take the three
  parts as separate (strided view) arrays [T, n], [T, n], [T, n, n].
- Tiles are loaded by tile index (`ct.load(array, index, shape)`), the stream axis as one tile
  of NP = n rounded up to a power of two (>= 2) lanes, the M rows as one tile of MP = M rounded
  up to a power of two. Partial tiles (ragged T and C, the padded stream lanes and rows) load
  as 0 (`PaddingMode.ZERO`) and their out-of-bounds lanes are dropped at the store, so no
  explicit masks are needed, except where a padded lane would not stay 0 by itself (the
  softmax and the Sinkhorn denominators).
- Every tile is converted to fp32 right after its load and cast to the destination array's
  dtype at the store.
- Tile shapes are compile-time constants (BT tokens x NP streams x BC channels, BK / BL of K),
  powers of two.
- The projections' matrix products are `ct.mma` on fp32 operands, which cuTile computes in
  fp32 on CUDA cores: its f32 and tf32 input types are distinct, and the tensor-core TF32 path
  is taken only for operands cast to `ct.tfloat32` (tileiras 13.4 SASS of these kernels:
  FMUL/FADD, no HMMA; the same kernels with tfloat32 operands compile to HMMA). TF32's 10-bit
  mantissa would miss the 1e-5 contract. Reductions over tokens (dfn, dbase, dscale) are
  written as per-program partial sums that torch adds up (deterministic).
"""

from megatron_mhc.fusions.cutile.kernels.collapse import collapse_bwd_kernel, collapse_fwd_kernel
from megatron_mhc.fusions.cutile.kernels.gates import mhc_gates_bwd_kernel, mhc_gates_fwd_kernel
from megatron_mhc.fusions.cutile.kernels.head import head_fwd_kernel, head_gate_bwd_kernel
from megatron_mhc.fusions.cutile.kernels.projection import proj_rms_bwd_kernel, proj_rms_fwd_kernel
from megatron_mhc.fusions.cutile.kernels.update import update_bwd_kernel, update_fwd_kernel

KERNELS = {
    "proj_rms_fwd": proj_rms_fwd_kernel,
    "proj_rms_bwd": proj_rms_bwd_kernel,
    "mhc_gates_fwd": mhc_gates_fwd_kernel,
    "mhc_gates_bwd": mhc_gates_bwd_kernel,
    "collapse_fwd": collapse_fwd_kernel,
    "collapse_bwd": collapse_bwd_kernel,
    "update_fwd": update_fwd_kernel,
    "update_bwd": update_bwd_kernel,
    "head_fwd": head_fwd_kernel,
    "head_gate_bwd": head_gate_bwd_kernel,
}
