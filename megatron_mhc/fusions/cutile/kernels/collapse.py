"""cuTile kernels of the collapse u = sum_i h_i x_i, forward and backward."""

import cuda.tile as ct

from megatron_mhc.fusions.cutile.kernels.tiles import F32, ZERO


@ct.kernel
def collapse_fwd_kernel(
    x, h, out, BT: ct.Constant[int], NP: ct.Constant[int], BC: ct.Constant[int]
):
    """Grid (token tiles, C tiles): one read of x, one write of u."""
    bt = ct.bid(0)
    bc = ct.bid(1)
    xt = ct.astype(ct.load(x, (bt, 0, bc), (BT, NP, BC), padding_mode=ZERO), F32)
    ht = ct.astype(ct.load(h, (bt, 0), (BT, NP), padding_mode=ZERO), F32)
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
    h3 = ct.reshape(ct.astype(ct.load(h, (bt, 0), (BT, NP), padding_mode=ZERO), F32), (BT, NP, 1))
    acc = ct.zeros((BT, NP), dtype=F32)
    num_c = ct.num_tiles(du, 1, (BT, BC))
    for c in range(num_c):
        xt = ct.astype(ct.load(x, (bt, 0, c), (BT, NP, BC), padding_mode=ZERO), F32)
        du3 = ct.reshape(
            ct.astype(ct.load(du, (bt, c), (BT, BC), padding_mode=ZERO), F32), (BT, 1, BC)
        )
        if WRITE_DX:
            ct.store(dx, (bt, 0, c), ct.astype(h3 * du3, dx.dtype))
        acc = acc + ct.sum(xt * du3, axis=2)
    ct.store(dh, (bt, 0), ct.astype(acc, dh.dtype))
