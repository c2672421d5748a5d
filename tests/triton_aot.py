"""Compile the Triton kernels for a GPU without one: the launches the Triton backend would make,
compiled ahead of time to cubins, with their register, spill and shared-memory use.

`launches(n, T, C, dtype)` runs every launcher of `megatron_mhc.fusions.triton.ops` with the GPU
tile sizes on CPU tensors, with a recorder standing in for the kernels module, so it returns the
exact (kernel, arguments, constexprs, num_warps) of each launch a GPU run of those shapes would
make. `compile_launch(launch, arch)` compiles one with Triton's own compiler (`triton.compile` on
an `ASTSource`, target `cuda:<arch>`, ptxas bundled with Triton) and `resource_usage(compiled,
arch)` reads the registers and spills ptxas reports, and Triton's shared memory. Pointer
arguments are declared 16-byte aligned, as torch's allocations are and as Triton's JIT
specialises them.

    python -m tests.triton_aot          # the table of docs/kernels.md ("Compiled for GPUs")
"""

import functools
import os
import re
import subprocess
import tempfile
from typing import NamedTuple

import torch

TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Launch(NamedTuple):
    kernel_name: str
    kernel: object  # triton JITFunction
    args: tuple
    kwargs: dict

    def constexprs(self) -> dict:
        return {k: v for k, v in self.kwargs.items() if k != "num_warps"}


class _RecordingKernels:
    """Stands in for the kernels module: `kernels.X[grid](*args, **kwargs)` records a Launch."""

    def __init__(self, real):
        self._real, self.launches = real, []

    def __getattr__(self, name):
        kernel = getattr(self._real, name)
        launches = self.launches

        class _Grid:
            def __getitem__(self, _grid):
                return lambda *args, **kwargs: launches.append(Launch(name, kernel, args, kwargs))

        return _Grid()


def launches(n: int, T: int, C: int, dtype: torch.dtype):
    """Every launch of the Triton backend's ops for T tokens, n streams, C channels, streams and
    sublayer outputs in `dtype`, with the GPU tile sizes."""
    from megatron_mhc.fusions.triton import kernels, ops

    recorder = _RecordingKernels(kernels)
    saved = ops.kernels, ops.BLOCK_MODE
    ops.kernels, ops.BLOCK_MODE = recorder, "gpu"
    try:
        K, M = n * C, n * n + 2 * n
        x2 = torch.empty(T, K, dtype=dtype)
        x3 = x2.view(T, n, C)
        y = torch.empty(T, C, dtype=dtype)
        per_token = {size: torch.empty(T, size) for size in {n, M}}
        gates, maps = per_token[n], per_token[M]
        comb, r = torch.empty(T, n, n), torch.empty(T)
        f32 = torch.float32
        # mhc_mappings / mhc_mappings_collapse
        ops.proj_rms_fwd(x2, torch.empty(M, K), 1e-6)
        ops.mhc_gates_fwd(maps, torch.empty(M), torch.empty(3), n, 20, 1e-6)
        ops.mhc_gates_bwd(
            maps, r, torch.empty(M), torch.empty(3), gates, gates, comb, n, K, 20, 1e-6
        )
        ops.proj_rms_bwd(x2, torch.empty(M, K), maps, r, True, True, dtype)
        ops.proj_rms_bwd(
            x2, torch.empty(M, K), maps, r, True, True, dtype, collapse=(gates, y, C), residual=x2
        )
        # mhc_collapse, mhc_update
        ops.collapse_fwd(x3, gates, dtype)
        ops.collapse_bwd(x3, gates, y, True, dtype, f32)
        ops.collapse_bwd(x3, gates, y, False, dtype, f32)
        ops.update_fwd(x3, y, gates, comb)
        ops.update_bwd(x3, y, gates, comb, x3, (dtype, dtype, f32, f32))
        # mhc_head
        ops.head_fwd(x3, torch.empty(n, K), torch.empty(n), torch.empty(1), 1e-6, 1e-6)
        ops.head_gate_bwd(x3, y, gates, r, torch.empty(n), torch.empty(1))
        ops.proj_rms_bwd(x2, torch.empty(n, K), gates, r, True, True, dtype, collapse=(gates, y, C))
    finally:
        ops.kernels, ops.BLOCK_MODE = saved
    return recorder.launches


def _signature(launch: Launch):
    signature, attrs = {}, {}
    params = launch.kernel.params
    values = list(launch.args) + [launch.kwargs[p.name] for p in params[len(launch.args) :]]
    for index, (param, value) in enumerate(zip(params, values, strict=True)):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    return signature, attrs


def compile_launch(launch: Launch, arch: int):
    """The launch compiled for sm_<arch> (a triton CompiledKernel: .asm["cubin"], .metadata)."""
    return _compile(launch.kernel, arch, launch.kwargs.get("num_warps", 4), *_frozen(launch))


def _frozen(launch: Launch):
    signature, attrs = _signature(launch)
    return (
        tuple(signature.items()),
        tuple(sorted(launch.constexprs().items())),
        tuple((k, tuple(map(tuple, v))) for k, v in attrs.items()),
    )


@functools.cache
def _compile(kernel, arch, num_warps, signature, constexprs, attrs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(
        fn=kernel,
        signature=dict(signature),
        constexprs=dict(constexprs),
        attrs={k: [list(a) for a in v] for k, v in attrs},
    )
    return triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
    )


class ResourceUsage(NamedTuple):
    registers: int
    spill_bytes: int  # spill stores + spill loads, per thread
    shared_bytes: int  # Triton's dynamic shared memory (the metadata)


def resource_usage(compiled, arch: int) -> ResourceUsage:
    """What ptxas reports for the compiled kernel's PTX, run as Triton runs it (`-v`, same
    ptxas, same register-allocation option)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        out = subprocess.run(
            [
                get_ptxas(arch).path,
                "-lineinfo",
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={sm_arch_from_capability(arch)}",
                ptx.name,
                "-o",
                os.devnull,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    registers = re.search(r"Used (\d+) registers", out)
    if spills is None or registers is None:
        raise RuntimeError(f"ptxas -v printed no resource usage:\n{out}")
    return ResourceUsage(
        int(registers.group(1)),
        int(spills.group(1)) + int(spills.group(2)),
        compiled.metadata.shared,
    )


def _describe(launch: Launch) -> str:
    consts = launch.constexprs()
    flags = [k for k, v in consts.items() if v is True]
    tiles = [f"{k}={v}" for k, v in consts.items() if k.startswith(("BLOCK", "NP"))]
    return " ".join([*tiles, f"warps={launch.kwargs.get('num_warps', 4)}", *flags])


if __name__ == "__main__":
    print(
        "| n | kernel | launch | sm_90: registers / spilled B / shared B "
        "| sm_100: registers / spilled B / shared B |"
    )
    print("|---|---|---|---|---|")
    for n in (2, 4, 8):
        seen = set()
        for launch in launches(n, 8192, 7168, torch.bfloat16):
            key = (launch.kernel_name, _describe(launch))
            if key in seen:
                continue
            seen.add(key)
            cells = []
            for arch in (90, 100):
                use = resource_usage(compile_launch(launch, arch), arch)
                cells.append(f"{use.registers} / {use.spill_bytes} / {use.shared_bytes}")
            print(f"| {n} | `{launch.kernel_name}` | {key[1]} | {cells[0]} | {cells[1]} |")
