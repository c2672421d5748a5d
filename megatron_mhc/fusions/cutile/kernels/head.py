"""cuTile kernels of the head (the learned contract), forward and the backward of its weights:
m = r * (fn @ flatten(x)), w = sigmoid(s * m + b) + eps, u = sum_i w_i x_i. fn is read as
[n (m), n (i), C]; the projection has only n rows, so it is an elementwise product summed over a
[BT, NP(m), NP(i), BC] tile. The backward is head_gate_bwd_kernel followed by the projection's
proj_rms_bwd_kernel with M = n and the collapse term.
"""

import cuda.tile as ct

from megatron_mhc.fusions.cutile.kernels.tiles import F32, ZERO, scalar, sigmoid


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
    acc = ct.zeros((BT, NP), dtype=F32)
    sumsq = ct.zeros((BT,), dtype=F32)
    for c in range(num_c):
        xt = ct.astype(ct.load(x, (bt, 0, c), (BT, NP, BC), padding_mode=ZERO), F32)
        ft = ct.astype(ct.load(fn, (0, 0, c), (NP, NP, BC), padding_mode=ZERO), F32)
        prod = ct.reshape(xt, (BT, 1, NP, BC)) * ct.reshape(ft, (1, NP, NP, BC))
        acc = acc + ct.sum(ct.sum(prod, axis=3), axis=2)
        sumsq = sumsq + ct.sum(ct.sum(xt * xt, axis=2), axis=1)
    k = x.shape[1] * x.shape[2]
    rt = ct.rsqrt(sumsq / k + norm_eps)
    mt = acc * ct.reshape(rt, (BT, 1))
    s = scalar(scale, 0)
    b = ct.reshape(ct.astype(ct.load(base, (0,), (NP,), padding_mode=ZERO), F32), (1, NP))
    wt = sigmoid(s * mt + b) + eps
    ct.store(mn, (bt, 0), mt)
    ct.store(r, (bt,), rt)
    ct.store(w, (bt, 0), wt)
    w3 = ct.reshape(wt, (BT, NP, 1))
    for c in range(num_c):
        xt = ct.astype(ct.load(x, (bt, 0, c), (BT, NP, BC), padding_mode=ZERO), F32)
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
    dw = ct.zeros((BT, NP), dtype=F32)
    for c in range(ct.num_tiles(du, 1, (BT, BC))):
        xt = ct.astype(ct.load(x, (bt, 0, c), (BT, NP, BC), padding_mode=ZERO), F32)
        dut = ct.astype(ct.load(du, (bt, c), (BT, BC), padding_mode=ZERO), F32)
        dw = dw + ct.sum(xt * ct.reshape(dut, (BT, 1, BC)), axis=2)
    mt = ct.load(mn, (bt, 0), (BT, NP), padding_mode=ZERO)
    rt = ct.load(r, (bt,), (BT,), padding_mode=ZERO)
    s = scalar(scale, 0)
    b = ct.reshape(ct.astype(ct.load(base, (0,), (NP,), padding_mode=ZERO), F32), (1, NP))
    sig = sigmoid(s * mt + b)
    dz = dw * sig * (1.0 - sig)  # 0 on padded tokens and streams (dw is 0 there)
    dm = s * dz
    k = x.shape[1] * x.shape[2]
    ct.store(g, (bt, 0), dm * ct.reshape(rt, (BT, 1)))
    ct.store(coef, (bt,), -(rt * rt / k) * ct.sum(dm * mt, axis=1))
    ct.store(dbase, (bt, 0), ct.reshape(ct.sum(dz, axis=0), (1, NP)))
    ct.store(dscale, (bt,), ct.reshape(ct.sum(ct.sum(dz * mt, axis=1), axis=0), (1,)))
