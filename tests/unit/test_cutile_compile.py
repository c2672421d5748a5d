"""The cuTile kernels compile, without a GPU, in the exact configurations the launchers use.

cuTile has no CPU mode. Every kernel is compiled to Tile IR bytecode with
`cuda.tile.compilation.export_kernel` (the cuTile front end: parsing, typing, tile shapes), in
the exact configurations (tile sizes, dtypes, flags) the launchers would run, for n in
{2, 3, 4, 8} and ragged and real shapes; when the `tileiras` compiler is installed
(`cuda-tile[tileiras]`, not needed otherwise) the kernels are also compiled to cubins for
Ampere and Blackwell. The tile sizes of every launch cover the arrays within their element
budgets. The kernels' math is checked with the other backends' in tests/unit/test_fused_kernels.py.
"""

import io
import sys

import pytest

from megatron_mhc.fusions.cutile import ops
from tests.numerics import DTYPES

try:
    import cuda.tile as ct
    from cuda.tile.compilation import (
        ArrayConstraint,
        CallingConvention,
        KernelSignature,
        ScalarConstraint,
        export_kernel,
    )

    CT_IMPORT_ERROR = None
except Exception as err:  # noqa: BLE001 - any broken install
    ct = None
    CT_IMPORT_ERROR = f"{type(err).__name__}: {err}"

# The Tile IR bytecode version of the compiler the architecture notes name (tileiras 13.2).
BYTECODE_VERSION = "13.2"
KERNEL_NAMES = (
    "proj_rms_fwd",
    "proj_rms_bwd",
    "mhc_gates_fwd",
    "mhc_gates_bwd",
    "collapse_fwd",
    "collapse_bwd",
    "update_fwd",
    "update_bwd",
    "head_fwd",
    "head_gate_bwd",
)


@pytest.fixture
def tile():
    if CT_IMPORT_ERROR is not None:
        why = (
            f"cuda.tile cannot be imported ({CT_IMPORT_ERROR}): the cuTile kernels are not "
            "checked at all; fix the install (pip install cuda-tile)"
        )
        print(why, file=sys.stderr)
        pytest.skip(why)
    return ct


# ----------------------------------------------------------------------------------------------
# CPU: compile every kernel (front end to Tile IR bytecode; cubin when tileiras is installed).
# ----------------------------------------------------------------------------------------------
def _array(dtype, ndim, index_dtype):
    return ArrayConstraint(
        dtype,
        ndim,
        index_dtype=index_dtype,
        stride_lower_bound_incl=0,
        alias_groups=(),
        may_alias_internally=False,
        stride_constant=(None,) * (ndim - 1) + (1,),
    )


def _launch_args(name, T, n, C, m=None, **flags):
    """ops.kernel_args of kernel `name` as its launcher computes it for x [T, n, C]: the
    projections read x as [T, K] (as [T, n, C] with proj_rms_bwd's collapse term) against m rows
    of fn (default: the mappings' n*n + 2n; the head's backward: n)."""
    if name.startswith("proj_rms"):
        streams, length = (n, C) if flags.get("collapse") else (1, n * C)
        return ops.kernel_args(name, T, streams, length, m=m or n * n + 2 * n, **flags)
    return ops.kernel_args(name, T, n, C, **flags)


