"""Triton kernels of the collapse u = sum_i h_i x_i, forward and backward; in head mode (the
learned contract) they compute h = sigmoid(scale * mn + base) + eps themselves, and the backward
continues into the gate backward.
"""

import triton
import triton.language as tl


@triton.jit
def collapse_fwd_kernel(
    x_ptr,
    h_ptr,
    out_ptr,
    mn_ptr,
    base_ptr,
    scale_ptr,
    w_ptr,
    T,
    C,
    n,
    eps,
    HEAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    tc_ok = t_ok[:, None] & (c < C)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HEAD:
        s = tl.load(scale_ptr).to(tl.float32)
    for i in range(n):
        if HEAD:
            b = tl.load(base_ptr + i).to(tl.float32)
            mi = tl.load(mn_ptr + t64 * n + i, mask=t_ok, other=0.0)
            h = tl.sigmoid(s * mi + b) + eps
            tl.store(w_ptr + t64 * n + i, h, mask=t_ok & (pid_c == 0))
        else:
            h = tl.load(h_ptr + t64 * n + i, mask=t_ok, other=0.0).to(tl.float32)
        xi = tl.load(x_ptr + t64[:, None] * n * C + i * C + c[None, :], mask=tc_ok, other=0.0).to(
            tl.float32
        )
        acc += h[:, None] * xi
    tl.store(out_ptr + t64[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=tc_ok)


@triton.jit
def collapse_bwd_kernel(
    x_ptr,
    h_ptr,
    du_ptr,
    dx_ptr,
    dh_ptr,
    mn_ptr,
    r_ptr,
    base_ptr,
    scale_ptr,
    g_ptr,
    coef_ptr,
    dbase_ptr,
    dscale_ptr,
    T,
    C,
    n,
    K,
    HEAD: tl.constexpr,
    WRITE_DX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NP: tl.constexpr,
):
    """dx_i = h_i du (when WRITE_DX), dh_i = <x_i, du> in one pass over x and du.

    HEAD: dx is left to proj_rms_bwd_kernel (which adds w_i du while it reads x anyway); the
    gate backward follows the reduction: g = r * scale * dz [T, n], coef [T], partial
    dbase [n] and dscale [1] per program.
    """
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    idx = tl.arange(0, NP)
    dh = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        tc_ok = t_ok[:, None] & (c < C)[None, :]
        du = tl.load(du_ptr + t64[:, None] * C + c[None, :], mask=tc_ok, other=0.0).to(tl.float32)
        for i in range(n):
            x_off = t64[:, None] * n * C + i * C + c[None, :]
            xi = tl.load(x_ptr + x_off, mask=tc_ok, other=0.0).to(tl.float32)
            if WRITE_DX:
                h = tl.load(h_ptr + t64 * n + i, mask=t_ok, other=0.0).to(tl.float32)
                tl.store(dx_ptr + x_off, (h[:, None] * du).to(dx_ptr.dtype.element_ty), mask=tc_ok)
            part = tl.sum(xi * du, axis=1)
            dh += tl.where(idx[None, :] == i, part[:, None], 0.0)
    ti_ok = t_ok[:, None] & (idx < n)[None, :]
    if HEAD:
        s = tl.load(scale_ptr).to(tl.float32)
        b = tl.load(base_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
        mi = tl.load(mn_ptr + t64[:, None] * n + idx[None, :], mask=ti_ok, other=0.0)
        r = tl.load(r_ptr + t64, mask=t_ok, other=0.0)
        sig = tl.sigmoid(s * mi + b[None, :])
        dz = tl.where(ti_ok, dh * sig * (1.0 - sig), 0.0)
        dmn = s * dz
        tl.store(g_ptr + t64[:, None] * n + idx[None, :], r[:, None] * dmn, mask=ti_ok)
        tl.store(coef_ptr + t64, -(r * r / K) * tl.sum(dmn * mi, axis=1), mask=t_ok)
        tl.store(dbase_ptr + pid.to(tl.int64) * n + idx, tl.sum(dz, axis=0), mask=idx < n)
        tl.store(dscale_ptr + pid, tl.sum(tl.sum(dz * mi, axis=1), axis=0))
    else:
        tl.store(
            dh_ptr + t64[:, None] * n + idx[None, :], dh.to(dh_ptr.dtype.element_ty), mask=ti_ok
        )
