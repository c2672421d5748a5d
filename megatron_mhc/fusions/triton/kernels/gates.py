"""Triton kernels of the gates and the Sinkhorn projection, forward and backward, per token on
[BLOCK_T, NP, NP] register tiles (axis 1 = row index j, axis 2 = column index k):
h_pre = sigmoid(.) + eps, h_post = 2 sigmoid(.), comb = Sinkhorn(softmax(.)).
"""

import triton
import triton.language as tl

# Finite "minus infinity" for the masked softmax lanes (a fully masked row stays NaN-free).
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _col_norm(a, ok, eps):
    """a / (column sums + eps); also returns the denominators [BLOCK_T, NP] (1 on padding)."""
    s = tl.sum(a, axis=1) + eps
    s = tl.where(ok[None, :], s, 1.0)
    return a / s[:, None, :], s


@triton.jit
def _row_norm(a, ok, eps):
    """a / (row sums + eps); also returns the denominators [BLOCK_T, NP] (1 on padding)."""
    s = tl.sum(a, axis=2) + eps
    s = tl.where(ok[None, :], s, 1.0)
    return a / s[:, :, None], s


@triton.jit
def _softmax_last(z, valid, ok):
    """Softmax over the last axis of the valid n x n block; padding stays 0."""
    z = tl.where(valid[None, :, :], z, _NEG_BIG)
    mx = tl.max(z, axis=2)
    e = tl.exp(z - mx[:, :, None])
    e = tl.where(valid[None, :, :], e, 0.0)
    den = tl.sum(e, axis=2)
    den = tl.where(ok[None, :], den, 1.0)
    return e / den[:, :, None]


@triton.jit
def _load_gates(mn_ptr, base_ptr, scale_ptr, t64, t_ok, i, i_ok, n, M):
    """The pre / post / res parts of mn and base, and the three gating factors."""
    s0 = tl.load(scale_ptr).to(tl.float32)
    s1 = tl.load(scale_ptr + 1).to(tl.float32)
    s2 = tl.load(scale_ptr + 2).to(tl.float32)
    ti_ok = t_ok[:, None] & i_ok[None, :]
    pre = tl.load(mn_ptr + t64[:, None] * M + i[None, :], mask=ti_ok, other=0.0)
    post = tl.load(mn_ptr + t64[:, None] * M + n + i[None, :], mask=ti_ok, other=0.0)
    b_pre = tl.load(base_ptr + i, mask=i_ok, other=0.0).to(tl.float32)
    b_post = tl.load(base_ptr + n + i, mask=i_ok, other=0.0).to(tl.float32)
    valid = i_ok[:, None] & i_ok[None, :]
    res_off = 2 * n + i[:, None] * n + i[None, :]
    res = tl.load(
        mn_ptr + t64[:, None, None] * M + res_off[None, :, :],
        mask=t_ok[:, None, None] & valid[None, :, :],
        other=0.0,
    )
    b_res = tl.load(base_ptr + res_off, mask=valid, other=0.0).to(tl.float32)
    return s0, s1, s2, pre, post, res, b_pre, b_post, b_res, valid


@triton.jit
def mhc_gates_fwd_kernel(
    mn_ptr,
    base_ptr,
    scale_ptr,
    hpre_ptr,
    hpost_ptr,
    comb_ptr,
    T,
    n,
    iters,
    eps,
    BLOCK_T: tl.constexpr,
    NP: tl.constexpr,
):
    """Per token: h_pre = sigmoid(.) + eps, h_post = 2 sigmoid(.), comb = Sinkhorn(softmax(.))."""
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    i = tl.arange(0, NP)
    i_ok = i < n
    M = n * n + 2 * n
    s0, s1, s2, pre, post, res, b_pre, b_post, b_res, valid = _load_gates(
        mn_ptr, base_ptr, scale_ptr, t64, t_ok, i, i_ok, n, M
    )
    ti_ok = t_ok[:, None] & i_ok[None, :]
    h_pre = tl.sigmoid(s0 * pre + b_pre[None, :]) + eps
    h_post = 2.0 * tl.sigmoid(s1 * post + b_post[None, :])
    tl.store(hpre_ptr + t64[:, None] * n + i[None, :], h_pre, mask=ti_ok)
    tl.store(hpost_ptr + t64[:, None] * n + i[None, :], h_post, mask=ti_ok)

    p = _softmax_last(s2 * res + b_res[None, :, :], valid, i_ok)
    a = tl.where(valid[None, :, :], p + eps, 0.0)
    a, _s = _col_norm(a, i_ok, eps)
    for _it in range(1, iters):
        a, _s = _row_norm(a, i_ok, eps)
        a, _s = _col_norm(a, i_ok, eps)
    comb_off = i[:, None] * n + i[None, :]
    tl.store(
        comb_ptr + t64[:, None, None] * (n * n) + comb_off[None, :, :],
        a,
        mask=t_ok[:, None, None] & valid[None, :, :],
    )


