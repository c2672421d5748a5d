"""cuTile kernels of the update out_k = h_post_k y + sum_j comb[j, k] x_j, forward and backward."""

import cuda.tile as ct

from megatron_mhc.fusions.cutile.kernels.tiles import F32, ZERO


@ct.kernel
def update_fwd_kernel(
    x, y, hpost, comb, out, BT: ct.Constant[int], NP: ct.Constant[int], BC: ct.Constant[int]
):
    """Grid (token tiles, C tiles): one read of x and y, one write of out; all n outputs come
    from one [BT, NP(j), NP(k), BC] product tile summed over j."""
    bt = ct.bid(0)
    bc = ct.bid(1)
    xt = ct.astype(ct.load(x, (bt, 0, bc), (BT, NP, BC), padding_mode=ZERO), F32)
    yt = ct.astype(ct.load(y, (bt, bc), (BT, BC), padding_mode=ZERO), F32)
    hp = ct.astype(ct.load(hpost, (bt, 0), (BT, NP), padding_mode=ZERO), F32)
    cb = ct.astype(ct.load(comb, (bt, 0, 0), (BT, NP, NP), padding_mode=ZERO), F32)
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
        ct.astype(ct.load(hpost, (bt, 0), (BT, NP), padding_mode=ZERO), F32), (BT, NP, 1)
    )
    cb4 = ct.reshape(
        ct.astype(ct.load(comb, (bt, 0, 0), (BT, NP, NP), padding_mode=ZERO), F32),
        (BT, NP, NP, 1),
    )
    dh = ct.zeros((BT, NP), dtype=F32)
    dc = ct.zeros((BT, NP, NP), dtype=F32)
    num_c = ct.num_tiles(y, 1, (BT, BC))
    for c in range(num_c):
        xt = ct.astype(ct.load(x, (bt, 0, c), (BT, NP, BC), padding_mode=ZERO), F32)
        yt = ct.astype(ct.load(y, (bt, c), (BT, BC), padding_mode=ZERO), F32)
        dt = ct.astype(ct.load(dout, (bt, 0, c), (BT, NP, BC), padding_mode=ZERO), F32)
        d4 = ct.reshape(dt, (BT, 1, NP, BC))
        ct.store(dx, (bt, 0, c), ct.astype(ct.sum(cb4 * d4, axis=2), dx.dtype))
        ct.store(dy, (bt, c), ct.astype(ct.sum(hp3 * dt, axis=1), dy.dtype))
        dh = dh + ct.sum(dt * ct.reshape(yt, (BT, 1, BC)), axis=2)
        dc = dc + ct.sum(ct.reshape(xt, (BT, NP, 1, BC)) * d4, axis=3)
    ct.store(dhpost, (bt, 0), ct.astype(dh, dhpost.dtype))
    ct.store(dcomb, (bt, 0, 0), ct.astype(dc, dcomb.dtype))
