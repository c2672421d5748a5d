"""cuTile kernels of the gates and the Sinkhorn projection, forward and backward:
h_pre = sigmoid(s0 m_pre + b_pre) + eps, h_post = 2 sigmoid(s1 m_post + b_post),
comb = Sinkhorn(softmax over the last axis of s2 m_res + b_res), per token on [BT, NP, NP] tiles
(axis 1 = row j, axis 2 = column k), the padded rows and columns kept at 0.
"""

import cuda.tile as ct

from megatron_mhc.fusions.cutile.kernels.tiles import F32, ZERO, scalar, sigmoid

# Finite "minus infinity" for the padded softmax lanes (a padded row stays NaN-free).
_NEG_BIG = -1.0e30


@ct.function
def _lane_masks(n, NP):
    """(rows_ok [1, NP, 1], cols_ok [1, 1, NP]): the lanes that hold one of the n streams."""
    lane = ct.arange(NP, dtype=ct.int32) < n
    return ct.reshape(lane, (1, NP, 1)), ct.reshape(lane, (1, 1, NP))


@ct.function
def _logits(pre, post, res, b_pre, b_post, b_res, scale, bt, BT, NP):
    """m_pre, m_post [BT, NP], m_res [BT, NP, NP] of token tile bt (parts of mn), and the gates'
    pre-activations z = s * m + b of the same shapes."""
    m_pre = ct.load(pre, (bt, 0), (BT, NP), padding_mode=ZERO)
    m_post = ct.load(post, (bt, 0), (BT, NP), padding_mode=ZERO)
    m_res = ct.load(res, (bt, 0, 0), (BT, NP, NP), padding_mode=ZERO)
    c_pre = ct.reshape(ct.astype(ct.load(b_pre, (0,), (NP,), padding_mode=ZERO), F32), (1, NP))
    c_post = ct.reshape(ct.astype(ct.load(b_post, (0,), (NP,), padding_mode=ZERO), F32), (1, NP))
    c_res = ct.reshape(
        ct.astype(ct.load(b_res, (0, 0), (NP, NP), padding_mode=ZERO), F32), (1, NP, NP)
    )
    z_pre = scalar(scale, 0) * m_pre + c_pre
    z_post = scalar(scale, 1) * m_post + c_post
    z_res = scalar(scale, 2) * m_res + c_res
    return m_pre, m_post, m_res, z_pre, z_post, z_res


@ct.function
def _softmax_last(z, rows_ok, cols_ok):
    """Softmax over the last axis of the valid n x n block of z [BT, NP, NP]; padding is 0."""
    valid = rows_ok & cols_ok
    z = ct.where(valid, z, _NEG_BIG)
    e = ct.where(valid, ct.exp(z - ct.max(z, axis=2, keepdims=True)), 0.0)
    return e / ct.where(rows_ok, ct.sum(e, axis=2, keepdims=True), 1.0)


@ct.function
def _col_den(a, cols_ok, eps):
    """Column sums + eps of a [BT, NP, NP] as [BT, 1, NP] (1 on the padded columns)."""
    return ct.where(cols_ok, ct.sum(a, axis=1, keepdims=True) + eps, 1.0)


@ct.function
def _row_den(a, rows_ok, eps):
    """Row sums + eps of a [BT, NP, NP] as [BT, NP, 1] (1 on the padded rows)."""
    return ct.where(rows_ok, ct.sum(a, axis=2, keepdims=True) + eps, 1.0)


@ct.kernel
def mhc_gates_fwd_kernel(
    pre,
    post,
    res,
    b_pre,
    b_post,
    b_res,
    scale,
    hpre,
    hpost,
    comb,
    iters: int,
    eps: float,
    BT: ct.Constant[int],
    NP: ct.Constant[int],
):
    """Grid (token tiles,): the gates and all Sinkhorn iterations in registers:
    a_0 = colnorm(softmax + eps), then iters - 1 times a = colnorm(rownorm(a))."""
    bt = ct.bid(0)
    rows_ok, cols_ok = _lane_masks(hpre.shape[1], NP)
    _m_pre, _m_post, _m_res, z_pre, z_post, z_res = _logits(
        pre, post, res, b_pre, b_post, b_res, scale, bt, BT, NP
    )
    ct.store(hpre, (bt, 0), sigmoid(z_pre) + eps)
    ct.store(hpost, (bt, 0), 2.0 * sigmoid(z_post))
    a = ct.where(rows_ok & cols_ok, _softmax_last(z_res, rows_ok, cols_ok) + eps, 0.0)
    a = a / _col_den(a, cols_ok, eps)
    for _it in range(1, iters):
        a = a / _row_den(a, rows_ok, eps)
        a = a / _col_den(a, cols_ok, eps)
    ct.store(comb, (bt, 0, 0), a)


