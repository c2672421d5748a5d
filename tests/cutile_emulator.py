"""The cuTile kernels on CPU: a small emulation of the cuTile operations they use.

cuTile has no CPU mode. `emulate_cutile()` makes the cuTile backend's own launchers
(`megatron_mhc.fusions.cutile.ops`) run its kernels (the package `cutile/kernels/`, imported with
`EmulatedTile` as its `cuda.tile`) on CPU tensors, every grid block in turn, as on an H100's 132
multiprocessors (several token splits of the reductions over tokens): the package's ops and the
autograd Functions of the front end then run as on a GPU. It checks the kernels' indexing,
padding and math against the documented semantics, not cuTile (its compiler, or its semantics
where they differ from the documentation). Meant for a worker process of the tests
(`tests.triton_interpreter`): it patches the launchers for the rest of the process.
"""

import importlib
import itertools
import sys
import types
from unittest import mock

import torch


class EmulatedTile:
    """The cuTile operations the kernels use, on CPU torch tensors, as documented: `load` reads
    the tile at a tile index and pads what lies outside the array with 0 (PaddingMode.ZERO),
    `store` drops the out-of-bounds part of a tile, `mma` multiplies fp32 operands in fp32 and
    adds the accumulator."""

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
        for i, s, dim in zip(index, shape, array_shape, strict=True):
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


def emulated_kernels(ct: EmulatedTile) -> dict:
    """`kernels.KERNELS` of the cuTile backend, its kernel package imported afresh with `ct` as
    `cuda.tile` (which need not be installed). sys.modules and the backend package get back what
    they held: the emulated modules live on only in the kernels returned."""
    from megatron_mhc.fusions import cutile

    package = f"{cutile.__name__}.kernels"
    emulated_cuda = types.ModuleType("cuda")
    emulated_cuda.tile = ct
    held = cutile.__dict__.get("kernels")
    try:
        with mock.patch.dict(sys.modules, {"cuda": emulated_cuda, "cuda.tile": ct}):
            for name in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
                del sys.modules[name]
            return importlib.import_module(package).KERNELS
    finally:
        # The import set the fresh package as the backend package's attribute.
        if held is None:
            cutile.__dict__.pop("kernels", None)
        else:
            cutile.kernels = held


def emulate_cutile() -> None:
    """From now on in this process, the cuTile launchers run the emulated kernels on CPU."""
    from megatron_mhc.fusions.cutile import ops

    if getattr(ops._launch, "emulated", False):
        return
    ct = EmulatedTile()
    kernels = emulated_kernels(ct)

    def launch(name, args, arrays):
        grid, consts = args
        for block in itertools.product(*(range(g) for g in grid)):
            ct.block = block
            kernels[name](*arrays, *consts)

    launch.emulated = True
    ops._launch = launch
    ops.check_device = lambda *tensors: None
