"""The ops of a backend against the reference, at a model's shapes: the fusions' own contract.

Each op a model uses (`ops_used`) runs forward and backward on fresh random inputs at the
model's n, C and dtypes, once with the backend and once with the reference
(`megatron_mhc.fusions.reference`, the same functions under the same names), and every output
and input gradient is held to the numerics contract (`numerics.py`). A backend that raises fails
its check; it never crashes the caller. `auto` runs this check before it times the backends
that passed (`auto_backend.py`).
"""

import contextlib
import dataclasses
from types import ModuleType

import torch

from megatron_mhc.fusions import numerics, reference

# Ops whose inputs after the streams are parameters: their gradients are sums over all tokens.
_PARAMETER_OPS = ("mhc_mappings_collapse", "mhc_head", "hc_mappings")
_INPUT_NAMES = {
    "mhc_mappings_collapse": ("x", "fn", "base", "scale"),
    "mhc_head": ("x", "fn", "base", "scale"),
    "hc_mappings": ("x", "fn", "base", "scale"),
    "mhc_collapse": ("x", "h_pre"),
    "mhc_update": ("x", "y", "h_post", "comb"),
}


def ops_used(config) -> tuple[str, ...]:
    """The mHC ops a model built from config runs (the HC modules, the update, the head)."""
    mappings = {
        "mhc": ("mhc_mappings_collapse",),
        "hc": ("hc_mappings", "mhc_collapse"),
        "hc_static": ("mhc_collapse",),
    }[config.mhc_type]
    head = ("mhc_head",) if config.mhc_output_contract == "learned" else ()
    return (*mappings, "mhc_update", *head)


