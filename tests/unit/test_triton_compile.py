"""The Triton kernels compile for Hopper (sm_90) and Blackwell (sm_100) without a GPU, in the exact
launch configurations the backend uses on one (GPU tile sizes, num_warps, dtypes), with no
register spills and within an SM's shared memory.

Triton's own compiler runs ahead of time (`tests/triton_aot.py`: source -> TTIR -> TTGIR -> LLVM
-> PTX -> cubin with the ptxas Triton bundles), which the interpreter tests do not exercise: the
layouts of the 3-D register tiles, `tl.dot` with `input_precision="ieee"`, register allocation.
What it cannot show: speed, and Triton's GPU-only checks at load time (none beyond shared memory,
checked here against the 227 KiB a block may use on H100 and B200).
"""

import pytest
import torch

from tests.triton_aot import compile_launch, launches, resource_usage

MAX_SHARED_BYTES = 227 * 1024
CASES = [
    (1, torch.bfloat16),
    (2, torch.bfloat16),
    (3, torch.bfloat16),
    (4, torch.bfloat16),
    (8, torch.bfloat16),
    (4, torch.float32),
    (8, torch.float32),
]


@pytest.mark.parametrize("arch", [90, 100], ids=["sm_90", "sm_100"])
@pytest.mark.parametrize("n,dtype", CASES, ids=[f"n{n}-{str(d)[6:]}" for n, d in CASES])
def test_every_launch_compiles_without_spills(arch, n, dtype):
    problems = []
    for launch in launches(n, 8192, 7168, dtype):
        use = resource_usage(compile_launch(launch, arch), arch)
        if use.spill_bytes or use.shared_bytes > MAX_SHARED_BYTES:
            problems.append(
                f"{launch.kernel_name} {launch.constexprs()} "
                f"warps={launch.kwargs.get('num_warps', 4)}: {use}"
            )
    assert not problems, "\n".join(problems)
