"""The cuTile backend (megatron_mhc.fusions.cutile): its kernels, its availability, and (on a GPU
cuTile supports) its ops (mhc_collapse, mhc_update, mhc_head) and the mappings' launchers
against the reference, forward and backward.

cuTile has no CPU mode. On CPU every kernel is compiled to Tile IR bytecode with
`cuda.tile.compilation.export_kernel` (the cuTile front end: parsing, typing, tile shapes), in
the exact configurations (tile sizes, dtypes, flags) the launchers would run, for n in
{2, 3, 4, 8} and ragged and real shapes; when the `tileiras` compiler is installed
(`cuda-tile[tileiras]`, not needed otherwise) the kernels are also compiled to cubins for
Ampere and Blackwell. The kernels' math also runs on CPU under a small emulation of the cuTile
operations they use, launched by the backend's own launchers.
The numeric checks need a GPU whose architecture cuTile supports (is_available()): fp32 within
rtol 1e-5 (atol 1e-6 of the tensor's largest magnitude), bf16 within 1e-2, always finite.
MHC_CUTILE_TEST_FORCE=1 runs them on any CUDA GPU (experiments with a newer tileiras).
"""

import io
import itertools
import os
import subprocess
import sys

import pytest
import torch

from megatron_mhc.fusions import cutile, get_backend, reference
from megatron_mhc.fusions import fused_frontend as _frontend
from megatron_mhc.fusions import triton as triton_backend
from megatron_mhc.fusions.cutile import ops
from tests.numerics import DTYPES, TOLERANCES, assert_close, assert_close_to_exact

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

FORCE_GPU = os.environ.get("MHC_CUTILE_TEST_FORCE") == "1" and torch.cuda.is_available()
RUN_GPU = cutile.is_available() or FORCE_GPU
NO_GPU = (
    f"needs a GPU cuTile supports: {cutile.UNAVAILABLE_REASON} "
    "(MHC_CUTILE_TEST_FORCE=1 runs these on any CUDA GPU)"
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


# ----------------------------------------------------------------------------------------------
# CPU: availability, delegation, the reference paths.
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_unavailable_without_gpu_with_the_reason():
    assert cutile.is_available() is False
    reason = cutile.UNAVAILABLE_REASON
    if CT_IMPORT_ERROR is not None:
        assert "cuda.tile cannot be imported" in reason
    else:
        assert reason == "no CUDA device (cuTile has no CPU mode)"
    with pytest.raises(
        ValueError,
        match=r"mhc_kernel_backend='cutile' cannot run here \(.*"
        r"no CUDA device",
    ):
        get_backend("cutile")


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="not a Hopper GPU",
)
def test_unavailable_on_hopper():
    assert cutile.is_available() is False
    assert "does not support Hopper" in cutile.UNAVAILABLE_REASON


def test_architectures():
    for cap in [(8, 0), (8, 6), (8, 9), (10, 0), (10, 3), (12, 0)]:
        assert cutile._arch_reason(cap) is None, cap
    assert cutile._arch_reason((9, 0)) == "cuTile's compiler does not support Hopper (sm_90)"
    for cap in [(7, 0), (7, 5)]:
        assert "does not support sm_7" in cutile._arch_reason(cap)


def test_interface_and_delegation():
    assert set(reference.__all__) <= set(cutile.__all__)
    assert cutile.SAVES_INPUTS_ONLY is True
    assert cutile.hc_mappings is triton_backend.hc_mappings
    assert cutile.sinkhorn is reference.sinkhorn
    assert cutile.hc_static_mappings is reference.hc_static_mappings


def test_import_is_lazy():
    code = (
        "import sys, megatron_mhc.fusions.cutile; "
        "assert 'cuda.tile' not in sys.modules and 'triton' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith(('cuda', 'triton')))"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        timeout=120,
        env={**os.environ, "TORCHDYNAMO_DISABLE": "1"},
    )


def test_float64_and_empty_use_the_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    h = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    comb = torch.rand(3, 4, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        cutile.mhc_collapse(x, h), reference.mhc_collapse(x, h), rtol=0, atol=0
    )
    torch.testing.assert_close(
        cutile.mhc_update(x, y, h, comb), reference.mhc_update(x, y, h, comb), rtol=0, atol=0
    )
    empty = torch.empty(0, 4, 5)
    assert cutile.mhc_collapse(empty, torch.empty(0, 4)).shape == (0, 5)