def _signature(name, T, n, C, dtype, index_dtype=None, m=None, **flags):
    """The KernelSignature of kernel `name` as the launcher would run it: streams, sublayer
    output and gradients in `dtype`, gates and mappings fp32, the arrays that the flags leave
    unused as the launcher's placeholders; the constants from ops.kernel_args."""
    x = {"fp32": ct.float32, "bf16": ct.bfloat16}[dtype]
    f = ct.float32
    index_dtype = index_dtype or ct.int32

    def a(d, nd):
        return _array(d, nd, index_dtype)

    # The [pre | post | res] parts of mn, base, g and dbase: [T, n], [T, n], [T, n, n] views.
    def parts(nd):
        return [a(f, nd), a(f, nd), a(f, nd + 1)]

    write_dfn, collapse = flags.get("write_dfn", True), flags.get("collapse", False)
    arrays = {
        # x [T, K], fn, mn, r, norm_eps
        "proj_rms_fwd": [a(x, 2), a(f, 2), a(f, 2), a(f, 1), ScalarConstraint(f)],
        # x, fn, g, coef, dx, dfn partials (or x), w (or g), du (or g), residual (or x)
        "proj_rms_bwd": [
            a(x, 3),
            a(f, 3),
            a(f, 2),
            a(f, 1),
            a(x, 3),
            a(f, 4) if write_dfn else a(x, 3),
            a(f, 2),
            a(x if collapse else f, 2),
            a(x, 3),
        ],
        # mn parts, base parts, scale, h_pre, h_post, comb, iters, eps
        "mhc_gates_fwd": [
            *parts(2),
            *parts(1),
            a(f, 1),
            a(f, 2),
            a(f, 2),
            a(f, 3),
            ScalarConstraint(ct.int32),
            ScalarConstraint(f),
        ],
        # mn parts, r, base parts, scale, dh_pre, dh_post, dcomb, g parts, coef, dbase parts,
        # dscale, K, iters, eps
        "mhc_gates_bwd": [
            *parts(2),
            a(f, 1),
            *parts(1),
            a(f, 1),
            a(f, 2),
            a(f, 2),
            a(f, 3),
            *parts(2),
            a(f, 1),
            *parts(2),
            a(f, 2),
            ScalarConstraint(ct.int32),
            ScalarConstraint(ct.int32),
            ScalarConstraint(f),
        ],
        "collapse_fwd": [a(x, 3), a(f, 2), a(x, 2)],
        "collapse_bwd": [a(x, 3), a(f, 2), a(x, 2), a(x, 3), a(f, 2)],
        "update_fwd": [a(x, 3), a(x, 2), a(f, 2), a(f, 3), a(x, 3)],
        "update_bwd": [
            a(x, 3),
            a(x, 2),
            a(f, 2),
            a(f, 3),
            a(x, 3),
            a(x, 3),
            a(x, 2),
            a(f, 2),
            a(f, 3),
        ],
        # x, fn [n, n, C], base, scale, out, mn, r, w, eps, norm_eps
        "head_fwd": [
            a(x, 3),
            a(f, 3),
            a(f, 1),
            a(f, 1),
            a(x, 2),
            a(f, 2),
            a(f, 1),
            a(f, 2),
            ScalarConstraint(f),
            ScalarConstraint(f),
        ],
        "head_gate_bwd": [
            a(x, 3),
            a(x, 2),
            a(f, 2),
            a(f, 1),
            a(f, 1),
            a(f, 1),
            a(f, 2),
            a(f, 1),
            a(f, 2),
            a(f, 1),
        ],
    }[name]
    _grid, consts = _launch_args(name, T, n, C, m, **flags)
    return KernelSignature([*arrays, *consts], CallingConvention.cutile_python_v1())


def _configs(name, n):
    """The launch configurations beyond (T, n, C, dtype): proj_rms_bwd runs for the mappings
    (with every term) and for the head (M = n rows, the collapse term); the others have one."""
    if name == "proj_rms_bwd":
        return [dict(collapse=True, residual=True), dict(m=n, collapse=True)]
    return [{}]


def _variants(name, n):
    """The launchers' other flags: a backward without dx (x needs no gradient) or without dfn,
    the mappings' projection backward without the collapse and residual terms."""
    if name == "collapse_bwd":
        return [dict(write_dx=False)]
    if name == "proj_rms_bwd":
        return [
            dict(),
            dict(write_dx=False),
            dict(write_dfn=False, residual=True),
            dict(m=n, collapse=True, write_dfn=False),
        ]
    return []


def _export(name, signature, **kwargs) -> bytes:
    from megatron_mhc.fusions.cutile import kernels

    buf = io.BytesIO()
    export_kernel(kernels.KERNELS[name], [signature], buf, **kwargs)
    return buf.getvalue()


# The gates kernels have only fp32 arrays: the stream dtype does not change them.
BYTECODE_CASES = [
    (name, dtype)
    for name in KERNEL_NAMES
    for dtype in DTYPES
    if dtype == "fp32" or not name.startswith("mhc_gates")
]