@triton.jit
def mhc_gates_bwd_kernel(
    mn_ptr,
    r_ptr,
    base_ptr,
    scale_ptr,
    dhpre_ptr,
    dhpost_ptr,
    dcomb_ptr,
    g_ptr,
    coef_ptr,
    dbase_ptr,
    dscale_ptr,
    T,
    n,
    K,
    iters,
    eps,
    BLOCK_T: tl.constexpr,
    NP: tl.constexpr,
):
    """Backward of the gates and of the Sinkhorn projection, per token, all in registers.

    Nothing was stored per Sinkhorn iteration: backpropagating through iteration i (row then
    column normalisation) recomputes its input from the softmax by rerunning iterations
    1..i-1 (O(iters^2 / 2) cheap n x n steps, no memory traffic). Writes g = r * dmn [T, M],
    coef = -(r^2 / K) <dmn, mn> [T] and this program's partial sums of dbase [M] and dscale [3].
    """
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    i = tl.arange(0, NP)
    i_ok = i < n
    M = n * n + 2 * n
    s0, s1, s2, pre, post, res, b_pre, b_post, b_res, valid = _load_gates(
        mn_ptr, base_ptr, scale_ptr, t64, t_ok, i, i_ok, n, M
    )
    ti_ok = t_ok[:, None] & i_ok[None, :]
    tvv_ok = t_ok[:, None, None] & valid[None, :, :]
    r = tl.load(r_ptr + t64, mask=t_ok, other=0.0)

    # Gates: h_pre = sigmoid(z) + eps, h_post = 2 sigmoid(z).
    sig = tl.sigmoid(s0 * pre + b_pre[None, :])
    dh = tl.load(dhpre_ptr + t64[:, None] * n + i[None, :], mask=ti_ok, other=0.0).to(tl.float32)
    dz_pre = dh * sig * (1.0 - sig)
    sig = tl.sigmoid(s1 * post + b_post[None, :])
    dh = tl.load(dhpost_ptr + t64[:, None] * n + i[None, :], mask=ti_ok, other=0.0).to(tl.float32)
    dz_post = 2.0 * dh * sig * (1.0 - sig)

    # Sinkhorn: a_0 = colnorm(p + eps); a_i = colnorm(rownorm(a_{i-1})), i = 1..iters-1.
    p = _softmax_last(s2 * res + b_res[None, :, :], valid, i_ok)
    k0 = tl.where(valid[None, :, :], p + eps, 0.0)
    comb_off = i[:, None] * n + i[None, :]
    da = tl.load(
        dcomb_ptr + t64[:, None, None] * (n * n) + comb_off[None, :, :], mask=tvv_ok, other=0.0
    ).to(tl.float32)
    for it in range(1, iters):
        step = iters - it  # backpropagate through iteration `step` (iters-1 down to 1)
        a, _s = _col_norm(k0, i_ok, eps)
        for _re in range(1, step):
            a, _s = _row_norm(a, i_ok, eps)
            a, _s = _col_norm(a, i_ok, eps)
        rr, rs = _row_norm(a, i_ok, eps)
        out, cs = _col_norm(rr, i_ok, eps)
        # out = rr / cs (columns): d rr = (d out - sum_j d out * out) / cs
        d_rr = (da - tl.sum(da * out, axis=1)[:, None, :]) / cs[:, None, :]
        # rr = a / rs (rows): d a = (d rr - sum_k d rr * rr) / rs
        da = (d_rr - tl.sum(d_rr * rr, axis=2)[:, :, None]) / rs[:, :, None]
    out, cs = _col_norm(k0, i_ok, eps)
    dk0 = (da - tl.sum(da * out, axis=1)[:, None, :]) / cs[:, None, :]
    dk0 = tl.where(valid[None, :, :], dk0, 0.0)
    # softmax over the last axis
    dz_res = p * (dk0 - tl.sum(dk0 * p, axis=2)[:, :, None])

    dmn_pre = s0 * dz_pre
    dmn_post = s1 * dz_post
    dmn_res = s2 * dz_res
    dot = (
        tl.sum(dmn_pre * pre, axis=1)
        + tl.sum(dmn_post * post, axis=1)
        + tl.sum(tl.sum(dmn_res * res, axis=2), axis=1)
    )
    coef = -(r * r / K) * dot
    tl.store(coef_ptr + t64, coef, mask=t_ok)
    tl.store(g_ptr + t64[:, None] * M + i[None, :], r[:, None] * dmn_pre, mask=ti_ok)
    tl.store(g_ptr + t64[:, None] * M + n + i[None, :], r[:, None] * dmn_post, mask=ti_ok)
    tl.store(
        g_ptr + t64[:, None, None] * M + 2 * n + comb_off[None, :, :],
        r[:, None, None] * dmn_res,
        mask=tvv_ok,
    )

    # Partial sums over this program's tokens (padded tokens contribute exactly 0).
    part = dbase_ptr + pid.to(tl.int64) * M
    tl.store(part + i, tl.sum(dz_pre, axis=0), mask=i_ok)
    tl.store(part + n + i, tl.sum(dz_post, axis=0), mask=i_ok)
    tl.store(part + 2 * n + comb_off, tl.sum(dz_res, axis=0), mask=valid)
    spart = dscale_ptr + pid.to(tl.int64) * 3
    tl.store(spart, tl.sum(tl.sum(dz_pre * pre, axis=1), axis=0))
    tl.store(spart + 1, tl.sum(tl.sum(dz_post * post, axis=1), axis=0))
    tl.store(spart + 2, tl.sum(tl.sum(tl.sum(dz_res * res, axis=2), axis=1), axis=0))
