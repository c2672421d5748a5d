"""`auto`'s check on this device as a table: what `mhc_kernel_backend=auto` will pick, and why.

    python -m megatron_mhc.transformer.kernel_check [--n 4] [--hidden C] [--tokens T]
        [--dtype bf16] [--type mhc] [--contract mean] [--repeats 3]

Checks every fused backend that can run in this process (on CPU: Triton in its interpreter when
TRITON_INTERPRET=1 is in the environment; defaults then shrink to C = 64, T = 16, as the
interpreter is slow) against the reference, op by op at T tokens and at a ragged count, then
times the HC module's forward and backward with each backend that passed and the reference.
Exit status 1 when a backend failed its check. It lives beside the HC module because it times
the module (`megatron_mhc.fusions.auto_backend` does the rest).
"""

import argparse
import math
import sys

import torch

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.fusions import auto_backend, verification
from megatron_mhc.fusions.backends import FUSED_BACKENDS, get_backend, runnable_fused_backends
from megatron_mhc.transformer.hyper_connection import time_hc_module

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_config(
    n: int,
    hidden: int,
    dtype: torch.dtype,
    mhc_type: str = "mhc",
    contract: str = "learned",
    backend: str = "auto",
):
    """The config of a model whose HC modules have n streams of width hidden in dtype."""
    return MHCTransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=1,
        mhc_num_residual_streams=n,
        mhc_type=mhc_type,
        mhc_output_contract=contract,
        mhc_kernel_backend=backend,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
    )


def table(choice: auto_backend.Selection) -> str:
    """The per-op comparison, the timings and the choice, one line each."""
    lines = [f"{'backend':8} {'op':24} {'tokens':>7} {'max rel err':>12}  result"]
    for checks in choice.checks.values():
        for c in checks:
            result = "ok" if c.passed else f"FAILED: {c.error}"
            lines.append(f"{c.backend:8} {c.op:24} {c.tokens:>7} {c.worst:>12.2e}  {result}")
    lines.append(f"{'backend':8} {'HC fwd+bwd (ms)':>24}")
    for backend, ms in choice.times_ms.items():
        lines.append(f"{backend:8} {ms if ms < math.inf else float('nan'):>24.3f}")
    lines.append(f"auto picks: {choice.summary()}")
    return "\n".join(lines)


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        prog="python -m megatron_mhc.transformer.kernel_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--n", type=int, default=4, help="residual streams")
    parser.add_argument("--hidden", type=int, default=4096 if cuda else 64, help="C")
    parser.add_argument(
        "--tokens", type=int, default=4096 if cuda else 16, help="tokens per micro-batch (s·b)"
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--type", choices=("mhc", "hc", "hc_static"), default="mhc")
    parser.add_argument(
        "--contract",
        choices=("mean", "learned"),
        default="learned",
        help="output contract (learned: the head is checked too)",
    )
    parser.add_argument("--repeats", type=int, default=auto_backend.TIMING_REPEATS)
    args = parser.parse_args(argv)
    for flag in ("n", "hidden", "tokens", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}={getattr(args, flag)} must be >= 1")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    config = check_config(args.n, args.hidden, _DTYPES[args.dtype], args.type, args.contract)
    candidates = runnable_fused_backends()
    print(
        f"mHC kernel check on {device}: n={args.n} C={args.hidden} tokens={args.tokens} "
        f"(ragged {verification.ragged_tokens(args.tokens)}) {args.dtype}, ops "
        f"{', '.join(verification.ops_used(config))}"
    )
    for name in FUSED_BACKENDS:
        if name not in candidates:
            try:
                get_backend(name)
            except ValueError as err:
                print(f"not checked: {err}")
    choice = auto_backend.choose(
        config, args.tokens, device, candidates, timer=time_hc_module, repeats=args.repeats
    )
    print(table(choice))
    return 1 if choice.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
