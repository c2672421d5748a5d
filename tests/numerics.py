"""The numerics contract every kernel test checks against the pure-PyTorch reference.

`assert_close(got, want, name)`: same dtype and shape, finite, and within rtol 1e-5 (atol 1e-6 of
the reference tensor's largest magnitude, for entries near zero) for fp32, 1e-2 for bf16.
`assert_close_to_exact(got, want32, want64, name)`: for a sum over all tokens that cancels (the
gating factors' gradients, where the fp32 reference itself can be ~1e-5 off): within the fp32
tolerance of the reference, or no further from the float64 result than 1e-5 of it plus twice
the fp32 reference's own error.
"""

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (rtol, atol as a fraction of the reference tensor's largest magnitude)
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-2)}


def assert_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != reference {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: not finite"
    rtol, atol = TOLERANCES[torch.float32 if want.dtype == torch.float32 else torch.bfloat16]
    scale = want.detach().float().abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.detach().float(), want.detach().float(), rtol=rtol,
                               atol=atol * max(scale, 1e-6), msg=lambda m: f"{name}: {m}")


def assert_close_to_exact(got, want32, want64, name: str) -> None:
    try:
        assert_close(got, want32, name)
    except AssertionError:
        exact = want64.detach().double()
        err = (got.detach().double() - exact).abs()
        bound = 1e-5 * exact.abs() + 2 * (want32.detach().double() - exact).abs()
        assert (err <= bound).all(), f"{name}: {got} vs float64 {exact} (fp32 ref {want32})"