def test_cpu_tensors_are_a_clear_error():
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        cutile.mhc_collapse(torch.randn(3, 4, 5), torch.rand(3, 4))
    with pytest.raises(ValueError, match="cutile backend: h_pre"):
        cutile.mhc_collapse(torch.randn(3, 4, 5), torch.rand(3, 3))


def _is_pow2(v):
    return v > 0 and v & (v - 1) == 0


def test_tile_sizes():
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


# ----------------------------------------------------------------------------------------------
# CPU: the kernels' math, run by an emulation of the cuTile operations they use.
# ----------------------------------------------------------------------------------------------
class _EmulatedTile:
    """The cuTile operations the kernels use, on CPU torch tensors, as documented: `load` reads
    the tile at a tile index and pads what lies outside the array with 0 (PaddingMode.ZERO),
    `store` drops the out-of-bounds part of a tile, `mma` multiplies fp32 operands in fp32 and
    adds the accumulator. It checks the kernels' indexing, padding and math, not cuTile (its
    compiler or its semantics where they differ from the documentation)."""

    float32, bfloat16, int32 = torch.float32, torch.bfloat16, torch.int32
    PaddingMode = type("PaddingMode", (), {"ZERO": "zero"})

    class Constant:
        def __class_getitem__(cls, item):
            return item

    def __init__(self):
        self.block = (0, 0, 0)

    @staticmethod
    def kernel(fn):
        return fn

    function = kernel
    exp = staticmethod(torch.exp)
    rsqrt = staticmethod(torch.rsqrt)
    where = staticmethod(torch.where)

    def bid(self, axis):
        return self.block[axis]

    @staticmethod
    def _window(index, shape, array_shape):
        src, dst = [], []
        for i, s, dim in zip(index, shape, array_shape):
            lo, hi = i * s, min(i * s + s, dim)
            assert lo < dim, "tile entirely outside the array"
            src.append(slice(lo, hi))
            dst.append(slice(0, hi - lo))
        return tuple(src), tuple(dst)

    def load(self, array, index, shape, padding_mode=None):
        assert padding_mode == "zero" and len(index) == array.dim() == len(shape)
        out = torch.zeros(shape, dtype=array.dtype)
        src, dst = self._window(index, shape, array.shape)
        out[dst] = array[src]
        return out

    def store(self, array, index, tile):
        assert tile.dtype == array.dtype and len(index) == array.dim() == tile.dim()
        src, dst = self._window(index, tile.shape, array.shape)
        array[src] = tile[dst]

    @staticmethod
    def astype(t, dtype):
        return t.to(dtype)

    @staticmethod
    def reshape(t, shape):
        return t.reshape(shape)

    @staticmethod
    def transpose(t):
        assert t.dim() == 2
        return t.t()

    @staticmethod
    def sum(t, axis=None, keepdims=False):
        return t.sum() if axis is None else t.sum(dim=axis, keepdim=keepdims)

    @staticmethod
    def max(t, axis, keepdims=False):
        return t.amax(dim=axis, keepdim=keepdims)

    @staticmethod
    def mma(x, y, acc):
        assert x.dtype == y.dtype == acc.dtype == torch.float32
        return acc + x @ y

    @staticmethod
    def arange(size, dtype):
        return torch.arange(size, dtype=dtype)

    @staticmethod
    def zeros(shape, dtype):
        return torch.zeros(shape, dtype=dtype)

    @staticmethod
    def num_tiles(array, axis, shape):
        return -(-array.shape[axis] // shape[axis])


def _emulated_kernels(ct_emu):
    import megatron_mhc.fusions.cutile.kernels as real  # noqa: F401 - the file, not its ct

    path = real.__file__
    source = open(path).read().replace("import cuda.tile as ct\n", "")
    namespace = {"ct": ct_emu, "__name__": "emulated_cutile_kernels"}
    exec(compile(source, path, "exec"), namespace)
    return namespace["KERNELS"]


@pytest.fixture
def emulated_ops(tile, monkeypatch):
    """`ops` whose launchers run the kernels under the emulation, every grid block in turn, on
    CPU tensors (as on an H100's 132 multiprocessors: several token splits)."""
    ct_emu = _EmulatedTile()
    kernels = _emulated_kernels(ct_emu)

    def launch(name, args, arrays):
        grid, consts = args
        for block in itertools.product(*(range(g) for g in grid)):
            ct_emu.block = block
            kernels[name](*arrays, *consts)

    monkeypatch.setattr(ops, "_launch", launch)
    monkeypatch.setattr(ops, "_num_sms", lambda device: 132)
    # Thousands of tiny tensor ops: torch's intra-op threads only add synchronisation, which
    # costs up to seconds per test on busy shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ops
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,C", [(5, 37), (70, 300)], ids=["small", "blocks"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_kernel_math_emulated(emulated_ops, n, T, C, dtype):
    """The collapse and update kernels through their launchers, forward and backward."""
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(n * 1000 + T)
    x = torch.randn(T, n, C, generator=gen).to(dt)
    y = torch.randn(T, C, generator=gen).to(dt)
    h_pre = torch.rand(T, n, generator=gen)
    h_post = torch.rand(T, n, generator=gen) * 2
    comb = torch.rand(T, n, n, generator=gen)
    du = torch.randn(T, C, generator=gen).to(dt)
    dout = torch.randn(T, n, C, generator=gen).to(dt)

    ref = [t.clone().requires_grad_() for t in (x, h_pre)]
    u_ref = reference.mhc_collapse(*ref)
    u_ref.backward(du)
    assert_close(emulated_ops.collapse_fwd(x, h_pre, dt), u_ref, "collapse forward")
    dx, dh = emulated_ops.collapse_bwd(x, h_pre, du, True, dt, torch.float32)
    assert_close(dx, ref[0].grad, "collapse dx")
    assert_close(dh, ref[1].grad, "collapse dh_pre")
    no_dx, dh2 = emulated_ops.collapse_bwd(x, h_pre, du, False, dt, torch.float32)
    assert no_dx is None
    torch.testing.assert_close(dh2, dh, rtol=0, atol=0)

    ref = [t.clone().requires_grad_() for t in (x, y, h_post, comb)]
    out_ref = reference.mhc_update(*ref)
    out_ref.backward(dout)
    assert_close(emulated_ops.update_fwd(x, y, h_post, comb), out_ref, "update forward")
    grads = emulated_ops.update_bwd(
        x, y, h_post, comb, dout, (dt, dt, torch.float32, torch.float32)
    )
    for got, r, what in zip(grads, ref, ("dx", "dy", "dh_post", "dcomb")):
        assert_close(got, r.grad, f"update {what}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,C", [(5, 37), (70, 300)], ids=["small", "blocks"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_head_math_emulated(emulated_ops, n, T, C, dtype):
    """The head's launchers as ops.Head chains them (forward; gate backward, then proj_rms_bwd
    with the collapse term over several token splits) against the reference's value and
    gradients."""
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(n * 1000 + T + 7)
    K = n * C
    x = torch.randn(T, n, C, generator=gen).to(dt)
    fn = torch.randn(n, K, generator=gen) * K**-0.5
    base = torch.randn(n, generator=gen) * 0.5
    scale = torch.rand(1, generator=gen) + 0.5
    du = torch.randn(T, C, generator=gen).to(dt)
    eps, norm_eps = 1e-6, 1e-6

    ref = [t.clone().requires_grad_() for t in (x, fn, base, scale)]
    u_ref = reference.mhc_head(*ref, eps, norm_eps)
    u_ref.backward(du)
    ref64 = [t.clone().double().requires_grad_() for t in (x, fn, base, scale)]
    reference.mhc_head(*ref64, eps, norm_eps).backward(du.double())

    fn3 = fn.view(n, n, C)
    u, mn, r, w = emulated_ops.head_fwd(x, fn3, base, scale, eps, norm_eps)
    assert_close(u, u_ref, "head forward")
    dx, dfn, dbase, dscale = emulated_ops.head_bwd(x, fn3, base, scale, du, mn, r, w, True, True)
    assert_close(dx.view(x.shape), ref[0].grad, "head dx")
    assert_close(dfn, ref[1].grad, "head dfn")
    assert_close(dbase, ref[2].grad, "head dbase")
    assert_close_to_exact(dscale, ref[3].grad, ref64[3].grad, "head dscale")


def _check_mappings(ops_, n, T, C, dtype, iters, device="cpu"):
    """The mappings' launchers of `ops_` chained as an autograd Function chains them
    (proj_rms_fwd, mhc_gates_fwd; mhc_gates_bwd, proj_rms_bwd) against the reference's values and
    gradients (random dh_pre, dh_post, dcomb); proj_rms_bwd also with the collapse term (against
    autograd of mhc_collapse(x, w) added) and a residual gradient, and with dx or dfn alone."""
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(n * 1000 + T + iters)
    K, M = n * C, n * n + 2 * n

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x = randn(T, n, C).to(dt)
    fn, base, scale = randn(M, K, scale=K**-0.5), randn(M, scale=0.5), randn(3).abs() + 0.5
    dh_pre, dh_post, dcomb = randn(T, n), randn(T, n), randn(T, n, n)
    w, du, residual = randn(T, n).abs(), randn(T, C).to(dt), randn(T, n, C).to(dt)
    eps, norm_eps = 1e-6, 1e-6

    ref = [t.clone().requires_grad_() for t in (x, fn, base, scale)]
    want = reference.mhc_mappings(*ref, iters, eps, norm_eps)
    grads = torch.autograd.grad(want, ref, (dh_pre, dh_post, dcomb), retain_graph=True)
    u = reference.mhc_collapse(ref[0], w)
    dx_collapse = torch.autograd.grad([*want, u], ref[0], (dh_pre, dh_post, dcomb, du))[0]
    ref64 = [t.detach().double().requires_grad_() for t in (x, fn, base, scale)]
    grads64 = torch.autograd.grad(
        reference.mhc_mappings(*ref64, iters, eps, norm_eps),
        ref64,
        (dh_pre.double(), dh_post.double(), dcomb.double()),
    )

    x2 = x.view(T, K)
    mn, r = ops_.proj_rms_fwd(x2, fn, norm_eps)
    got = ops_.mhc_gates_fwd(mn, base, scale, n, iters, eps)
    for g_, w_, what in zip(got, want, ("h_pre", "h_post", "comb")):
        assert_close(g_, w_, f"mappings {what}")

    g, coef, dbase, dscale = ops_.mhc_gates_bwd(
        mn, r, base, scale, dh_pre, dh_post, dcomb, n, K, iters, eps
    )
    dx, dfn = ops_.proj_rms_bwd(x2, fn, g, coef, True, True, dt)
    assert_close(dx.view(x.shape), grads[0], "mappings dx")
    assert_close(dfn, grads[1], "mappings dfn")
    assert_close_to_exact(dbase, grads[2], grads64[2], "mappings dbase")
    assert_close_to_exact(dscale, grads[3], grads64[3], "mappings dscale")

    dx_all, no_dfn = ops_.proj_rms_bwd(
        x2, fn, g, coef, True, False, dt, collapse=(w, du, C), residual=residual.view(T, K)
    )
    assert no_dfn is None
    assert_close(
        dx_all.view(x.shape),
        (dx_collapse.float() + residual.float()).to(dt),
        "mappings dx + collapse dx + residual",
    )
    no_dx, dfn_alone = ops_.proj_rms_bwd(x2, fn, g, coef, False, True, dt)
    assert no_dx is None
    torch.testing.assert_close(dfn_alone, dfn, rtol=0, atol=0)


@pytest.mark.parametrize("iters", [1, 20])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,C", [(5, 37), (70, 300)], ids=["small", "blocks"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_mappings_math_emulated(emulated_ops, n, T, C, dtype, iters):
    """The mappings' kernels through their launchers, dfn over several token splits."""
    _check_mappings(emulated_ops, n, T, C, dtype, iters)


# ----------------------------------------------------------------------------------------------
# GPU: the ops against the reference.
# ----------------------------------------------------------------------------------------------
def _inputs(op, n, lead, C, dtype, gen, variant):
    def randn(*shape):
        return torch.randn(*shape, generator=gen).cuda()

    def rand(*shape, scale=1.0):
        return torch.rand(*shape, generator=gen).mul_(scale).cuda()

    x = randn(*lead, n, C).to(dtype)
    K = n * C
    if op == "mhc_head":
        return [x, randn(n, K).mul_(K**-0.5), randn(n).mul_(0.5), rand(1).add_(0.5)]
    if op in ("mhc_mappings", "mhc_mappings_collapse"):
        M = n * n + 2 * n
        return [x, randn(M, K).mul_(K**-0.5), randn(M).mul_(0.5), rand(3).add_(0.5)]
    gate_lead = () if variant == "static" else lead
    if op == "mhc_collapse":
        return [x, rand(*gate_lead, n)]
    y_dtype = torch.bfloat16 if variant == "bf16_y" else dtype
    return [x, randn(*lead, C).to(y_dtype), rand(*gate_lead, n, scale=2.0), rand(*gate_lead, n, n)]


def _check(op, n, lead, C, dtype_name, variant="plain", seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = _inputs(op, n, tuple(lead), C, DTYPES[dtype_name], gen, variant)
    ref_in = [t.clone().requires_grad_() for t in inputs]
    cut_in = [t.clone().requires_grad_() for t in inputs]
    want = getattr(reference, op)(*ref_in)
    got = getattr(cutile, op)(*cut_in)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, f"{op} output {i}")
    # A gradient for every output (mhc_mappings_collapse: its residual too, as the update's).
    grads = [torch.randn(w.shape, generator=gen).to(device=w.device, dtype=w.dtype) for w in want]
    torch.autograd.backward(want, grads)
    torch.autograd.backward(got, grads)
    if op == "mhc_head":
        ref64 = [t.detach().double().requires_grad_() for t in inputs]
        reference.mhc_head(*ref64).backward(grads[0].double())
    for i, (c, r) in enumerate(zip(cut_in, ref_in)):
        assert c.grad is not None, f"{op}: no gradient for input {i}"
        if op == "mhc_head" and i == 3:
            assert_close_to_exact(c.grad, r.grad, ref64[3].grad, f"{op} grad of scale")
        else:
            assert_close(c.grad, r.grad, f"{op} grad of input {i}")


@pytest.mark.skipif(not RUN_GPU, reason=NO_GPU)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,C", [((5,), 37), ((3, 7), 300), ((2, 33), 1000)])
@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "op", ["mhc_mappings", "mhc_mappings_collapse", "mhc_collapse", "mhc_update", "mhc_head"]
)
def test_op_matches_reference_gpu_ragged(op, n, lead, C, dtype):
    _check(op, n, lead, C, dtype)


@pytest.mark.skipif(not RUN_GPU, reason=NO_GPU)
@pytest.mark.parametrize(
    "op,variant", [("mhc_collapse", "static"), ("mhc_update", "static"), ("mhc_update", "bf16_y")]
)
def test_op_variants_gpu(op, variant):
    _check(op, 4, (3, 7), 300, "fp32", variant)


@pytest.mark.skipif(not RUN_GPU, reason=NO_GPU)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize(
    "op", ["mhc_mappings", "mhc_mappings_collapse", "mhc_collapse", "mhc_update", "mhc_head"]
)
def test_op_matches_reference_gpu_real_size(op, n, dtype):
    _check(op, n, (1024, 4), 4096, dtype)


@pytest.mark.skipif(not RUN_GPU, reason=NO_GPU)
@pytest.mark.parametrize("iters", [1, 20])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,T,C",
    [(n, T, C) for n in (1, 2, 3, 4, 8) for T, C in ((5, 37), (66, 1000))]
    + [(4, 4096, 4096), (8, 4096, 4096)],
)
def test_mappings_launchers_gpu(n, T, C, dtype, iters):
    """The mappings' launchers (which the generic Function of fused_frontend chains) against the
    reference."""
    _check_mappings(ops, n, T, C, dtype, iters, device="cuda")


@pytest.mark.skipif(not RUN_GPU, reason=NO_GPU)
@pytest.mark.parametrize(
    "op", ["mhc_mappings", "mhc_mappings_collapse", "mhc_collapse", "mhc_update", "mhc_head"]
)
def test_saves_only_inputs_gpu(op):
    """The inputs as given, plus the small fp32 per-token tensors: mn, r (mappings; head) and
    h_pre (mappings_collapse) or w (head)."""
    gen = torch.Generator().manual_seed(1)
    inputs = [t.requires_grad_() for t in _inputs(op, 4, (5,), 37, torch.bfloat16, gen, "plain")]
    out = getattr(cutile, op)(*inputs)
    saved = (out[0] if isinstance(out, tuple) else out).grad_fn.saved_tensors
    extra = {
        "mhc_head": [(5, 4), (5,), (5, 4)],
        "mhc_mappings": [(5, 24), (5,)],
        "mhc_mappings_collapse": [(5, 24), (5,), (5, 4)],
    }.get(op, [])
    assert len(saved) == len(inputs) + len(extra)
    for s, t in zip(saved, inputs):
        assert s.data_ptr() == t.data_ptr() and s.shape == t.shape
    for s, shape in zip(saved[len(inputs) :], extra):
        assert tuple(s.shape) == shape and s.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 4])