def ragged_tokens(tokens: int) -> int:
    """An odd token count, no multiple of any tile size: the kernels' partial last blocks."""
    return max(tokens // 2, 1) | 1


@dataclasses.dataclass(frozen=True)
class CheckedShape:
    """What the check runs: the model's n, C, dtypes and ops at a number of tokens."""

    n: int
    hidden: int
    dtype: torch.dtype
    """The streams' dtype."""
    sublayer_dtype: torch.dtype
    ops: tuple[str, ...]
    sinkhorn_iters: int
    eps: float
    norm_eps: float

    @classmethod
    def from_config(cls, config) -> "CheckedShape":
        dtype = torch.float32 if config.fp32_residual_connection else config.params_dtype
        return cls(
            config.mhc_num_residual_streams,
            config.hidden_size,
            dtype,
            config.params_dtype,
            ops_used(config),
            config.mhc_sinkhorn_iterations,
            config.mhc_eps,
            config.mhc_norm_eps,
        )

    def kwargs(self, op: str) -> dict:
        if op == "mhc_mappings_collapse":
            return dict(sinkhorn_iters=self.sinkhorn_iters, eps=self.eps, norm_eps=self.norm_eps)
        if op == "mhc_head":
            return dict(eps=self.eps, norm_eps=self.norm_eps)
        if op == "hc_mappings":
            return dict(norm_eps=self.norm_eps)
        return {}

    def inputs(self, op: str, tokens: int, gen: torch.Generator) -> list[torch.Tensor]:
        """Random inputs of op: the streams in the model's dtype, parameters and gates fp32."""
        n, C, K = self.n, self.hidden, self.n * self.hidden

        def randn(*shape, scale=1.0):
            return torch.randn(*shape, generator=gen, device=gen.device).mul_(scale)

        def rand(*shape, scale=1.0, shift=0.0):
            return torch.rand(*shape, generator=gen, device=gen.device).mul_(scale).add_(shift)

        x = randn(tokens, n, C).to(self.dtype)
        # Projections of unit scale: logits of order 1, where the Sinkhorn projection is neither
        # at its fixed point (tiny gradients) nor far from it.
        if op == "mhc_mappings_collapse":
            M = n * n + 2 * n
            return [x, randn(M, K, scale=K**-0.5), randn(M, scale=0.5), rand(3, shift=0.5)]
        if op == "mhc_head":
            return [x, randn(n, K, scale=K**-0.5), randn(n, scale=0.5), rand(1, shift=0.5)]
        if op == "hc_mappings":
            return [
                x,
                randn(2 + n, C, scale=C**-0.5),
                randn(n * n + 2 * n, scale=0.5),
                rand(3, shift=0.5),
            ]
        if op == "mhc_collapse":
            return [x, rand(tokens, n)]
        return [
            x,
            randn(tokens, C).to(self.sublayer_dtype),
            rand(tokens, n, scale=2.0),
            rand(tokens, n, n),
        ]


@dataclasses.dataclass
class OpCheck:
    """One op of one backend at one token count against the reference."""

    backend: str
    op: str
    tokens: int
    error: str | None = None
    """None when the op met the contract; else what broke it (or the exception raised)."""
    worst: float = 0.0
    """Largest |got - want| / max |want| over its outputs and input gradients."""

    @property
    def passed(self) -> bool:
        return self.error is None


def _forward_backward(ops, op, inputs, kwargs, grads_out=None, gen=None):
    """op's outputs and its inputs' gradients for output gradients grads_out (drawn from gen
    when None)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = getattr(ops, op)(*leaves, **kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if grads_out is None:
        grads_out = [
            torch.randn(o.shape, generator=gen, device=gen.device).to(o.dtype) for o in outputs
        ]
    torch.autograd.backward(outputs, grads_out)
    return [o.detach() for o in outputs], [t.grad for t in leaves], grads_out


def check_op(
    name: str, ops: ModuleType, op: str, shape: CheckedShape, tokens: int, gen: torch.Generator
) -> OpCheck:
    """op of backend `ops` against the reference, forward and every input gradient."""
    result = OpCheck(name, op, tokens)
    try:
        _compare(result, ops, op, shape, tokens, gen)
    except Exception as err:  # a kernel that does not run here is a failed check, not a crash
        result.error = raised(err)
    return result


def raised(err: Exception) -> str:
    """An exception as a check's error: its type and message on one line."""
    return f"raised {type(err).__name__}: {' '.join(str(err).split())}"


def _compare(result: OpCheck, ops, op, shape, tokens, gen) -> None:
    inputs = shape.inputs(op, tokens, gen)
    kwargs = shape.kwargs(op)
    want, want_grads, grads_out = _forward_backward(reference, op, inputs, kwargs, gen=gen)
    got, got_grads, _ = _forward_backward(ops, op, inputs, kwargs, grads_out)
    exact_grads = []  # the float64 reference's, computed only if an fp32 comparison fails

    def exact(i):
        if not exact_grads:
            exact_grads.extend(
                _forward_backward(
                    reference,
                    op,
                    [t.double() for t in inputs],
                    kwargs,
                    [g.double() for g in grads_out],
                )[1]
            )
        return exact_grads[i]

    names = _INPUT_NAMES[op]
    compared = [(f"output {i}", g, w, None) for i, (g, w) in enumerate(zip(got, want, strict=True))]
    compared += [
        (f"grad of {names[i]}", g, w, i if op in _PARAMETER_OPS and i > 0 else None)
        for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True))
    ]
    for what, g, w, parameter in compared:
        if g is None:
            result.error = f"{what}: none"
            return
        problem = (
            numerics.mismatch(g, w)
            if parameter is None
            else numerics.mismatch_from_exact(g, w, exact(parameter))
        )
        if g.shape == w.shape and w.numel():
            diff = (g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)
            result.worst = max(result.worst, diff.item())
        if problem is not None:
            result.error = f"{what}: {problem}"
            return


def verify(
    name: str, ops: ModuleType, shape: CheckedShape, tokens: int, gen: torch.Generator
) -> list[OpCheck]:
    """Every op of the shape at `tokens` and at a ragged count, against the reference's fp32
    matmuls in full fp32 (`full_fp32_matmuls`)."""
    counts = dict.fromkeys((tokens, ragged_tokens(tokens)))
    with full_fp32_matmuls():
        return [check_op(name, ops, op, shape, t, gen) for op in shape.ops for t in counts]


@contextlib.contextmanager
def full_fp32_matmuls():
    """The reference's fp32 matmuls in full fp32 (not TF32), whatever the run has set: the
    spec the kernels are held to."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
