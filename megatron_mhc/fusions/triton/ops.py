"""Kernel launchers and tile sizes of the Triton backend (imported at the first op call).

The launchers have the signatures `fused_functions`' autograd Functions call (the cuTile
backend's launchers have the same): 2-D or 3-D contiguous buffers in, new buffers out.
"""

import torch
import triton

from megatron_mhc.fusions import launcher_common as common
from megatron_mhc.fusions.launcher_common import clamp_pow2, stream_tile
from megatron_mhc.fusions.triton import kernels

# Kernels defined under TRITON_INTERPRET=1 run on CPU in Triton's interpreter.
INTERPRETED = type(kernels.update_fwd_kernel).__name__ == "InterpretedFunction"

# fp32 matmuls inside the kernels: "ieee" matches the fp32 reference (tf32 would not reach the
# 1e-5 contract); "tf32x3" is the faster near-fp32 alternative on tensor cores.
DOT_PRECISION = "ieee"

# Tile sizes: "gpu" (many programs, register-sized tiles) or "interpreter" (few programs, large
# tiles: each interpreted op costs ~the same whatever its size). None: by where kernels run.
# Tests set "gpu" to check the GPU tile shapes under the interpreter.
BLOCK_MODE = None


def _gpu_tiles() -> bool:
    mode = BLOCK_MODE or ("interpreter" if INTERPRETED else "gpu")
    return mode == "gpu"


def check_device(*tensors: torch.Tensor) -> None:
    if not INTERPRETED:
        common.require_cuda(
            "triton",
            "on CPU run the process with TRITON_INTERPRET=1 in its environment (Triton's "
            "interpreter, for tests) or use the 'torch' backend",
            tensors,
        )


# ----------------------------------------------------------------------------------------------
# Launchers (2-D contiguous buffers in, new buffers out).
# ----------------------------------------------------------------------------------------------
def proj_rms_fwd(x2: torch.Tensor, fn: torch.Tensor, norm_eps: float):
    """mn = r * (x2 @ fn^T) [T, M] fp32 and r = rsqrt(mean(x2^2) + norm_eps) [T] fp32."""
    T, K = x2.shape
    M = fn.shape[0]
    mn, r = common.proj_rms_fwd_outputs(x2, M)
    block_m = clamp_pow2(M, 16, 128)
    if _gpu_tiles():
        # The largest tiles that compile without register spills for sm_90 and sm_100
        # (tests/unit/test_triton_compile.py): the fp32 "ieee" dot accumulates in registers.
        block_t, block_k = 32, (64 if block_m <= 32 else 16)
        warps = 4 if block_m <= 16 else 8
    else:
        block_t, block_k, warps = clamp_pow2(T, 16, 64), clamp_pow2(K, 16, 256), 4
    kernels.proj_rms_fwd_kernel[(triton.cdiv(T, block_t),)](
        x2,
        fn,
        mn,
        r,
        T,
        K,
        M,
        norm_eps,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        BLOCK_M=block_m,
        DOT_PRECISION=DOT_PRECISION,
        num_warps=warps,
    )
    return mn, r


