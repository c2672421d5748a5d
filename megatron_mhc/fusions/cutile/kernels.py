"""cuTile kernels of the mHC mappings, collapse, update and head (see docs/kernels.md, "cuTile
backend").

Imported lazily, at the first op call (or by the bytecode-export tests), by
`megatron_mhc.fusions.cutile.ops`: importing this module imports `cuda.tile`.

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

import cuda.tile as ct

_ZERO = ct.PaddingMode.ZERO
_F32 = ct.float32
# Finite "minus infinity" for the padded softmax lanes (a padded row stays NaN-free).
_NEG_BIG = -1.0e30


@ct.function
def _sigmoid(z):
    return 1.0 / (1.0 + ct.exp(-z))


@ct.function
def _scalar(array, i):
    """array[i] as an fp32 0-d tile."""
    return ct.reshape(ct.astype(ct.load(array, (i,), (1,), padding_mode=_ZERO), _F32), ())


# ----------------------------------------------------------------------------------------------
# Projection + RMS: mn = r * (x @ fn^T), r = rsqrt(mean(x^2) + norm_eps) (the mappings; the
# head's backward uses proj_rms_bwd too, with M = n and the collapse term).
# ----------------------------------------------------------------------------------------------
@ct.kernel
def proj_rms_fwd_kernel(
    x, fn, mn, r, norm_eps: float, BT: ct.Constant[int], BK: ct.Constant[int], MP: ct.Constant[int]
):
    """Grid (token tiles,): one pass over x [T, K] accumulates x @ fn^T ([BT, MP], fn [M, K])
    and sum(x^2); stores mn [T, M] and r [T]."""
    bt = ct.bid(0)
    acc = ct.zeros((BT, MP), dtype=_F32)
    sumsq = ct.zeros((BT,), dtype=_F32)
    for k in range(ct.num_tiles(x, 1, (BT, BK))):
        xt = ct.astype(ct.load(x, (bt, k), (BT, BK), padding_mode=_ZERO), _F32)
        ft = ct.astype(ct.load(fn, (0, k), (MP, BK), padding_mode=_ZERO), _F32)
        acc = ct.mma(xt, ct.transpose(ft), acc)
        sumsq = sumsq + ct.sum(xt * xt, axis=1)
    rt = ct.rsqrt(sumsq / x.shape[1] + norm_eps)
    ct.store(mn, (bt, 0), acc * ct.reshape(rt, (BT, 1)))
    ct.store(r, (bt,), rt)


@ct.function
def _load_k_tile(a, t, s, bl, BT, BL):
    """The [BT, BL] fp32 tile of a [T, S, L] at (token tile t, stream s, L tile bl)."""
    tile = ct.load(a, (t, s, bl), (BT, 1, BL), padding_mode=_ZERO)
    return ct.reshape(ct.astype(tile, _F32), (BT, BL))


@ct.kernel
def proj_rms_bwd_kernel(
    x,
    fn,
    g,
    coef,
    dx,
    dfn,
    w,
    du,
    residual,
    TILES_PER_SPLIT: ct.Constant[int],
    BT: ct.Constant[int],
    BL: ct.Constant[int],
    MP: ct.Constant[int],
    WRITE_DX: ct.Constant[bool],
    WRITE_DFN: ct.Constant[bool],
    COLLAPSE: ct.Constant[bool],
    RESIDUAL: ct.Constant[bool],
):
    """dx = g @ fn + coef x (+ w_s du) (+ residual) and dfn[split] = g^T x, in one pass over x.

    x, dx, residual [T, S, L] and fn [M, S, L] are the [T, K] and [M, K] arrays with K = S*L:
    S = n streams with the COLLAPSE term (stream s of x gets w[:, s] * du, the collapse's
    gradient, added while x is read anyway), else S = 1. g = r * dmn [T, M], coef [T] come from
    the gates backward; RESIDUAL adds a gradient of x arriving from elsewhere, so that dx is
    written once. Grid (L tiles, S, token splits): each program owns one [MP, BL] slice of fn
    and dfn and walks the tokens of its split; dfn [splits, M, S, L] holds the splits' partial
    sums. The arrays the flags leave unused are placeholders, never touched.
    """
    bl = ct.bid(0)
    s = ct.bid(1)
    split = ct.bid(2)
    ft = ct.reshape(
        ct.astype(ct.load(fn, (0, s, bl), (MP, 1, BL), padding_mode=_ZERO), _F32), (MP, BL)
    )
    acc = ct.zeros((MP, BL), dtype=_F32)
    num_t = ct.num_tiles(g, 0, (BT, MP))
    for i in range(TILES_PER_SPLIT):
        tt = split * TILES_PER_SPLIT + i
        if tt < num_t:
            xt = _load_k_tile(x, tt, s, bl, BT, BL)
            gt = ct.load(g, (tt, 0), (BT, MP), padding_mode=_ZERO)
            if WRITE_DX:
                coef_t = ct.reshape(ct.load(coef, (tt,), (BT,), padding_mode=_ZERO), (BT, 1))
                res = ct.mma(gt, ft, coef_t * xt)
                if COLLAPSE:
                    wt = ct.astype(ct.load(w, (tt, s), (BT, 1), padding_mode=_ZERO), _F32)
                    dut = ct.astype(ct.load(du, (tt, bl), (BT, BL), padding_mode=_ZERO), _F32)
                    res = res + wt * dut
                if RESIDUAL:
                    res = res + _load_k_tile(residual, tt, s, bl, BT, BL)
                ct.store(dx, (tt, s, bl), ct.reshape(ct.astype(res, dx.dtype), (BT, 1, BL)))
            if WRITE_DFN:
                acc = ct.mma(ct.transpose(gt), xt, acc)
    if WRITE_DFN:
        ct.store(dfn, (split, 0, s, bl), ct.reshape(acc, (1, MP, 1, BL)))


# ----------------------------------------------------------------------------------------------
# Gates and Sinkhorn: h_pre = sigmoid(s0 m_pre + b_pre) + eps, h_post = 2 sigmoid(s1 m_post +
# b_post), comb = Sinkhorn(softmax over the last axis of s2 m_res + b_res), per token on
# [BT, NP, NP] tiles (axis 1 = row j, axis 2 = column k), the padded rows and columns kept at 0.
# ----------------------------------------------------------------------------------------------
@ct.function
def _lane_masks(n, NP):
    """(rows_ok [1, NP, 1], cols_ok [1, 1, NP]): the lanes that hold one of the n streams."""
    lane = ct.arange(NP, dtype=ct.int32) < n
    return ct.reshape(lane, (1, NP, 1)), ct.reshape(lane, (1, 1, NP))


@ct.function
def _logits(pre, post, res, b_pre, b_post, b_res, scale, bt, BT, NP):
    """m_pre, m_post [BT, NP], m_res [BT, NP, NP] of token tile bt (parts of mn), and the gates'
    pre-activations z = s * m + b of the same shapes."""
    m_pre = ct.load(pre, (bt, 0), (BT, NP), padding_mode=_ZERO)
    m_post = ct.load(post, (bt, 0), (BT, NP), padding_mode=_ZERO)
    m_res = ct.load(res, (bt, 0, 0), (BT, NP, NP), padding_mode=_ZERO)
    c_pre = ct.reshape(ct.astype(ct.load(b_pre, (0,), (NP,), padding_mode=_ZERO), _F32), (1, NP))
    c_post = ct.reshape(ct.astype(ct.load(b_post, (0,), (NP,), padding_mode=_ZERO), _F32), (1, NP))
    c_res = ct.reshape(
        ct.astype(ct.load(b_res, (0, 0), (NP, NP), padding_mode=_ZERO), _F32), (1, NP, NP)
    )
    z_pre = _scalar(scale, 0) * m_pre + c_pre
    z_post = _scalar(scale, 1) * m_post + c_post
    z_res = _scalar(scale, 2) * m_res + c_res
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
    ct.store(hpre, (bt, 0), _sigmoid(z_pre) + eps)
    ct.store(hpost, (bt, 0), 2.0 * _sigmoid(z_post))
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
    sig = _sigmoid(z_pre)
    dh = ct.astype(ct.load(dhpre, (bt, 0), (BT, NP), padding_mode=_ZERO), _F32)
    dz_pre = dh * sig * (1.0 - sig)
    sig = _sigmoid(z_post)
    dh = ct.astype(ct.load(dhpost, (bt, 0), (BT, NP), padding_mode=_ZERO), _F32)
    dz_post = 2.0 * dh * sig * (1.0 - sig)

    # Sinkhorn, from the last iteration back to a_0 = colnorm(k0).
    p = _softmax_last(z_res, rows_ok, cols_ok)
    k0 = ct.where(valid, p + eps, 0.0)
    da = ct.astype(ct.load(dcomb, (bt, 0, 0), (BT, NP, NP), padding_mode=_ZERO), _F32)
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

    dm_pre = _scalar(scale, 0) * dz_pre
    dm_post = _scalar(scale, 1) * dz_post
    dm_res = _scalar(scale, 2) * dz_res
    rt = ct.load(r, (bt,), (BT,), padding_mode=_ZERO)
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


# ----------------------------------------------------------------------------------------------
# Collapse: u = sum_i h_i x_i.
# ----------------------------------------------------------------------------------------------
@ct.kernel
def collapse_fwd_kernel(
    x, h, out, BT: ct.Constant[int], NP: ct.Constant[int], BC: ct.Constant[int]
):
    """Grid (token tiles, C tiles): one read of x, one write of u."""
    bt = ct.bid(0)
    bc = ct.bid(1)
    xt = ct.astype(ct.load(x, (bt, 0, bc), (BT, NP, BC), padding_mode=_ZERO), _F32)
    ht = ct.astype(ct.load(h, (bt, 0), (BT, NP), padding_mode=_ZERO), _F32)
    u = ct.sum(ct.reshape(ht, (BT, NP, 1)) * xt, axis=1)
    ct.store(out, (bt, bc), ct.astype(u, out.dtype))


@ct.kernel
def collapse_bwd_kernel(
    x,
    h,
    du,
    dx,
    dh,
    BT: ct.Constant[int],
    NP: ct.Constant[int],
    BC: ct.Constant[int],
    WRITE_DX: ct.Constant[bool],
):
    """Grid (token tiles,): walks C in one pass over x and du; dx_i = h_i du (when WRITE_DX,
    else dx is an unused placeholder), dh_i = <x_i, du>."""
    bt = ct.bid(0)
    h3 = ct.reshape(ct.astype(ct.load(h, (bt, 0), (BT, NP), padding_mode=_ZERO), _F32), (BT, NP, 1))
    acc = ct.zeros((BT, NP), dtype=_F32)
    num_c = ct.num_tiles(du, 1, (BT, BC))
    for c in range(num_c):
        xt = ct.astype(ct.load(x, (bt, 0, c), (BT, NP, BC), padding_mode=_ZERO), _F32)
        du3 = ct.reshape(
            ct.astype(ct.load(du, (bt, c), (BT, BC), padding_mode=_ZERO), _F32), (BT, 1, BC)
        )
        if WRITE_DX:
            ct.store(dx, (bt, 0, c), ct.astype(h3 * du3, dx.dtype))
        acc = acc + ct.sum(xt * du3, axis=2)
    ct.store(dh, (bt, 0), ct.astype(acc, dh.dtype))


# ----------------------------------------------------------------------------------------------
# Update: out_k = h_post_k y + sum_j comb[j, k] x_j.
# ----------------------------------------------------------------------------------------------
@ct.kernel
def update_fwd_kernel(
    x, y, hpost, comb, out, BT: ct.Constant[int], NP: ct.Constant[int], BC: ct.Constant[int]
):
    """Grid (token tiles, C tiles): one read of x and y, one write of out; all n outputs come
    from one [BT, NP(j), NP(k), BC] product tile summed over j."""
    bt = ct.bid(0)
    bc = ct.bid(1)
    xt = ct.astype(ct.load(x, (bt, 0, bc), (BT, NP, BC), padding_mode=_ZERO), _F32)
    yt = ct.astype(ct.load(y, (bt, bc), (BT, BC), padding_mode=_ZERO), _F32)
    hp = ct.astype(ct.load(hpost, (bt, 0), (BT, NP), padding_mode=_ZERO), _F32)
    cb = ct.astype(ct.load(comb, (bt, 0, 0), (BT, NP, NP), padding_mode=_ZERO), _F32)
    mixed = ct.sum(ct.reshape(cb, (BT, NP, NP, 1)) * ct.reshape(xt, (BT, NP, 1, BC)), axis=1)
    res = ct.reshape(hp, (BT, NP, 1)) * ct.reshape(yt, (BT, 1, BC)) + mixed
    ct.store(out, (bt, 0, bc), ct.astype(res, out.dtype))


@ct.kernel
def update_bwd_kernel(
    x,
    y,
    hpost,
    comb,
    dout,
    dx,
    dy,
    dhpost,
    dcomb,
    BT: ct.Constant[int],
    NP: ct.Constant[int],
    BC: ct.Constant[int],
):
    """Grid (token tiles,): one pass over x, y and dout along C:
    dx_j = sum_k comb[j, k] dout_k, dy = sum_k h_post_k dout_k, dh_post_k = <dout_k, y>,
    dcomb[j, k] = <x_j, dout_k>."""
    bt = ct.bid(0)
    hp3 = ct.reshape(
        ct.astype(ct.load(hpost, (bt, 0), (BT, NP), padding_mode=_ZERO), _F32), (BT, NP, 1)
    )
    cb4 = ct.reshape(
        ct.astype(ct.load(comb, (bt, 0, 0), (BT, NP, NP), padding_mode=_ZERO), _F32),
        (BT, NP, NP, 1),
    )
    dh = ct.zeros((BT, NP), dtype=_F32)
    dc = ct.zeros((BT, NP, NP), dtype=_F32)
    num_c = ct.num_tiles(y, 1, (BT, BC))
    for c in range(num_c):
        xt = ct.astype(ct.load(x, (bt, 0, c), (BT, NP, BC), padding_mode=_ZERO), _F32)
        yt = ct.astype(ct.load(y, (bt, c), (BT, BC), padding_mode=_ZERO), _F32)
        dt = ct.astype(ct.load(dout, (bt, 0, c), (BT, NP, BC), padding_mode=_ZERO), _F32)
        d4 = ct.reshape(dt, (BT, 1, NP, BC))
        ct.store(dx, (bt, 0, c), ct.astype(ct.sum(cb4 * d4, axis=2), dx.dtype))
        ct.store(dy, (bt, c), ct.astype(ct.sum(hp3 * dt, axis=1), dy.dtype))
        dh = dh + ct.sum(dt * ct.reshape(yt, (BT, 1, BC)), axis=2)
        dc = dc + ct.sum(ct.reshape(xt, (BT, NP, 1, BC)) * d4, axis=3)
    ct.store(dhpost, (bt, 0), ct.astype(dh, dhpost.dtype))
    ct.store(dcomb, (bt, 0, 0), ct.astype(dc, dcomb.dtype))


# ----------------------------------------------------------------------------------------------
# Head (learned contract): m = r * (fn @ flatten(x)), w = sigmoid(s * m + b) + eps,
# u = sum_i w_i x_i. fn is read as [n (m), n (i), C]; the projection has only n rows, so it is
# an elementwise product summed over a [BT, NP(m), NP(i), BC] tile. The backward is
# head_gate_bwd_kernel followed by proj_rms_bwd_kernel with M = n and the collapse term.
# ----------------------------------------------------------------------------------------------
@ct.kernel
def head_fwd_kernel(
    x,
    fn,
    base,
    scale,
    out,
    mn,
    r,
    w,
    eps: float,
    norm_eps: float,
    BT: ct.Constant[int],
    NP: ct.Constant[int],
    BC: ct.Constant[int],
):
    """Grid (token tiles,): pass 1 over x computes m and r (stores mn [T, n], r [T],
    w [T, n]); pass 2 over x computes u (2 reads of x, as the Triton head)."""
    bt = ct.bid(0)
    num_c = ct.num_tiles(out, 1, (BT, BC))
    acc = ct.zeros((BT, NP), dtype=_F32)
    sumsq = ct.zeros((BT,), dtype=_F32)
    for c in range(num_c):
        xt = ct.astype(ct.load(x, (bt, 0, c), (BT, NP, BC), padding_mode=_ZERO), _F32)
        ft = ct.astype(ct.load(fn, (0, 0, c), (NP, NP, BC), padding_mode=_ZERO), _F32)
        prod = ct.reshape(xt, (BT, 1, NP, BC)) * ct.reshape(ft, (1, NP, NP, BC))
        acc = acc + ct.sum(ct.sum(prod, axis=3), axis=2)
        sumsq = sumsq + ct.sum(ct.sum(xt * xt, axis=2), axis=1)
    k = x.shape[1] * x.shape[2]
    rt = ct.rsqrt(sumsq / k + norm_eps)
    mt = acc * ct.reshape(rt, (BT, 1))
    s = _scalar(scale, 0)
    b = ct.reshape(ct.astype(ct.load(base, (0,), (NP,), padding_mode=_ZERO), _F32), (1, NP))
    wt = _sigmoid(s * mt + b) + eps
    ct.store(mn, (bt, 0), mt)
    ct.store(r, (bt,), rt)
    ct.store(w, (bt, 0), wt)
    w3 = ct.reshape(wt, (BT, NP, 1))
    for c in range(num_c):
        xt = ct.astype(ct.load(x, (bt, 0, c), (BT, NP, BC), padding_mode=_ZERO), _F32)
        ct.store(out, (bt, c), ct.astype(ct.sum(w3 * xt, axis=1), out.dtype))


@ct.kernel
def head_gate_bwd_kernel(
    x,
    du,
    mn,
    r,
    base,
    scale,
    g,
    coef,
    dbase,
    dscale,
    BT: ct.Constant[int],
    NP: ct.Constant[int],
    BC: ct.Constant[int],
):
    """Grid (token tiles,): dw_i = <x_i, du> in one pass, then the gate backward:
    g = r * s * dz [T, n], coef = -(r^2 / K) <s dz, m> [T], partial dbase [P, n], dscale [P]."""
    bt = ct.bid(0)
    dw = ct.zeros((BT, NP), dtype=_F32)
    for c in range(ct.num_tiles(du, 1, (BT, BC))):
        xt = ct.astype(ct.load(x, (bt, 0, c), (BT, NP, BC), padding_mode=_ZERO), _F32)
        dut = ct.astype(ct.load(du, (bt, c), (BT, BC), padding_mode=_ZERO), _F32)
        dw = dw + ct.sum(xt * ct.reshape(dut, (BT, 1, BC)), axis=2)
    mt = ct.load(mn, (bt, 0), (BT, NP), padding_mode=_ZERO)
    rt = ct.load(r, (bt,), (BT,), padding_mode=_ZERO)
    s = _scalar(scale, 0)
    b = ct.reshape(ct.astype(ct.load(base, (0,), (NP,), padding_mode=_ZERO), _F32), (1, NP))
    sig = _sigmoid(s * mt + b)
    dz = dw * sig * (1.0 - sig)  # 0 on padded tokens and streams (dw is 0 there)
    dm = s * dz
    k = x.shape[1] * x.shape[2]
    ct.store(g, (bt, 0), dm * ct.reshape(rt, (BT, 1)))
    ct.store(coef, (bt,), -(rt * rt / k) * ct.sum(dm * mt, axis=1))
    ct.store(dbase, (bt, 0), ct.reshape(ct.sum(dz, axis=0), (1, NP)))
    ct.store(dscale, (bt,), ct.reshape(ct.sum(ct.sum(dz * mt, axis=1), axis=0), (1,)))


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
