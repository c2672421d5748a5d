"""Triton kernels of the update out_k = h_post_k y + sum_j comb[j, k] x_j, forward and backward."""

import triton
import triton.language as tl


@triton.jit
def update_fwd_kernel(
    x_ptr,
    y_ptr,
    hpost_ptr,
    comb_ptr,
    out_ptr,
    T,
    C,
    n,
    BLOCK_T: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    kk = tl.arange(0, NP)
    k_ok = kk < n
    tc_ok = t_ok[:, None] & c_ok[None, :]
    tk_ok = t_ok[:, None] & k_ok[None, :]
    y = tl.load(y_ptr + t64[:, None] * C + c[None, :], mask=tc_ok, other=0.0).to(tl.float32)
    hp = tl.load(hpost_ptr + t64[:, None] * n + kk[None, :], mask=tk_ok, other=0.0).to(tl.float32)
    acc = hp[:, :, None] * y[:, None, :]
    for j in range(n):
        xj = tl.load(x_ptr + t64[:, None] * n * C + j * C + c[None, :], mask=tc_ok, other=0.0).to(
            tl.float32
        )
        cj = tl.load(
            comb_ptr + t64[:, None] * n * n + j * n + kk[None, :], mask=tk_ok, other=0.0
        ).to(tl.float32)
        acc += cj[:, :, None] * xj[:, None, :]
    out_off = t64[:, None, None] * n * C + kk[None, :, None] * C + c[None, None, :]
    tl.store(
        out_ptr + out_off,
        acc.to(out_ptr.dtype.element_ty),
        mask=tk_ok[:, :, None] & c_ok[None, None, :],
    )


@triton.jit
def update_bwd_kernel(
    x_ptr,
    y_ptr,
    hpost_ptr,
    comb_ptr,
    dout_ptr,
    dx_ptr,
    dy_ptr,
    dhpost_ptr,
    dcomb_ptr,
    T,
    C,
    n,
    BLOCK_T: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One pass over x, y and dout: dx_j = sum_k comb[j, k] dout_k, dy = sum_k h_post_k dout_k,
    dh_post_k = <dout_k, y>, dcomb[j, k] = <x_j, dout_k>."""
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    jj = tl.arange(0, NP)
    j_ok = jj < n
    tj_ok = t_ok[:, None] & j_ok[None, :]
    dh = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    dcomb = tl.zeros((BLOCK_T, NP, NP), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        tc_ok = t_ok[:, None] & c_ok[None, :]
        tjc_ok = tj_ok[:, :, None] & c_ok[None, None, :]
        x_off = t64[:, None, None] * n * C + jj[None, :, None] * C + c[None, None, :]
        x3 = tl.load(x_ptr + x_off, mask=tjc_ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + t64[:, None] * C + c[None, :], mask=tc_ok, other=0.0).to(tl.float32)
        dx3 = tl.zeros((BLOCK_T, NP, BLOCK_C), dtype=tl.float32)
        dy = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for k in range(n):
            dk = tl.load(
                dout_ptr + t64[:, None] * n * C + k * C + c[None, :], mask=tc_ok, other=0.0
            ).to(tl.float32)
            hk = tl.load(hpost_ptr + t64 * n + k, mask=t_ok, other=0.0).to(tl.float32)
            ck = tl.load(
                comb_ptr + t64[:, None] * n * n + jj[None, :] * n + k, mask=tj_ok, other=0.0
            ).to(tl.float32)  # comb[:, j, k] over j
            dy += hk[:, None] * dk
            dx3 += ck[:, :, None] * dk[:, None, :]
            dh += tl.where(jj[None, :] == k, tl.sum(dk * y, axis=1)[:, None], 0.0)
            dc = tl.sum(x3 * dk[:, None, :], axis=2)  # <x_j, dout_k> over j
            dcomb += tl.where(jj[None, None, :] == k, dc[:, :, None], 0.0)
        tl.store(dx_ptr + x_off, dx3.to(dx_ptr.dtype.element_ty), mask=tjc_ok)
        tl.store(dy_ptr + t64[:, None] * C + c[None, :], dy.to(dy_ptr.dtype.element_ty), mask=tc_ok)
    tl.store(
        dhpost_ptr + t64[:, None] * n + jj[None, :], dh.to(dhpost_ptr.dtype.element_ty), mask=tj_ok
    )
    comb_off = jj[:, None] * n + jj[None, :]
    tl.store(
        dcomb_ptr + t64[:, None, None] * n * n + comb_off[None, :, :],
        dcomb.to(dcomb_ptr.dtype.element_ty),
        mask=t_ok[:, None, None] & (j_ok[:, None] & j_ok[None, :])[None, :, :],
    )
