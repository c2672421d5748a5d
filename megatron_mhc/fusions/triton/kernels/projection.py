"""Triton kernels of the projection + RMS, forward and backward:
mn = rsqrt(mean(x^2) + norm_eps) * (x @ fn^T), one pass over x (the mappings' projection, and the
head's with M = n).
"""

import triton
import triton.language as tl


@triton.jit
def proj_rms_fwd_kernel(
    x_ptr,
    fn_ptr,
    mn_ptr,
    r_ptr,
    T,
    K,
    M,
    norm_eps,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xt = tl.load(
            x_ptr + t64[:, None] * K + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0
        ).to(tl.float32)
        # fn^T tile [BLOCK_K, BLOCK_M]
        fnt = tl.load(
            fn_ptr + m[None, :] * K + k[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0
        ).to(tl.float32)
        acc = tl.dot(xt, fnt, acc, input_precision=DOT_PRECISION)
        sumsq += tl.sum(xt * xt, axis=1)
    r = 1.0 / tl.sqrt(sumsq / K + norm_eps)
    mn = acc * r[:, None]
    tl.store(mn_ptr + t64[:, None] * M + m[None, :], mn, mask=t_ok[:, None] & m_ok[None, :])
    tl.store(r_ptr + t64, r, mask=t_ok)


@triton.jit
def proj_rms_bwd_kernel(
    x_ptr,
    fn_ptr,
    g_ptr,
    coef_ptr,
    dx_ptr,
    dfn_ptr,
    w_ptr,
    du_ptr,
    res_ptr,
    T,
    K,
    M,
    C,
    n,
    tokens_per_split,
    COLLAPSE: tl.constexpr,
    RESIDUAL: tl.constexpr,
    WRITE_DX: tl.constexpr,
    WRITE_DFN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dx = g @ fn + coef * x (+ w[stream] * du, COLLAPSE) (+ res, RESIDUAL), dfn[split] = g^T x.

    g = r * dmn [T, M] and coef = -(r^2 / K) <dmn, mn> [T] come from the gates backward. The
    collapse term is the gradient of u = sum_i w_i x_i (the head's, or the HC module's collapse
    with w = h_pre) and res a gradient of x computed elsewhere (the update's): both are added
    while x is read anyway, so dx is written once. Grid (K blocks, token splits): each program
    owns a K slice of fn and dfn and walks the tokens of its split, so x is read once.
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    fn_tile = tl.load(
        fn_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
    ).to(tl.float32)
    if COLLAPSE:
        stream = k // C
        col = k - stream * C
    dfn = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    # tokens_per_split is a multiple of BLOCK_T: the splits tile [0, T) without overlap.
    t_start = pid_s * tokens_per_split
    for t0 in range(0, tokens_per_split, BLOCK_T):
        t = t_start + t0 + tl.arange(0, BLOCK_T)
        t_ok = t < T
        t64 = t.to(tl.int64)
        tk_ok = t_ok[:, None] & k_ok[None, :]
        xt = tl.load(x_ptr + t64[:, None] * K + k[None, :], mask=tk_ok, other=0.0).to(tl.float32)
        g = tl.load(
            g_ptr + t64[:, None] * M + m[None, :], mask=t_ok[:, None] & m_ok[None, :], other=0.0
        )
        if WRITE_DX:
            coef = tl.load(coef_ptr + t64, mask=t_ok, other=0.0)
            dx = tl.dot(g, fn_tile, input_precision=DOT_PRECISION) + coef[:, None] * xt
            if COLLAPSE:
                w = tl.load(w_ptr + t64[:, None] * n + stream[None, :], mask=tk_ok, other=0.0)
                du = tl.load(du_ptr + t64[:, None] * C + col[None, :], mask=tk_ok, other=0.0).to(
                    tl.float32
                )
                dx += w * du
            if RESIDUAL:
                dx += tl.load(res_ptr + t64[:, None] * K + k[None, :], mask=tk_ok, other=0.0).to(
                    tl.float32
                )
            tl.store(
                dx_ptr + t64[:, None] * K + k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tk_ok
            )
        if WRITE_DFN:
            dfn = tl.dot(tl.trans(g), xt, dfn, input_precision=DOT_PRECISION)
    if WRITE_DFN:
        tl.store(
            dfn_ptr + pid_s.to(tl.int64) * M * K + m[:, None] * K + k[None, :],
            dfn,
            mask=m_ok[:, None] & k_ok[None, :],
        )
