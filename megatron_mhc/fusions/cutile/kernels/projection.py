"""cuTile kernels of the projection + RMS, forward and backward: mn = r * (x @ fn^T),
r = rsqrt(mean(x^2) + norm_eps) (the mappings; the head's backward uses proj_rms_bwd too, with
M = n and the collapse term).
"""

import cuda.tile as ct

from megatron_mhc.fusions.cutile.kernels.tiles import F32, ZERO


@ct.kernel
def proj_rms_fwd_kernel(
    x, fn, mn, r, norm_eps: float, BT: ct.Constant[int], BK: ct.Constant[int], MP: ct.Constant[int]
):
    """Grid (token tiles,): one pass over x [T, K] accumulates x @ fn^T ([BT, MP], fn [M, K])
    and sum(x^2); stores mn [T, M] and r [T]."""
    bt = ct.bid(0)
    acc = ct.zeros((BT, MP), dtype=F32)
    sumsq = ct.zeros((BT,), dtype=F32)
    for k in range(ct.num_tiles(x, 1, (BT, BK))):
        xt = ct.astype(ct.load(x, (bt, k), (BT, BK), padding_mode=ZERO), F32)
        ft = ct.astype(ct.load(fn, (0, k), (MP, BK), padding_mode=ZERO), F32)
        acc = ct.mma(xt, ct.transpose(ft), acc)
        sumsq = sumsq + ct.sum(xt * xt, axis=1)
    rt = ct.rsqrt(sumsq / x.shape[1] + norm_eps)
    ct.store(mn, (bt, 0), acc * ct.reshape(rt, (BT, 1)))
    ct.store(r, (bt,), rt)


@ct.function
def _load_k_tile(a, t, s, bl, BT, BL):
    """The [BT, BL] fp32 tile of a [T, S, L] at (token tile t, stream s, L tile bl)."""
    tile = ct.load(a, (t, s, bl), (BT, 1, BL), padding_mode=ZERO)
    return ct.reshape(ct.astype(tile, F32), (BT, BL))


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
        ct.astype(ct.load(fn, (0, s, bl), (MP, 1, BL), padding_mode=ZERO), F32), (MP, BL)
    )
    acc = ct.zeros((MP, BL), dtype=F32)
    num_t = ct.num_tiles(g, 0, (BT, MP))
    for i in range(TILES_PER_SPLIT):
        tt = split * TILES_PER_SPLIT + i
        if tt < num_t:
            xt = _load_k_tile(x, tt, s, bl, BT, BL)
            gt = ct.load(g, (tt, 0), (BT, MP), padding_mode=ZERO)
            if WRITE_DX:
                coef_t = ct.reshape(ct.load(coef, (tt,), (BT,), padding_mode=ZERO), (BT, 1))
                res = ct.mma(gt, ft, coef_t * xt)
                if COLLAPSE:
                    wt = ct.astype(ct.load(w, (tt, s), (BT, 1), padding_mode=ZERO), F32)
                    dut = ct.astype(ct.load(du, (tt, bl), (BT, BL), padding_mode=ZERO), F32)
                    res = res + wt * dut
                if RESIDUAL:
                    res = res + _load_k_tile(residual, tt, s, bl, BT, BL)
                ct.store(dx, (tt, s, bl), ct.reshape(ct.astype(res, dx.dtype), (BT, 1, BL)))
            if WRITE_DFN:
                acc = ct.mma(ct.transpose(gt), xt, acc)
    if WRITE_DFN:
        ct.store(dfn, (split, 0, s, bl), ct.reshape(acc, (1, MP, 1, BL)))