def test_hc_module_ops_through_the_autograd_functions_emulated(emulated_ops, monkeypatch, n, dtype):
    """What HyperConnectionModule and the learned head run on this backend, through the autograd
    Functions (fused_frontend's Mappings, Update; ops.Head) with the emulated kernels: the mappings
    and collapse, a sublayer, the update (whose gradient of x comes back through the mappings'
    residual), then the head, against the reference composition; every output and gradient."""
    monkeypatch.setattr(emulated_ops, "check_device", lambda *tensors: None)
    dt = DTYPES[dtype]
    T, C = 6, 37
    K, M = n * C, n * n + 2 * n
    gen = torch.Generator().manual_seed(n + 17)
    inputs = [
        torch.randn(T, n, C, generator=gen).to(dt),
        torch.randn(M, K, generator=gen) * K**-0.5,
        torch.randn(M, generator=gen) * 0.5,
        torch.rand(3, generator=gen) + 0.5,
        torch.randn(n, K, generator=gen) * K**-0.5,
        torch.randn(n, generator=gen) * 0.5,
        torch.rand(1, generator=gen) + 0.5,
    ]
    proj = torch.randn(C, C, generator=gen) * C**-0.5
    weights = torch.randn(T, C, generator=gen)

    def run(mappings_collapse, update, head, leaves):
        x, fn, base, scale, head_fn, head_base, head_scale = leaves
        u, h_pre, h_post, comb, residual = mappings_collapse(x, fn, base, scale, 20, 1e-6, 1e-6)
        y = torch.tanh(u.float() @ proj).to(dt)
        streams = update(residual, y, h_post, comb)
        out = head(streams, head_fn, head_base, head_scale, 1e-6, 1e-6)
        (out.float() * weights).sum().backward()
        return [u, h_pre, h_post, comb, streams, out] + [t.grad for t in leaves]

    fused = _frontend.FusedOps("cutile", lambda: emulated_ops)
    got = run(
        fused.mhc_mappings_collapse,
        fused.mhc_update,
        fused.mhc_head,
        [t.clone().requires_grad_() for t in inputs],
    )
    want = run(
        reference.mhc_mappings_collapse,
        reference.mhc_update,
        reference.mhc_head,
        [t.clone().requires_grad_() for t in inputs],
    )
    names = [
        "u",
        "h_pre",
        "h_post",
        "comb",
        "update",
        "head",
        "grad x",
        "grad fn",
        "grad base",
        "grad scale",
        "grad head fn",
        "grad head base",
        "grad head scale",
    ]
    # With bf16 streams every value past the first op carries bf16 roundings made at different
    # places (a fused kernel rounds once), so the whole chain is held to the bf16 tolerance.
    rtol, atol = TOLERANCES[dt]
    for g, w, name in zip(got, want, names):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.isfinite(g).all(), name
        torch.testing.assert_close(
            g.float(),
            w.float(),
            rtol=rtol,
            atol=atol * w.float().abs().max().item(),
            msg=lambda m, name=name: f"{name}: {m}",
        )
