"""The numerics contract a fused op meets against the pure-PyTorch reference.

`mismatch(got, want)`: same dtype and shape, finite, and within rtol 1e-5 (atol 1e-6 of the
reference tensor's largest magnitude, for entries near zero) for fp32, 1e-2 for bf16.
`mismatch_from_exact(got, want32, want64)`: for a sum over all tokens that cancels (the
parameters' gradients, where the fp32 reference itself can be ~1e-5 off): within the fp32
tolerance of the reference, or no further from the float64 result than 1e-5 of it plus twice the
fp32 reference's own error. Both return None when the contract holds, else what breaks it. The
kernel tests assert them (tests/numerics.py); `auto` checks them on the device it runs on
(`verification.py`).
"""

import torch

# (rtol, atol as a fraction of the reference tensor's largest magnitude)
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-2)}


def mismatch(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None when got meets the contract against the reference want, else why not."""
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != reference {want.dtype}"
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.isfinite(got).all():
        return "not finite"
    rtol, atol = TOLERANCES[torch.float32 if want.dtype == torch.float32 else torch.bfloat16]
    scale = want.detach().float().abs().max().item() if want.numel() else 1.0
    try:
        torch.testing.assert_close(
            got.detach().float(), want.detach().float(), rtol=rtol, atol=atol * max(scale, 1e-6)
        )
    except AssertionError as err:  # its report on one line: it goes into logs and warnings
        return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return None


def mismatch_from_exact(
    got: torch.Tensor, want32: torch.Tensor, want64: torch.Tensor
) -> str | None:
    """`mismatch`, or, failing it, no further from the float64 result than the fp32 reference's
    own error allows; None when either holds."""
    problem = mismatch(got, want32)
    if problem is None:
        return None
    exact = want64.detach().double()
    err = (got.detach().double() - exact).abs()
    bound = 1e-5 * exact.abs() + 2 * (want32.detach().double() - exact).abs()
    if (err <= bound).all():
        return None
    return f"{problem}; also off the float64 result by up to {err.max().item():.3g}"