def proj_rms_bwd(x2, fn, g, coef, need_dx, need_dfn, dx_dtype, collapse=None, residual=None):
    """dx = g @ fn + coef * x2 [T, K] in dx_dtype (or None) and dfn = g^T x2 [M, K] fp32 (or
    None), in one pass over x2. collapse=(w [T, n], du [T, C], C) adds w[t, k // C] *
    du[t, k % C] to dx (the gradient of u = sum_i w_i x_i); residual [T, K] adds a gradient of x
    computed elsewhere."""
    T, K = x2.shape
    M = fn.shape[0]
    dx = torch.empty(T, K, device=x2.device, dtype=dx_dtype) if need_dx else None
    block_m = clamp_pow2(M, 16, 128)
    if _gpu_tiles():
        # Without register spills for sm_90 and sm_100 (tests/unit/test_triton_compile.py):
        # fn's K slice and dfn's accumulator stay in registers for the whole token walk.
        block_t, block_k, warps = 32, {16: 64, 32: 32}.get(block_m, 16), 8
        k_blocks = triton.cdiv(K, block_k)
        splits = max(
            1, min(triton.cdiv(T, block_t), triton.cdiv(2 * common.num_sms(x2.device), k_blocks))
        )
    else:
        block_t, block_k, warps = clamp_pow2(T, 16, 64), clamp_pow2(K, 16, 256), 4
        k_blocks, splits = triton.cdiv(K, block_k), 1
    tokens_per_split = triton.cdiv(triton.cdiv(T, splits), block_t) * block_t
    splits = triton.cdiv(T, tokens_per_split)
    dfn = torch.empty(splits, M, K, device=x2.device, dtype=torch.float32) if need_dfn else None
    unused = g  # stands in for the pointers of the terms that are off (never read or written)
    w, du, C = collapse if collapse is not None else (unused, unused, K)
    kernels.proj_rms_bwd_kernel[(k_blocks, splits)](
        x2,
        fn,
        g,
        coef,
        dx if need_dx else unused,
        dfn if need_dfn else unused,
        w,
        du,
        residual if residual is not None else unused,
        T,
        K,
        M,
        C,
        w.shape[1] if collapse is not None else 1,
        tokens_per_split,
        COLLAPSE=collapse is not None,
        RESIDUAL=residual is not None,
        WRITE_DX=need_dx,
        WRITE_DFN=need_dfn,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        BLOCK_M=block_m,
        DOT_PRECISION=DOT_PRECISION,
        num_warps=warps,
    )
    if need_dfn:
        dfn = dfn[0] if splits == 1 else dfn.sum(dim=0)
    return dx, dfn


def _gates_block_t(T: int, np_: int) -> int:
    if _gpu_tiles():
        return 32 if np_ <= 4 else 16
    return clamp_pow2(T, 2, 64)


def mhc_gates_fwd(mn, base, scale, n, iters, eps):
    T = mn.shape[0]
    h_pre, h_post, comb = common.gates_fwd_outputs(mn, n)
    np_ = stream_tile(n)
    block_t = _gates_block_t(T, np_)
    kernels.mhc_gates_fwd_kernel[(triton.cdiv(T, block_t),)](
        mn,
        base,
        scale,
        h_pre,
        h_post,
        comb,
        T,
        n,
        iters,
        eps,
        BLOCK_T=block_t,
        NP=np_,
        num_warps=4,
    )
    return h_pre, h_post, comb


def mhc_gates_bwd(mn, r, base, scale, dh_pre, dh_post, dcomb, n, K, iters, eps):
    """g = r * dmn [T, M], coef [T], dbase [M], dscale [3] (all fp32)."""
    T, M = mn.shape
    np_ = stream_tile(n)
    block_t = _gates_block_t(T, np_)
    programs = triton.cdiv(T, block_t)
    g, coef, dbase, dscale = common.gates_bwd_outputs(mn, programs)
    kernels.mhc_gates_bwd_kernel[(programs,)](
        mn,
        r,
        base,
        scale,
        dh_pre,
        dh_post,
        dcomb,
        g,
        coef,
        dbase,
        dscale,
        T,
        n,
        K,
        iters,
        eps,
        BLOCK_T=block_t,
        NP=np_,
        num_warps=4,
    )
    return common.summed(g, coef, dbase, dscale)


def _collapse_blocks(T: int, C: int, backward: bool = False):
    if _gpu_tiles():
        # The backward keeps n dh accumulators per token as well: a narrower C block keeps it
        # free of register spills for sm_90 and sm_100 (tests/unit/test_triton_compile.py).
        return 8, (128 if backward else 256)
    return clamp_pow2(T, 2, 32), clamp_pow2(C, 16, 128)


def collapse_fwd(x3, h, out_dtype):
    """u = sum_i h_i x_i [T, C]."""
    return _collapse_fwd(x3, h, out_dtype)[0]


def head_fwd(x3, fn, base, scale, eps, norm_eps):
    """u [T, C] in x3.dtype, and the fp32 mn [T, n], r [T], w [T, n] saved for backward: the
    projection (M = n), then the collapse kernel in head mode (w computed from mn and stored)."""
    T, n, C = x3.shape
    mn, r = proj_rms_fwd(x3.view(T, n * C), fn, norm_eps)
    out, w = _collapse_fwd(x3, None, x3.dtype, head=(mn, base, scale, eps))
    return out, mn, r, w


