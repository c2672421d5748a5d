"""The numerics contract every kernel test checks against the pure-PyTorch reference, as asserts.

The contract itself is `megatron_mhc.fusions.numerics` (the same one `auto` checks on its
device): `assert_close(got, want, name)` asserts `mismatch`, `assert_close_to_exact(got, want32,
want64, name)` asserts `mismatch_from_exact` (for a sum over all tokens that cancels).
"""

import torch

from megatron_mhc.fusions.numerics import TOLERANCES, mismatch, mismatch_from_exact

__all__ = ["DTYPES", "TOLERANCES", "assert_close", "assert_close_to_exact"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def assert_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    problem = mismatch(got, want)
    assert problem is None, f"{name}: {problem}"


def assert_close_to_exact(got, want32, want64, name: str) -> None:
    problem = mismatch_from_exact(got, want32, want64)
    assert problem is None, f"{name}: {problem} (fp32 ref {want32})"
