"""The numerics contract every kernel test checks against the pure-PyTorch reference, as asserts.

The contract itself is `megatron_mhc.fusions.numerics` (the same one `auto` checks on its
device): `assert_close(got, want, name)` asserts `mismatch`, `assert_close_to_exact(got, want32,
want64, name)` asserts `mismatch_from_exact` (for a sum over all tokens that cancels).
`assert_close_to_scale(got, want, rtol, name)` compares a whole tensor (say a gradient) computed
another way (another layout, kernel or order of a sum) relative to its largest element.
"""

import torch

from megatron_mhc.fusions.numerics import TOLERANCES, mismatch, mismatch_from_exact

__all__ = ["DTYPES", "TOLERANCES", "assert_close", "assert_close_to_exact", "assert_close_to_scale"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def assert_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    problem = mismatch(got, want)
    assert problem is None, f"{name}: {problem}"


def assert_close_to_exact(got, want32, want64, name: str) -> None:
    problem = mismatch_from_exact(got, want32, want64)
    assert problem is None, f"{name}: {problem} (fp32 ref {want32})"


def assert_close_to_scale(got, want, rtol: float, name: str, atol_scale: float | None = None):
    """`got` equals `want` to `rtol` elementwise, with an absolute tolerance of `atol_scale` (by
    default `rtol`) times the largest |want|: its small elements are differences of large terms,
    summed in another order."""
    atol = (rtol if atol_scale is None else atol_scale) * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