def _collapse_fwd(x3, h, out_dtype, head=None):
    """(u, w): u = sum_i h_i x_i [T, C]; head=(mn, base, scale, eps): h computed from mn and
    returned as w."""
    T, n, C = x3.shape
    out = torch.empty(T, C, device=x3.device, dtype=out_dtype)
    block_t, block_c = _collapse_blocks(T, C)
    if head is None:
        mn = base = scale = w = h
        eps = 0.0
    else:
        mn, base, scale, eps = head
        h = w = torch.empty(T, n, device=x3.device, dtype=torch.float32)
    kernels.collapse_fwd_kernel[(triton.cdiv(T, block_t), triton.cdiv(C, block_c))](
        x3,
        h,
        out,
        mn,
        base,
        scale,
        w,
        T,
        C,
        n,
        eps,
        HEAD=head is not None,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return out, (w if head is not None else None)


def collapse_bwd(x3, h, du, need_dx, dx_dtype, dh_dtype):
    """dx_i = h_i du [T, n, C] (or None), dh_i = <x_i, du> [T, n]."""
    T, n, C = x3.shape
    block_t, block_c = _collapse_blocks(T, C, backward=True)
    dx, dh = common.collapse_bwd_outputs(x3, need_dx, dx_dtype, dh_dtype)
    kernels.collapse_bwd_kernel[(triton.cdiv(T, block_t),)](
        x3,
        h,
        du,
        dx if need_dx else dh,
        dh,
        h,
        h,
        h,
        h,
        h,
        h,
        h,
        h,  # head-only pointers, unused
        T,
        C,
        n,
        n * C,
        HEAD=False,
        WRITE_DX=need_dx,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        NP=stream_tile(n),
        num_warps=4,
    )
    return dx, dh


def head_gate_bwd(x3, du, mn, r, base, scale):
    """The head's dw = <x_i, du> followed by the gate backward: g [T, n], coef [T], dbase [n],
    dscale [1] (fp32)."""
    T, n, C = x3.shape
    block_t, block_c = _collapse_blocks(T, C, backward=True)
    programs = triton.cdiv(T, block_t)
    g, coef, dbase, dscale = common.head_gate_bwd_outputs(x3, programs)
    kernels.collapse_bwd_kernel[(programs,)](
        x3,
        g,
        du,
        g,
        g,
        mn,
        r,
        base,
        scale,
        g,
        coef,
        dbase,
        dscale,
        T,
        C,
        n,
        n * C,
        HEAD=True,
        WRITE_DX=False,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        NP=stream_tile(n),
        num_warps=4,
    )
    return common.summed(g, coef, dbase, dscale)


def update_fwd(x3, y2, h_post, comb):
    T, n, C = x3.shape
    out = torch.empty(T, n, C, device=x3.device, dtype=x3.dtype)
    np_ = stream_tile(n)
    if _gpu_tiles():
        block_t, block_c = max(2, 16 // np_), 256
    else:
        block_t, block_c = clamp_pow2(T, 2, 32), clamp_pow2(C, 16, 128)
    kernels.update_fwd_kernel[(triton.cdiv(T, block_t), triton.cdiv(C, block_c))](
        x3,
        y2,
        h_post,
        comb,
        out,
        T,
        C,
        n,
        BLOCK_T=block_t,
        NP=np_,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return out


def update_bwd(x3, y2, h_post, comb, dout, dtypes):
    T, n, C = x3.shape
    dx, dy, dh, dcomb = common.update_bwd_outputs(x3, dtypes)
    np_ = stream_tile(n)
    warps = 4
    if _gpu_tiles():
        # Without register spills for sm_90 and sm_100 (tests/unit/test_triton_compile.py).
        block_t, block_c = max(2, 8 // np_), (64 if np_ <= 2 else 128)
        warps = 8 if np_ >= 8 else 4
    else:
        block_t, block_c = clamp_pow2(T, 2, 32), clamp_pow2(C, 16, 128)
    kernels.update_bwd_kernel[(triton.cdiv(T, block_t),)](
        x3,
        y2,
        h_post,
        comb,
        dout,
        dx,
        dy,
        dh,
        dcomb,
        T,
        C,
        n,
        BLOCK_T=block_t,
        NP=np_,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return dx, dy, dh, dcomb