@ct.kernel
def mhc_gates_bwd_kernel(
    pre,
    post,
    res,
    r,
    b_pre,
    b_post,
    b_res,
    scale,
    dhpre,
    dhpost,
    dcomb,
    g_pre,
    g_post,
    g_res,
    coef,
    db_pre,
    db_post,
    db_res,
    dscale,
    K: int,
    iters: int,
    eps: float,
    BT: ct.Constant[int],
    NP: ct.Constant[int],
):
    """Grid (token tiles,): backward of the gates and of the Sinkhorn projection, in registers.

    Nothing was stored per Sinkhorn iteration: backpropagating through iteration i (a row then
    a column normalisation) recomputes its input from the softmax by rerunning iterations
    1..i-1 (O(iters^2 / 2) n x n steps per token, no memory traffic). Writes the parts of
    g = r * dmn [T, M], coef = -(r^2 / K) <dmn, mn> [T], and this program's partial sums of
    dbase (the parts of a [programs, M] array) and dscale [programs, 3].
    """
    bt = ct.bid(0)
    rows_ok, cols_ok = _lane_masks(dhpre.shape[1], NP)
    valid = rows_ok & cols_ok
    m_pre, m_post, m_res, z_pre, z_post, z_res = _logits(
        pre, post, res, b_pre, b_post, b_res, scale, bt, BT, NP
    )

    # Gates (0 on padded tokens and lanes, where dh is 0).
    sig = sigmoid(z_pre)
    dh = ct.astype(ct.load(dhpre, (bt, 0), (BT, NP), padding_mode=ZERO), F32)
    dz_pre = dh * sig * (1.0 - sig)
    sig = sigmoid(z_post)
    dh = ct.astype(ct.load(dhpost, (bt, 0), (BT, NP), padding_mode=ZERO), F32)
    dz_post = 2.0 * dh * sig * (1.0 - sig)

    # Sinkhorn, from the last iteration back to a_0 = colnorm(k0).
    p = _softmax_last(z_res, rows_ok, cols_ok)
    k0 = ct.where(valid, p + eps, 0.0)
    da = ct.astype(ct.load(dcomb, (bt, 0, 0), (BT, NP, NP), padding_mode=ZERO), F32)
    for it in range(1, iters):
        # The input of iteration iters - it: a_0, then iterations 1 .. iters - it - 1 rerun (a
        # while loop: cuTile 1.7 fails, with an internal error, to compile a `for` here whose
        # bounds depend on `it`).
        a = k0 / _col_den(k0, cols_ok, eps)
        rerun = it + 1
        while rerun < iters:
            a = a / _row_den(a, rows_ok, eps)
            a = a / _col_den(a, cols_ok, eps)
            rerun = rerun + 1
        rs = _row_den(a, rows_ok, eps)
        rr = a / rs
        cs = _col_den(rr, cols_ok, eps)
        # out = rr / cs (columns): d rr = (d out - sum_j d out * out) / cs
        d_rr = (da - ct.sum(da * (rr / cs), axis=1, keepdims=True)) / cs
        # rr = a / rs (rows): d a = (d rr - sum_k d rr * rr) / rs; padded lanes back to 0
        da = ct.where(valid, (d_rr - ct.sum(d_rr * rr, axis=2, keepdims=True)) / rs, 0.0)
    cs = _col_den(k0, cols_ok, eps)
    dk0 = ct.where(valid, (da - ct.sum(da * (k0 / cs), axis=1, keepdims=True)) / cs, 0.0)
    # Softmax over the last axis.
    dz_res = p * (dk0 - ct.sum(dk0 * p, axis=2, keepdims=True))

    dm_pre = scalar(scale, 0) * dz_pre
    dm_post = scalar(scale, 1) * dz_post
    dm_res = scalar(scale, 2) * dz_res
    rt = ct.load(r, (bt,), (BT,), padding_mode=ZERO)
    dot = (
        ct.sum(dm_pre * m_pre, axis=1)
        + ct.sum(dm_post * m_post, axis=1)
        + ct.sum(dm_res * m_res, axis=(1, 2))
    )
    ct.store(coef, (bt,), -(rt * rt / K) * dot)
    ct.store(g_pre, (bt, 0), dm_pre * ct.reshape(rt, (BT, 1)))
    ct.store(g_post, (bt, 0), dm_post * ct.reshape(rt, (BT, 1)))
    ct.store(g_res, (bt, 0, 0), dm_res * ct.reshape(rt, (BT, 1, 1)))

    # This program's partial sums over its tokens (padded tokens contribute exactly 0).
    ct.store(db_pre, (bt, 0), ct.reshape(ct.sum(dz_pre, axis=0), (1, NP)))
    ct.store(db_post, (bt, 0), ct.reshape(ct.sum(dz_post, axis=0), (1, NP)))
    ct.store(db_res, (bt, 0, 0), ct.reshape(ct.sum(dz_res, axis=0), (1, NP, NP)))
    ct.store(dscale, (bt, 0), ct.reshape(ct.sum(dz_pre * m_pre), (1, 1)))
    ct.store(dscale, (bt, 1), ct.reshape(ct.sum(dz_post * m_post), (1, 1)))
    ct.store(dscale, (bt, 2), ct.reshape(ct.sum(dz_res * m_res), (1, 1)))