@pytest.mark.parametrize(
    "T,C", [(5, 37), (70, 300), (4096, 4096)], ids=["ragged", "ragged2", "real"]
)
@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("name,dtype", BYTECODE_CASES)
def test_kernel_compiles_to_tile_ir_bytecode(tile, name, dtype, n, T, C):
    for config in _configs(name, n):
        sig = _signature(name, T, n, C, dtype, **config)
        for gpu in ("sm_80", "sm_100"):
            code = _export(
                name,
                sig,
                gpu_code=gpu,
                output_format="tileir_bytecode",
                bytecode_version=BYTECODE_VERSION,
            )
            assert isinstance(code, bytes) and len(code) > 0, (name, n, T, C, dtype, gpu, config)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_kernel_compiles_variants(tile, name):
    """int64 indexing (tensors past 2**31 elements) and the launchers' other flags."""
    for config in _configs(name, 4):
        sig = _signature(name, 4096, 4, 4096, "bf16", index_dtype=ct.int64, **config)
        assert _export(
            name,
            sig,
            gpu_code="sm_100",
            output_format="tileir_bytecode",
            bytecode_version=BYTECODE_VERSION,
        )
    for config in _variants(name, 4):
        sig = _signature(name, 5, 4, 37, "fp32", **config)
        assert _export(
            name,
            sig,
            gpu_code="sm_80",
            output_format="tileir_bytecode",
            bytecode_version=BYTECODE_VERSION,
        )


@pytest.mark.parametrize("gpu,n", [("sm_100", 2), ("sm_120", 8), ("sm_80", 4)])
def test_kernel_compiles_to_cubin(tile, gpu, n):
    """The whole compiler (tileiras, ptxas) when installed: skipped without it."""
    for name in KERNEL_NAMES:
        for config in _configs(name, n):
            sig = _signature(name, 4096, n, 4096, "bf16", **config)
            try:
                code = _export(name, sig, gpu_code=gpu, output_format="cubin")
            except FileNotFoundError as err:
                pytest.skip(f"tileiras is not installed ({err})")
            assert len(code) > 0, (name, gpu, n, config)


def test_tiles_are_powers_of_two_within_budget_and_grids_cover_every_element():
    """The grids cover every token and channel, the tiles are powers of two within their
    element budgets."""
    for n in (1, 2, 3, 4, 8):
        for T, C in [(1, 1), (5, 37), (4096, 4096)]:
            for name in KERNEL_NAMES:
                for config in _configs(name, n) + _variants(name, n):
                    grid, consts = _launch_args(name, T, n, C, num_sms=4, **config)
                    if name == "proj_rms_fwd":  # grid (token tiles,)
                        tiles = bt, bk, mp = consts
                        assert grid[0] * bt >= T and mp >= n * n + 2 * n
                        assert bt * bk * mp <= ops.PROJ_PRODUCT_ELEMS
                    elif name == "proj_rms_bwd":  # grid (K tiles, streams, token splits)
                        per_split, *tiles = consts[:4]
                        bt, bk, mp = tiles
                        streams, length = (n, C) if config.get("collapse") else (1, n * C)
                        assert grid[0] * bk >= length and grid[1] == streams
                        assert grid[2] * per_split * bt >= T
                        assert (grid[2] - 1) * per_split * bt < T  # no empty split
                        assert mp >= config.get("m", n * n + 2 * n)
                        assert bt * bk * mp <= ops.PROJ_PRODUCT_ELEMS
                        assert bk * mp <= max(ops.TILE_ELEMS, 8 * mp)
                    elif name.startswith("mhc_gates"):  # grid (token tiles,)
                        tiles = bt, p = consts
                        assert grid[0] * bt >= T and p >= max(n, 2)
                        assert bt * p * p <= max(ops.SINKHORN_TILE_ELEMS, p * p)
                    else:
                        tiles = bt, p, bc = consts[:3]
                        assert grid[0] * bt >= T and p >= max(n, 2)
                        if name in ("collapse_fwd", "update_fwd"):
                            assert grid[1] * bc >= C
                        product = bt * p * bc * (1 if name.startswith("collapse") else p)
                        assert product <= max(ops.TILE_ELEMS, p * p * 32)
                    assert all(t > 0 and t & (t - 1) == 0 for t in tiles), (name, tiles)
