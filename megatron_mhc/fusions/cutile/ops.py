"""Launchers and tile sizes of the cuTile backend (imported at the first op call; a launch
imports `cuda.tile` and `kernels`).

The launchers have the signatures of the Triton backend's (`megatron_mhc.fusions.triton.ops`),
so that the autograd Functions of `fused_functions` run on either backend: the mappings
(`proj_rms_fwd`, `mhc_gates_fwd`, `mhc_gates_bwd`, `proj_rms_bwd`), collapse, update and head
(`head_fwd`, `head_gate_bwd`, then `proj_rms_bwd`). The tile-size helpers and `kernel_args` are
plain Python so that the CPU tests export exactly the configurations the launchers would run.
"""

import torch

from megatron_mhc.fusions import launcher_common as common
from megatron_mhc.fusions.launcher_common import cdiv, clamp_pow2, pow2, stream_tile

# Elements of the largest per-program product tile (registers): a reasoned default, untuned.
TILE_ELEMS = 4096


def collapse_tiles(T: int, n: int, C: int):
    """(BT, BC) of the collapse kernels: a [BT, NP, BC] tile of about TILE_ELEMS elements."""
    block_c = clamp_pow2(C, 32, 256)
    block_t = clamp_pow2(TILE_ELEMS // (stream_tile(n) * block_c), 1, 64)
    return min(block_t, clamp_pow2(T, 1, 64)), block_c


def update_tiles(T: int, n: int, C: int):
    """(BT, BC) of the update kernels: a [BT, NP, NP, BC] product tile of about TILE_ELEMS."""
    p = stream_tile(n)
    block_c = clamp_pow2(C, 32, max(32, TILE_ELEMS // (p * p)))
    block_t = clamp_pow2(TILE_ELEMS // (p * p * block_c), 1, 64)
    return min(block_t, clamp_pow2(T, 1, 64)), block_c


# Multiply-adds per step of the projections' fp32 `ct.mma` (BT x MP x BK), which runs on CUDA
# cores: up to 8192 the kernels compile without register spills (checked in the sm_80 and
# sm_100 SASS; 32768 spills).
PROJ_PRODUCT_ELEMS = 8192


def proj_tiles(T: int, m: int, L: int, backward: bool):
    """(BT, BK, MP) of the projection kernels, which walk an axis of length L (forward: K;
    backward: C or K) BK at a time, with the m rows of fn as one tile of MP (m rounded up to a
    power of two) and BT * BK * MP <= PROJ_PRODUCT_ELEMS. Forward: BT up to 16 (each token tile
    re-reads all of fn from L2). Backward: each program keeps an [MP, BK] slice of fn and dfn
    in registers (up to TILE_ELEMS elements each) and re-reads g [T, M] once per slice, so BK
    is as large as that allows and BT small."""
    # Forward: at least 16 rows; narrower fp32 mma tiles (4 or 8 columns) spill registers.
    mp = max(2 if backward else 16, pow2(m))
    if backward:
        block_k = clamp_pow2(L, 8, max(8, min(128, TILE_ELEMS // mp)))
        block_t = clamp_pow2(PROJ_PRODUCT_ELEMS // (mp * block_k), 1, 8)
    else:
        block_t = 16 if mp <= 32 else 8
        block_k = clamp_pow2(L, 8, max(8, min(128, PROJ_PRODUCT_ELEMS // (block_t * mp))))
    return min(block_t, clamp_pow2(T, 1, 16)), block_k, mp


# The Sinkhorn backward keeps about ten [BT, NP, NP] tiles live: 512 elements each keeps them
# in registers (BT = 32 up to n = 4, 8 at n = 8).
SINKHORN_TILE_ELEMS = 512


def gates_tile(T: int, n: int) -> int:
    """BT of the gates kernels: [BT, NP, NP] tiles of about SINKHORN_TILE_ELEMS elements."""
    p = stream_tile(n)
    return min(clamp_pow2(SINKHORN_TILE_ELEMS // (p * p), 1, 32), clamp_pow2(T, 1, 32))


def kernel_args(
    name: str,
    T: int,
    n: int,
    C: int = 1,
    *,
    m: "int | None" = None,
    write_dx: bool = True,
    write_dfn: bool = True,
    collapse: bool = False,
    residual: bool = False,
    num_sms: int = 132,
):
    """(grid, constant arguments) of kernel `name` for T tokens of x [T, n, C].

    The projection kernels read x as [T, K], K = n*C, against the m rows of fn (required for
    them); proj_rms_bwd tiles K as n streams of C, so without the collapse term its launcher
    passes (n, C) = (1, K). C is unused by the gates kernels. The flags are proj_rms_bwd's
    (write_dx also collapse_bwd's); num_sms, the GPU's multiprocessors, sizes proj_rms_bwd's
    token splits.
    """
    p = stream_tile(n)
    if name.startswith("proj_rms"):
        if name == "proj_rms_fwd":
            bt, bk, mp = proj_tiles(T, m, n * C, backward=False)
            return (cdiv(T, bt), 1, 1), (bt, bk, mp)
        bt, bk, mp = proj_tiles(T, m, C, backward=True)
        t_tiles, l_tiles = cdiv(T, bt), cdiv(C, bk)
        splits = max(1, min(t_tiles, cdiv(2 * num_sms, l_tiles * n)))
        per_split = cdiv(t_tiles, splits)
        return (
            (l_tiles, n, cdiv(t_tiles, per_split)),
            (
                per_split,
                bt,
                bk,
                mp,
                bool(write_dx),
                bool(write_dfn),
                bool(collapse),
                bool(residual),
            ),
        )
    if name.startswith("mhc_gates"):
        bt = gates_tile(T, n)
        return (cdiv(T, bt), 1, 1), (bt, p)
    if name.startswith("collapse"):
        bt, bc = collapse_tiles(T, n, C)
    else:
        bt, bc = update_tiles(T, n, C)
    if name in ("collapse_fwd", "update_fwd"):
        return (cdiv(T, bt), cdiv(C, bc), 1), (bt, p, bc)
    if name == "collapse_bwd":
        return (cdiv(T, bt), 1, 1), (bt, p, bc, bool(write_dx))
    if name in ("update_bwd", "head_fwd", "head_gate_bwd"):
        return (cdiv(T, bt), 1, 1), (bt, p, bc)
    raise KeyError(name)


def check_device(*tensors: torch.Tensor) -> None:
    common.require_cuda("cutile", "cuTile has no CPU mode: use the 'torch' backend on CPU", tensors)


def _launch(name: str, args, arrays) -> None:
    """Runs kernel `name` with args = kernel_args(name, ...) on torch's current stream."""
    import cuda.tile as ct

    from megatron_mhc.fusions.cutile import kernels

    grid, consts = args
    ct.launch(torch.cuda.current_stream(), grid, kernels.KERNELS[name], (*arrays, *consts))


def _parts(t: torch.Tensor, n: int):
    """The [pre (n) | post (n) | res (n*n)] parts of t's last axis (M = n*n + 2n) as views
    [..., n], [..., n], [..., n, n]: the gates kernels load each part by tile index."""
    return t[..., :n], t[..., n : 2 * n], t[..., 2 * n :].unflatten(-1, (n, n))


# ----------------------------------------------------------------------------------------------
# Launchers (contiguous buffers in, new buffers out).
# ----------------------------------------------------------------------------------------------
def proj_rms_fwd(x2, fn, norm_eps):
    """mn = r * (x2 @ fn^T) [T, M] fp32 and r = rsqrt(mean(x2^2) + norm_eps) [T] fp32."""
    T, K = x2.shape
    M = fn.shape[0]
    mn, r = common.proj_rms_fwd_outputs(x2, M)
    _launch(
        "proj_rms_fwd", kernel_args("proj_rms_fwd", T, 1, K, m=M), (x2, fn, mn, r, float(norm_eps))
    )
    return mn, r


def proj_rms_bwd(x2, fn, g, coef, need_dx, need_dfn, dx_dtype, collapse=None, residual=None):
    """dx = g @ fn + coef * x2 [T, K] in dx_dtype, plus w[:, k // C] * du[:, k % C] with
    collapse=(w [T, n], du [T, C], C), plus residual [T, K] when given; dfn = g^T @ x2 [M, K]
    fp32. Each is None when not needed; one pass over x2 for both."""
    T, K = x2.shape
    M = fn.shape[0]
    if not (need_dx or need_dfn):
        return None, None
    dev = x2.device
    w, du, C = collapse if collapse is not None else (g, g, K)
    S = K // C
    args = kernel_args(
        "proj_rms_bwd",
        T,
        S,
        C,
        m=M,
        write_dx=need_dx,
        write_dfn=need_dfn,
        collapse=collapse is not None,
        residual=residual is not None,
        num_sms=common.num_sms(dev),
    )
    splits = args[0][2]
    x3 = x2.view(T, S, C)
    dx = torch.empty(T, S, C, device=dev, dtype=dx_dtype) if need_dx else None
    parts = torch.empty(splits, M, S, C, device=dev, dtype=torch.float32) if need_dfn else None
    # The arrays the flags leave unused are never touched: x3 and g stand in for them.
    _launch(
        "proj_rms_bwd",
        args,
        (
            x3,
            fn.view(M, S, C),
            g,
            coef,
            x3 if dx is None else dx,
            x3 if parts is None else parts,
            w,
            du,
            x3 if residual is None else residual.view(T, S, C),
        ),
    )
    dfn = None
    if need_dfn:
        dfn = (parts[0] if splits == 1 else parts.sum(dim=0)).view(M, K)
    return (dx.view(T, K) if need_dx else None), dfn


def mhc_gates_fwd(mn, base, scale, n, iters, eps):
    """h_pre [T, n], h_post [T, n], comb [T, n, n] (fp32) from mn [T, M], base [M], scale [3]."""
    T = mn.shape[0]
    h_pre, h_post, comb = common.gates_fwd_outputs(mn, n)
    _launch(
        "mhc_gates_fwd",
        kernel_args("mhc_gates_fwd", T, n),
        (*_parts(mn, n), *_parts(base, n), scale, h_pre, h_post, comb, int(iters), float(eps)),
    )
    return h_pre, h_post, comb


def mhc_gates_bwd(mn, r, base, scale, dh_pre, dh_post, dcomb, n, K, iters, eps):
    """g = r * dmn [T, M], coef [T], dbase [M], dscale [3] (all fp32)."""
    args = kernel_args("mhc_gates_bwd", mn.shape[0], n)
    g, coef, dbase, dscale = common.gates_bwd_outputs(mn, programs=args[0][0])
    _launch(
        "mhc_gates_bwd",
        args,
        (
            *_parts(mn, n),
            r,
            *_parts(base, n),
            scale,
            dh_pre,
            dh_post,
            dcomb,
            *_parts(g, n),
            coef,
            *_parts(dbase, n),
            dscale,
            int(K),
            int(iters),
            float(eps),
        ),
    )
    return common.summed(g, coef, dbase, dscale)


def collapse_fwd(x3, h, out_dtype):
    T, n, C = x3.shape
    out = torch.empty(T, C, device=x3.device, dtype=out_dtype)
    _launch("collapse_fwd", kernel_args("collapse_fwd", T, n, C), (x3, h, out))
    return out


def collapse_bwd(x3, h, du, need_dx, dx_dtype, dh_dtype):
    T, n, C = x3.shape
    dx, dh = common.collapse_bwd_outputs(x3, need_dx, dx_dtype, dh_dtype)
    # Without dx the kernel never touches its dx argument: x3 stands in (never written).
    _launch(
        "collapse_bwd",
        kernel_args("collapse_bwd", T, n, C, write_dx=need_dx),
        (x3, h, du, dx if need_dx else x3, dh),
    )
    return dx, dh


def update_fwd(x3, y2, h_post, comb):
    T, n, C = x3.shape
    out = torch.empty(T, n, C, device=x3.device, dtype=x3.dtype)
    _launch("update_fwd", kernel_args("update_fwd", T, n, C), (x3, y2, h_post, comb, out))
    return out


def update_bwd(x3, y2, h_post, comb, dout, dtypes):
    T, n, C = x3.shape
    dx, dy, dh, dcomb = common.update_bwd_outputs(x3, dtypes)
    _launch(
        "update_bwd",
        kernel_args("update_bwd", T, n, C),
        (x3, y2, h_post, comb, dout, dx, dy, dh, dcomb),
    )
    return dx, dy, dh, dcomb


def head_fwd(x3, fn, base, scale, eps, norm_eps):
    """u [T, C] in x3.dtype, and the fp32 mn [T, n], r [T], w [T, n] saved for backward, from
    fn [n, n*C] (read by the kernel as [n, n, C])."""
    T, n, C = x3.shape
    out = torch.empty(T, C, device=x3.device, dtype=x3.dtype)
    mn, r = common.proj_rms_fwd_outputs(x3, n)
    w = torch.empty(T, n, device=x3.device, dtype=torch.float32)
    _launch(
        "head_fwd",
        kernel_args("head_fwd", T, n, C),
        (x3, fn.view(n, n, C), base, scale, out, mn, r, w, float(eps), float(norm_eps)),
    )
    return out, mn, r, w


def head_gate_bwd(x3, du, mn, r, base, scale):
    """The head's dw = <x_i, du> followed by the gate backward: g [T, n], coef [T], dbase [n],
    dscale [1] (fp32)."""
    T, n, C = x3.shape
    args = kernel_args("head_gate_bwd", T, n, C)
    g, coef, dbase, dscale = common.head_gate_bwd_outputs(x3, programs=args[0][0])
    _launch("head_gate_bwd", args, (x3, du, mn, r, base, scale, g, coef, dbase, dscale))
    return common.summed(g, coef, dbase, dscale)
